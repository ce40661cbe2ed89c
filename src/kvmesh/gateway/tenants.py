"""Tenants: API keys (hashed at rest), per-tenant limits, the tenant's cache salt.

A request's ``Authorization: Bearer <key>`` is hashed (SHA-256) and looked up; keys themselves are never
stored, logged or exported — metrics carry the tenant's name only.  Limits are token buckets refilled
continuously: requests per minute, and tokens per minute charged up front as prompt + max output tokens,
then reconciled with the actual usage the engine reports.  ``max_concurrent`` caps requests in flight.
All state lives on the gateway's event loop (no locks).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import pathlib
import re
import time
import tomllib
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvmesh.api.errors import ApiError

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_MIN_BURST = 10.0  # units a per-minute bucket holds at least (when the rate allows that many)


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    key_sha256: tuple[str, ...] = Field(default=(), description="hex SHA-256 of each API key")
    requests_per_min: float | None = Field(default=None, gt=0)
    tokens_per_min: float | None = Field(default=None, gt=0)
    max_concurrent: int | None = Field(default=None, gt=0)
    priority: int = Field(default=0, description="Higher is served first when requests queue")
    burst_s: float = Field(default=10.0, gt=0, le=60, description="Bucket size: this many seconds of the rate")
    cache_salt: str | None = Field(default=None, description="Defaults to a secret derived from the name")

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _digests(v)


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    admin_key_sha256: tuple[str, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()

    @field_validator("admin_key_sha256")
    @classmethod
    def _hex(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _digests(v)


def _digests(v: tuple[str, ...]) -> tuple[str, ...]:
    # a key pasted where its hash belongs would be accepted and then match no request (every key gets 401)
    for h in v:
        if not _SHA256.fullmatch(h):
            raise ValueError(f"{h[:8]}... is not a SHA-256 digest (64 hex characters): store the hash of a key, "
                             "not the key (kvmesh tenants hash-key KEY prints it)")
    return v


def changed_tenants(old: Tenants, new: Tenants) -> list[str]:
    """What a reload changed, as ``tenants.<name>`` (added, removed or any setting) and ``admin_key_sha256``."""
    out = [f"tenants.{n}" for n in sorted(old.tenants.keys() | new.tenants.keys())
           if n not in old.tenants or n not in new.tenants or old.tenants[n].cfg != new.tenants[n].cfg]
    return out + (["admin_key_sha256"] if old.admin != new.admin else [])


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True)
class Bucket:
    """Token bucket holding ``burst_s`` seconds of ``rate_per_min`` (at least one unit); it may go negative
    after reconciliation with real usage, which delays the tenant's next requests accordingly."""

    rate_per_min: float
    burst_s: float = 10.0
    floor: float = 1.0  # units the bucket holds at least
    level: float = 0.0
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.size

    @property
    def size(self) -> float:
        return max(self.floor, self.rate_per_min * self.burst_s / 60.0)

    def refill(self, now: float) -> None:
        self.level = min(self.size, self.level + (now - self.at) * self.rate_per_min / 60.0)
        self.at = now

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` fits (0 if it does now)."""
        missing = min(cost, self.size) - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.rate_per_min


@dataclass(slots=True)
class Tenant:
    cfg: TenantConfig
    salt: str
    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0

    @property
    def name(self) -> str:
        return self.cfg.name


class Tenants:
    """Authentication and limits.  Empty (no tenants configured) means open access as tenant ``default``."""

    def __init__(self, spec: TenantsFile, secret: str | None = None) -> None:
        self.secret = secret or os.environ.get("KVMESH_SALT_SECRET", "kvmesh")
        self.admin = set(spec.admin_key_sha256)
        self.by_hash: dict[str, Tenant] = {}
        self.tenants: dict[str, Tenant] = {}
        for t in spec.tenants:
            # "<name>:<secret>": unguessable, and cache nodes can charge a chunk to its tenant (byte quotas)
            salt = t.cache_salt or f"{t.name}:" + hmac.new(self.secret.encode(), t.name.encode(),
                                                           "sha256").hexdigest()[:32]
            # burst_s unset: at least min(rate, 10) requests, so a limit of 3 per minute admits 3 in a fresh
            # minute (10 s of it would hold half a request, i.e. one); an explicit burst_s is taken as it is
            floor = 1.0 if "burst_s" in t.model_fields_set else min(t.requests_per_min or 1.0, _MIN_BURST)
            ten = Tenant(t, salt, Bucket(t.requests_per_min, t.burst_s, floor) if t.requests_per_min else None,
                         Bucket(t.tokens_per_min, t.burst_s) if t.tokens_per_min else None)
            self.tenants[t.name] = ten
            for h in t.key_sha256:
                self.by_hash[h.lower()] = ten

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def keep_live_state(self, old: Tenants) -> Tenants:
        """A reload: a tenant present before keeps its object — its in-flight count (the requests running
        now release against it) and its buckets' levels — with the new settings applied; else a reload would
        let ``max_concurrent`` be exceeded and refill every rate limit.  Returns ``self``."""
        for name, new in self.tenants.items():
            kept = old.tenants.get(name)
            if kept is None:
                continue
            kept.cfg, kept.salt = new.cfg, new.salt
            kept.requests = _carry(kept.requests, new.requests)
            kept.tokens = _carry(kept.tokens, new.tokens)
            self.tenants[name] = kept
            for h, t in self.by_hash.items():
                if t is new:
                    self.by_hash[h] = kept
        return self

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The caller's tenant; None when auth is off.  Raises a 401 :class:`ApiError`."""
        if not self.enabled:
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", kind="auth_missing")
        t = self.by_hash.get(hash_key(authorization[7:].strip()))
        if t is None:
            raise ApiError(401, "invalid API key", kind="auth_invalid")
        return t

    def is_admin(self, authorization: str | None) -> bool:
        if not self.admin:
            return not self.enabled  # no admin keys: admin endpoints are open only without auth
        key = (authorization or "")[7:].strip() if (authorization or "").lower().startswith("bearer ") else ""
        return bool(key) and hash_key(key) in self.admin

    def admit(self, t: Tenant, cost_tokens: int) -> None:
        """Charge one request of ``cost_tokens``; raises 429 (with Retry-After) when over a limit."""
        now = time.monotonic()
        if t.cfg.max_concurrent is not None and t.in_flight >= t.cfg.max_concurrent:
            raise ApiError(429, f"tenant {t.name}: more than {t.cfg.max_concurrent} concurrent requests",
                           kind="rate_concurrency", retry_after=1)
        for b, cost, what in ((t.requests, 1.0, "requests"), (t.tokens, float(cost_tokens), "tokens")):
            if b is not None:
                b.refill(now)
                wait = b.wait_s(cost)
                if wait > 0:
                    raise ApiError(429, f"tenant {t.name}: {what} per minute limit ({b.rate_per_min:g}) reached",
                                   kind=f"rate_{what}", retry_after=max(1, math.ceil(wait)))
        if t.requests is not None:
            t.requests.level -= 1
        if t.tokens is not None:
            t.tokens.level -= cost_tokens
        t.in_flight += 1

    def release(self, t: Tenant, charged: int, used: int | None) -> None:
        """The request ended; ``used`` (if known) replaces the up-front token charge."""
        t.in_flight -= 1
        if t.tokens is not None and used is not None:
            t.tokens.level += charged - used


def _carry(old: Bucket | None, new: Bucket | None) -> Bucket | None:
    """``new``'s settings with ``old``'s level (at most the new size) where both exist."""
    if old is None or new is None:
        return new
    old.refill(time.monotonic())
    new.level, new.at = min(old.level, new.size), old.at
    return new


def load_tenants(path: pathlib.Path | None) -> TenantsFile:
    """Read a tenants TOML file (plus ``KVMESH_API_KEYS=tenant:key,...`` from the environment, hashed on
    load).  Raises ``ValueError`` with a one-line message."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"tenants file {path}: {e}") from None
    env = os.environ.get("KVMESH_API_KEYS", "")
    try:
        spec = TenantsFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"tenants file {path}: {'.'.join(map(str, first['loc']))}: {msg}") from None
    if env:
        extra: dict[str, list[str]] = {}
        for item in env.split(","):
            name, _, key = item.partition(":")
            if not name or not key:
                raise ValueError("KVMESH_API_KEYS must look like 'tenant:key,tenant2:key2'")
            extra.setdefault(name.strip(), []).append(hash_key(key.strip()))
        known = {t.name: t for t in spec.tenants}
        merged = [t.model_copy(update={"key_sha256": (*t.key_sha256, *extra.pop(t.name, []))}) for t in spec.tenants]
        merged += [TenantConfig(name=n, key_sha256=tuple(h)) for n, h in extra.items() if n not in known]
        spec = spec.model_copy(update={"tenants": tuple(merged)})
    return spec
