"""Prefill/decode disaggregation: the decode-first decision, shared by the gateway and the simulator.

An engine has a :data:`Role`: ``prefill`` (computes prompts' KV and hands it on), ``decode`` (generates,
loading a prompt's KV another engine computed) or ``both`` (the default: aggregated serving).  A fleet with
no prefill-role engine is aggregated and never consults this module.

The flow is decode-first, as llm-d does it:

1. pick the **decode engine** with the routing policy, over :func:`decode_side` (``decode`` and ``both``
   engines) — load, free KV and the prefix it already caches decide, as for any request;
2. :func:`plan_prefill` decides whether a **remote prefill** pays: the prompt tokens the decode engine would
   have to compute (its uncached tokens) must reach ``min_remote_prefill_tokens`` — a short or well-cached
   prompt never pays a hop — and a prefill engine must not be saturated (its estimated queue at most
   ``max_prefill_queue_s``; a long queue there would cost more TTFT than prefilling locally);
3. the prefill engine is the policy's pick over :func:`prefill_side`; the caller passes its candidates
   best first and the plan takes the first one that is not saturated.

Everything here is pure — no I/O, no clock, no randomness — so the simulator makes exactly the gateway's
decisions.  The result says why (:attr:`PrefillPlan.reason`), and callers count local prefills by reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[Role, ...] = get_args(Role)

# PrefillPlan.reason values
REMOTE = "remote"
SHORT_PROMPT = "short_prompt"          # too few uncached tokens on the decode engine: local prefill is cheaper
NO_PREFILL_ENGINE = "no_prefill_engine"  # no healthy prefill-role engine serves the model
PREFILL_SATURATED = "prefill_saturated"  # every prefill engine's queue is too long
DISABLED = "disabled"                  # P/D switched off in the config
LOCAL_REASONS = (SHORT_PROMPT, NO_PREFILL_ENGINE, PREFILL_SATURATED, DISABLED)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PdConfig:
    """The decision's knobs (``[gateway.pd]`` in the config; the simulator builds one directly)."""

    enabled: bool = True
    min_remote_prefill_tokens: int = 256  # uncached prompt tokens on the decode engine below which it prefills
    max_prefill_queue_s: float = 2.0      # a prefill engine with a longer estimated queue is saturated
    prefill_timeout_s: float = 30.0       # the remote-prefill leg's limit; past it the decode engine prefills


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """Whether to prefill remotely, on which engine (None when local), and why."""

    remote: bool
    engine: str | None
    reason: str


def role_of(backend: object) -> Role:
    """A backend's role; objects without one (plain candidates) serve ``both``."""
    role: Role = getattr(backend, "role", "both")
    return role


def decode_side(backends: Sequence[T]) -> list[T]:
    """The engines a request may decode on: ``decode`` and ``both``."""
    return [b for b in backends if role_of(b) != "prefill"]


def prefill_side(backends: Sequence[T]) -> list[T]:
    """The engines a remote prefill may run on: ``prefill`` only (a ``both`` engine prefills for itself)."""
    return [b for b in backends if role_of(b) == "prefill"]


def is_disaggregated(backends: Sequence[object]) -> bool:
    """Whether the fleet has a prefill-role engine, i.e. whether the P/D stage runs at all."""
    return any(role_of(b) == "prefill" for b in backends)


def queue_s(pending_prefill_tokens: int, prefill_tps: float) -> float:
    """A prefill engine's estimated queue: the prompt tokens routed to it and not answered yet, at its
    prefill throughput (tokens/s)."""
    return pending_prefill_tokens / prefill_tps if prefill_tps > 0 else 0.0


def local_reason(uncached_tokens: int, cfg: PdConfig) -> str | None:
    """Why the decode engine prefills itself whatever the prefill engines' state (disabled, short prompt),
    else None.  Callers check it first to skip scoring the prefill engines for most chat turns."""
    if not cfg.enabled:
        return DISABLED
    if uncached_tokens < cfg.min_remote_prefill_tokens:
        return SHORT_PROMPT
    return None


def plan_prefill(uncached_tokens: int, prefill_candidates: Sequence[tuple[str, float]],
                 cfg: PdConfig) -> PrefillPlan:
    """Decide where the prompt's prefill runs, once the decode engine is chosen.

    ``uncached_tokens``: prompt tokens the chosen decode engine would compute itself (the prompt less the
    prefix it caches or can load).  ``prefill_candidates``: healthy prefill-role engines serving the model,
    as ``(name, estimated queue seconds)``, best first (the policy's order).  Returns a remote plan on the
    first candidate whose queue is within ``cfg.max_prefill_queue_s``, else a local plan with the reason:
    disabled, short prompt (checked before the engines: a short prompt never pays a hop), no prefill
    engine, or all saturated.
    """
    reason = local_reason(uncached_tokens, cfg)
    if reason is not None:
        return PrefillPlan(False, None, reason)
    if not prefill_candidates:
        return PrefillPlan(False, None, NO_PREFILL_ENGINE)
    for name, q in prefill_candidates:
        if q <= cfg.max_prefill_queue_s:
            return PrefillPlan(True, name, REMOTE)
    return PrefillPlan(False, None, PREFILL_SATURATED)
