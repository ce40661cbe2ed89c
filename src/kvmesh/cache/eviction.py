"""Eviction policies of a cache tier, behind one interface.

A tier tells its policy about inserts, hits and removals, and asks it for victims when it needs room.  A
victim the tier cannot evict right now (an engine is still reading it) is skipped via ``evictable``; the
policy keeps it.  Policies hold keys only, never data; all calls come from one thread (the node's loop).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Evictable = Callable[[bytes], bool]


class EvictionPolicy(Protocol):
    name: str

    def inserted(self, key: bytes) -> None: ...
    def accessed(self, key: bytes) -> None: ...
    def removed(self, key: bytes) -> None: ...
    def victim(self, evictable: Evictable) -> bytes | None:
        """Choose, forget and return one evictable key (None when nothing can go)."""
        ...
    def expired(self, now: float) -> list[bytes]:
        """Keys whose time is up (TTL); they are forgotten by the policy."""
        ...


class Lru:
    name = "lru"

    def __init__(self) -> None:
        self._order: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def inserted(self, key: bytes) -> None:
        self._order[key] = None

    def accessed(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Evictable) -> bytes | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def expired(self, now: float) -> list[bytes]:
        return []


class Ttl(Lru):
    """LRU plus a lifetime: an object older than ``ttl_s`` since its last write is dropped."""

    name = "ttl"

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.ttl_s, self._clock = ttl_s, clock
        self._born: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def inserted(self, key: bytes) -> None:
        super().inserted(key)
        self._born.pop(key, None)
        self._born[key] = self._clock()

    def removed(self, key: bytes) -> None:
        super().removed(key)
        self._born.pop(key, None)

    def victim(self, evictable: Evictable) -> bytes | None:
        key = super().victim(evictable)
        if key is not None:
            self._born.pop(key, None)
        return key

    def expired(self, now: float) -> list[bytes]:
        out = []
        while self._born:
            key, born = next(iter(self._born.items()))
            if now - born < self.ttl_s:
                break
            self.removed(key)
            out.append(key)
        return out


class S3Fifo:
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO (10%), a main FIFO with re-insertion of
    objects hit since they entered, and a ghost FIFO of recently evicted keys.  One-hit wonders — most
    KV chunks of one-off prompts — leave through the small queue without displacing shared prefixes."""

    name = "s3fifo"

    def __init__(self, small_fraction: float = 0.1) -> None:
        self.small_fraction = small_fraction
        self._small: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._main: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._ghost: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._freq: dict[bytes, int] = {}

    def inserted(self, key: bytes) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def accessed(self, key: bytes) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, 3)

    def removed(self, key: bytes) -> None:
        self._freq.pop(key, None)
        self._small.pop(key, None)
        self._main.pop(key, None)

    def victim(self, evictable: Evictable) -> bytes | None:
        total = len(self._small) + len(self._main)
        for _ in range(2 * total + 1):  # every object is looked at most twice
            if not self._small and not self._main:
                return None
            use_small = bool(self._small) and (len(self._small) >= self.small_fraction * total or not self._main)
            q = self._small if use_small else self._main
            key, _ = q.popitem(last=False)
            if self._freq.get(key, 0) > 0 or not evictable(key):
                # hit while queued (or busy): promote from small, or give it another round in main
                if use_small and self._freq.get(key, 0) > 0:
                    self._main[key] = None
                    self._freq[key] = 0
                else:
                    q[key] = None
                    self._freq[key] = max(self._freq.get(key, 0) - 1, 0)
                continue
            self._freq.pop(key, None)
            if use_small:
                self._ghost[key] = None
                while len(self._ghost) > max(total, 16):
                    self._ghost.popitem(last=False)
            return key
        return None

    def expired(self, now: float) -> list[bytes]:
        return []


def make_policy(name: str, ttl_s: float | None = None) -> EvictionPolicy:
    if name == "lru":
        return Lru()
    if name == "s3fifo":
        return S3Fifo()
    if name == "ttl":
        return Ttl(ttl_s or 3600.0)
    raise ValueError(f"unknown eviction policy {name!r} (lru, s3fifo, ttl)")


@dataclass(slots=True)
class SeenCounter:
    """How often each key was offered (the store's admission filter: store a chunk only from its Nth offer);
    the oldest of at most ``cap`` keys are forgotten."""

    counts: collections.OrderedDict[bytes, int] = field(default_factory=collections.OrderedDict)
    cap: int = 1_000_000

    def bump(self, key: bytes) -> int:
        n = self.counts.pop(key, 0) + 1
        self.counts[key] = n
        if len(self.counts) > self.cap:
            self.counts.popitem(last=False)
        return n
