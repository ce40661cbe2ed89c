"""Admission control and fair queueing across tenants.

When every replica already holds ``max_in_flight_per_backend`` requests, new requests wait in the gateway.
The next one admitted comes from the highest priority class, and within it from the tenant that has been
served the fewest tokens: a virtual token counter per tenant (VTC, Sheng et al., "Fairness in Serving Large
Language Models", OSDI'24).  A tenant that was idle has its counter lifted to the smallest counter among
the tenants currently waiting or running, so idling earns no credit to burst later, and a flooding tenant
cannot starve a quiet one.  The queue is bounded (→ 429) and waiting is bounded (→ 503 with Retry-After).

Slots free only when requests end, and a flood of similar requests frees them in waves: a quiet tenant
would wait for the next wave (seconds) although it is owed service now.  So a tenant with nothing running
may start one request at once on a reserve above the capacity (``reserve`` × capacity, at least 1; 0
turns it off) — the engines batch it with the others; the reserve bounds the overload.
Runs on the gateway's event loop only.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmesh.api.errors import ApiError


@dataclass(slots=True)
class _Waiter:
    tenant: str
    priority: int
    cost: int
    fut: asyncio.Future[None]


@dataclass(slots=True)
class Admission:
    capacity_fn: Callable[[], int | None]       # current fleet capacity; None = unlimited
    max_queue: int = 1024
    queue_timeout_s: float = 30.0
    retry_after_s: int = 2
    reserve: float = 0.25
    active: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    running: collections.Counter[str] = field(default_factory=collections.Counter)
    queues: dict[str, collections.deque[_Waiter]] = field(default_factory=dict)
    admitted: list[str] = field(default_factory=list)  # admission order (bounded), for tests and debugging
    reserved: int = 0  # admissions on the reserve (a counter for metrics and tests)

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _lift(self, tenant: str) -> None:
        if tenant in self.counters and (self.running[tenant] or self.queues.get(tenant)):
            return
        busy = [self.counters[t] for t in self.counters if self.running[t] or self.queues.get(t)]
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(busy) if busy else 0.0)

    def _grant(self, tenant: str, cost: int) -> None:
        # charged on admission (prompt + max tokens), corrected with the real usage in release()
        self.active += 1
        self.running[tenant] += 1
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost
        self.admitted.append(tenant)
        if len(self.admitted) > 10_000:
            del self.admitted[:5_000]

    async def acquire(self, tenant: str, priority: int = 0, cost: int = 0) -> None:
        """Wait for a slot; raises 429 when the queue is full, 503 when the wait times out."""
        self._lift(tenant)
        cap = self.capacity_fn()
        if cap is None or (self.active < cap and not self.queued()):
            self._grant(tenant, cost)
            return
        extra = max(1, int(cap * self.reserve)) if self.reserve > 0 else 0
        if not self.running[tenant] and self.active < cap + extra and not self.queues.get(tenant):
            self.reserved += 1
            self._grant(tenant, cost)  # owed service and idle: start now, on the reserve
            return
        if self.queued() >= self.max_queue:
            raise ApiError(429, "the gateway queue is full; retry later", kind="queue_full",
                           retry_after=self.retry_after_s)
        w = _Waiter(tenant, priority, cost, asyncio.get_running_loop().create_future())
        self.queues.setdefault(tenant, collections.deque()).append(w)
        try:
            await asyncio.wait_for(asyncio.shield(w.fut), self.queue_timeout_s)
        except TimeoutError:
            if not w.fut.done():
                w.fut.cancel()
                self.queues[tenant].remove(w)
                raise ApiError(503, f"no replica free within {self.queue_timeout_s:g}s", kind="queue_timeout",
                               retry_after=self.retry_after_s) from None
        except asyncio.CancelledError:
            if w.fut.done() and not w.fut.cancelled():
                self.release(tenant, -cost)  # granted just as the client left: give the slot back
            elif w in self.queues.get(tenant, ()):
                self.queues[tenant].remove(w)
            raise

    def release(self, tenant: str, correction: int = 0) -> None:
        """A request of ``tenant`` finished; ``correction`` = tokens really served - the admission charge."""
        self.active -= 1
        self.running[tenant] -= 1
        self.counters[tenant] = self.counters.get(tenant, 0.0) + correction
        self.pump()

    def pump(self) -> None:
        cap = self.capacity_fn()
        while self.queued() and (cap is None or self.active < cap):
            # priority first, then fewest tokens served, then fewest requests running
            tenant = min((t for t, q in self.queues.items() if q),
                         key=lambda t: (-self.queues[t][0].priority, self.counters.get(t, 0.0), self.running[t]))
            w = self.queues[tenant].popleft()
            if w.fut.done():
                continue
            self._grant(tenant, w.cost)
            w.fut.set_result(None)
