"""Fleet pressure as the gateway sees it: prefill work waiting, the wait it means, and what was shed.

Overload is not failure.  When more prompts arrive than the engines can prefill, every request's time to
first token grows; timing them out, retrying them elsewhere and tripping breakers throws the work away and
amplifies the load.  Instead the gateway estimates, for each arriving request, how long it would wait:

    expected wait = queued prefill tokens / fleet prefill throughput

*queued prefill tokens* are the prompts sent to engines that have not produced their first token yet
(``Backend.pending_prefill_tokens``) plus the prompts held in the admission queue; *fleet throughput* is
the sum, over the replicas in rotation, of each one's prefill tokens/s learned from its TTFTs (the tokens it
had to prefill before a request's first token, over that TTFT — the kv-aware cost model's estimator; a
replica not measured yet counts as the mean of those that were).  Nothing is learned until some prompt of
at least ``MIN_SAMPLE_TOKENS`` was answered: until then the wait is unknown (None) and nothing is shed on it.

A request whose expected wait exceeds ``max_expected_wait_s`` is shed at admission: 503 with
``Retry-After`` = the seconds until the queue has drained back under the limit (at least 1).  The same
figures are exported as metrics (``kvmesh_gateway_queued_prefill_tokens``,
``kvmesh_gateway_expected_wait_seconds``, ``kvmesh_gateway_shed``) for the autoscaler.
Runs on the gateway's event loop only.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

MIN_SAMPLE_TOKENS = 64  # shorter prompts' TTFT is mostly fixed overhead, not prefill
_ALPHA = 0.2            # weight of a new throughput sample


class _Replica(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def pending_prefill_tokens(self) -> int: ...


@dataclass(slots=True)
class Pressure:
    backends: Callable[[], Iterable[_Replica]]
    held_tokens: Callable[[], int] = lambda: 0      # prompt tokens waiting in the admission queue
    learned_tps: dict[str, float] = field(default_factory=dict)  # prefill tokens/s per replica
    shed: collections.Counter[str] = field(default_factory=collections.Counter)  # requests shed, by reason

    def observe(self, name: str, tokens: int, ttft_s: float) -> None:
        """One first token: ``tokens`` is what the replica prefilled before it (queued ahead + own)."""
        if tokens < MIN_SAMPLE_TOKENS or ttft_s <= 0:
            return
        sample = tokens / ttft_s
        old = self.learned_tps.get(name)
        self.learned_tps[name] = sample if old is None else (1 - _ALPHA) * old + _ALPHA * sample

    def queued_prefill_tokens(self) -> int:
        return sum(b.pending_prefill_tokens for b in self.backends()) + self.held_tokens()

    def replica_tps(self, name: str) -> float | None:
        """Prefill tokens/s of replica ``name``: learned, else the mean of those learned (None: none yet)."""
        if name in self.learned_tps:
            return self.learned_tps[name]
        return sum(self.learned_tps.values()) / len(self.learned_tps) if self.learned_tps else None

    def fleet_tps(self) -> float | None:
        """Prefill tokens/s of the replicas in rotation; None until one was measured."""
        live = [b.name for b in self.backends() if b.healthy]
        known = [self.learned_tps[n] for n in live if n in self.learned_tps]
        if not known:
            return None
        return sum(known) / len(known) * len(live)

    def expected_wait_s(self) -> float | None:
        """How long a request arriving now waits before its prefill starts (None: unknown)."""
        tps = self.fleet_tps()
        return None if tps is None else self.queued_prefill_tokens() / tps

    def retry_after_s(self, limit_s: float) -> int:
        """Seconds until the expected wait is back under ``limit_s`` (at least 1)."""
        wait = self.expected_wait_s()
        return max(1, math.ceil((wait or 0.0) - limit_s))

    def snapshot(self) -> dict[str, object]:
        """What ``/debug/autoscale`` and the autoscaler's signals read."""
        wait = self.expected_wait_s()
        tps = self.fleet_tps()
        return {"queued_prefill_tokens": self.queued_prefill_tokens(),
                "expected_wait_s": None if wait is None else round(wait, 3),
                "fleet_prefill_tps": None if tps is None else round(tps, 1),
                "shed": dict(self.shed)}
