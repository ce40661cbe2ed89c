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

Overload is shed early (:mod:`kvmesh.gateway.pressure`): a request whose expected wait for prefill exceeds
``max_expected_wait_s`` gets 503 at once, with ``Retry-After`` from that wait, instead of timing out after
minutes; a queue timeout's ``Retry-After`` is computed the same way.  Scale to zero (``hold_s`` > 0): while
no replica is ready, requests are held (at most ``max_queue`` of them, ``hold_s`` each) and ``on_hold`` is
called so the autoscaler starts one; they go on as soon as one is ready.
Runs on the gateway's event loop only.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmesh.api.errors import ApiError
from kvmesh.gateway.pressure import Pressure


@dataclass(slots=True)
class _Waiter:
    tenant: str
    priority: int
    cost: int
    fut: asyncio.Future[None]
    prefill: int = 0  # its prompt tokens (the pressure counts them as queued prefill)


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
    pressure: Pressure | None = None
    max_expected_wait_s: float | None = None  # shed beyond this expected wait (None: never)
    ready_fn: Callable[[], bool] = lambda: True  # a replica is ready (scale to zero holds until one is)
    hold_s: float = 0.0                          # scale to zero: how long a request may wait for one
    on_hold: Callable[[], None] | None = None    # a request is held: wake the autoscaler
    holding: int = 0
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def queued_prefill(self) -> int:
        """Prompt tokens of the requests waiting here."""
        return sum(w.prefill for q in self.queues.values() for w in q)

    def retry_after(self) -> int:
        if self.pressure is None:
            return self.retry_after_s
        return max(self.retry_after_s, self.pressure.retry_after_s(self.max_expected_wait_s or 0.0))

    def shed_if_saturated(self) -> None:
        """503 now when the expected wait for prefill is over the limit (the fleet is saturated)."""
        limit, p = self.max_expected_wait_s, self.pressure
        if limit is None or p is None or (wait := p.expected_wait_s()) is None or wait <= limit:
            return
        p.shed["expected_wait"] += 1
        raise ApiError(503, f"the fleet is saturated: a request would wait ~{wait:.0f}s before its prefill "
                       f"starts (limit {limit:g}s); retry later", kind="overloaded",
                       retry_after=p.retry_after_s(limit))

    async def wait_ready(self) -> None:
        """Scale to zero: hold the request until a replica is ready (bounded), waking the autoscaler."""
        if self.hold_s <= 0 or self.ready_fn():
            return
        if self.holding >= self.max_queue:
            raise ApiError(429, "too many requests wait for the first replica; retry later", kind="queue_full",
                           retry_after=self.retry_after_s)
        self.holding += 1
        if self.on_hold is not None:
            self.on_hold()
        try:
            async with asyncio.timeout(self.hold_s):
                while not self.ready_fn():
                    self._ready.clear()
                    await self._ready.wait()
        except TimeoutError:
            if self.pressure is not None:
                self.pressure.shed["cold_start"] += 1
            raise ApiError(503, f"no replica became ready within {self.hold_s:g}s", kind="cold_start",
                           retry_after=self.retry_after_s) from None
        finally:
            self.holding -= 1

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

    async def acquire(self, tenant: str, priority: int = 0, cost: int = 0, prefill: int = 0) -> None:
        """Wait for a slot; raises 429 when the queue is full, 503 when the fleet is saturated (expected
        wait over the limit) or the wait times out."""
        await self.wait_ready()
        self.shed_if_saturated()
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
        w = _Waiter(tenant, priority, cost, asyncio.get_running_loop().create_future(), prefill)
        self.queues.setdefault(tenant, collections.deque()).append(w)
        try:
            await asyncio.wait_for(asyncio.shield(w.fut), self.queue_timeout_s)
        except TimeoutError:
            if not w.fut.done():
                w.fut.cancel()
                self.queues[tenant].remove(w)
                raise ApiError(503, f"no replica free within {self.queue_timeout_s:g}s", kind="queue_timeout",
                               retry_after=self.retry_after()) from None
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
        if self.ready_fn():
            self._ready.set()  # held requests (scale to zero) go on
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
