"""The simulator as an autoscaling actuator: a virtual-time :class:`~kvmesh.sim.cluster.Cluster` whose replicas
start, serve, drain and stop under a :class:`kvmesh.autoscale.core.Scaler`.

Every replica slot (``max_replicas`` of them, named ``e0``…) is off, starting, serving or draining:

- **start**: the slot gets a fresh engine (empty GPU cache; the index forgets its old blocks) and serves
  ``start_s`` later (model load).  Cache-aware, it then pre-warms before taking traffic: the hottest chains
  (:func:`kvmesh.autoscale.cacheaware.prewarm_plan`, up to ``prewarm_share`` of its KV blocks) are loaded
  from the cache node/pool — which holds every block an engine computed, since the connector writes
  through — at the host link's bandwidth (``kvmesh.sim.tiers.TIER_PROFILES``), delaying readiness by that
  load time; its blocks reach the index as the engine's own events.  Routing then ramps its share in over
  ``ramp_s``: while ramping it is offered to the routing policy on only that share of arrivals.
- **drain**: the replica leaves the candidate list at once (no new request), its in-flight requests run to
  the end, then it stops and the index forgets its GPU blocks.  No request is dropped by a scale event.
- Scale-in cancels starting replicas first, then drains the scaler's victims.

Replica-hours integrate every replica that holds a GPU — starting, serving or draining — over virtual time.
Each ``interval_s`` the cluster assembles the gateway's view of the interval
(:class:`kvmesh.autoscale.signals.Signals`) and ticks the scaler.  The run loop is the base cluster's with
two more event kinds (tick, replica ready) in ``simulate``; ``cluster.py`` itself is not changed.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from kvmesh.autoscale.cacheaware import CacheAwareVictims, Hotness, prewarm_plan, ramp_share
from kvmesh.autoscale.core import Capacity, Scaler
from kvmesh.autoscale.signals import AGGREGATED, EngineSignals, GatewaySignals, RoleSignals, Signals
from kvmesh.index.events import EventBatch
from kvmesh.sim.cluster import _ARRIVE, Cluster, SimBackend, Slo, _q, _tpot
from kvmesh.sim.core import EngineCore, SimRequest, StepResult
from kvmesh.sim.profiles import TimingProfile
from kvmesh.sim.tiers import tier_profile

_TICK, _READY = 10, 11
OFF, STARTING, SERVING, DRAINING = "off", "starting", "serving", "draining"


@dataclass(frozen=True, slots=True)
class ElasticConfig:
    max_replicas: int = 8
    initial: int = 1              # serving (warm) at time 0
    start_s: float = 60.0         # cold start: model load before a replica serves
    interval_s: float = 5.0       # the scaler's tick
    cache_aware: bool = False     # pre-warm + ramp on scale-out (victim choice is the scaler's chooser)
    prewarm_share: float = 0.5    # of a new replica's KV blocks
    ramp_s: float = 60.0
    hot_half_life_s: float = 300.0


@dataclass(slots=True)
class _Slot:
    backend: SimBackend
    state: str = OFF
    since: float = 0.0          # when it entered ``state``
    generation: int = 0         # a READY event for an older start is stale
    warmed: bool = False        # pre-warm done (cache-aware starts)


@dataclass(slots=True)
class _Interval:
    arrivals: int = 0
    prompt: int = 0
    prefilled: int = 0
    output: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    missed_ttft: int = 0  # of the requests finished in the interval
    missed_tpot: int = 0


@dataclass(slots=True)
class ElasticResult:
    requests: int
    unfinished: int
    attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p99_s: float
    hit_rate: float
    replica_hours: float
    mean_replicas: float
    peak_replicas: int
    scale_ups: int
    scale_downs: int
    virtual_s: float
    wall_s: float
    cpu_s: float  # this process's CPU time for the run: the simulator's speed, whatever else the machine runs
    timeline: list[tuple[float, int, int, float]]  # (t, replicas, ready, interval TTFT p90)

    def row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "timeline"}  # type: ignore[attr-defined]


KV_FILL = 0.9  # share of the KV cache a profile run fills before admissions stall (contexts grow as they decode)


def profiled_capacity(p: TimingProfile, tpot_s: float, context_tokens: float) -> Capacity:
    """What one replica of profile ``p`` serves (Dynamo's offline profile; the slo policy's prior): prefill
    tokens/s with the whole engine prefilling, and the decode batch whose step meets ``tpot_s`` with
    ``context_tokens`` of context per stream (an aggregated replica splits its time between the two) — and
    that the KV cache holds: at most ``KV_FILL`` of ``kv_capacity_tokens`` over ``context_tokens`` streams.
    (Without the KV bound the prior promised Azure conv x4 ~150 streams per replica where ~95 fit: at 3
    replicas every cache sat at 100 %, requests queued for blocks, and attainment fell to 50 %.)"""
    per_seq = p.decode_s_per_seq + context_tokens * p.decode_s_per_ctx_token
    streams = max(1.0, (tpot_s - p.overhead_s) / per_seq)
    kv_streams = max(1.0, KV_FILL * p.kv_capacity_tokens / max(context_tokens, 1.0))
    return Capacity(prefill_tps=p.prefill_tps, decode_concurrency=min(streams, kv_streams, p.max_running),
                    tpot_s=tpot_s)


class ElasticCluster(Cluster):
    """A cluster of up to ``cfg.max_replicas`` replicas, implementing :class:`kvmesh.autoscale.core.Actuator`
    for the aggregated role.  ``attach`` a scaler (none: a static fleet of ``cfg.initial``)."""

    def __init__(self, cfg: ElasticConfig, profile: TimingProfile, policy: str, block_size: int,
                 token_scale: float = 1.0, *, slo: Slo | None = None, seed: int = 0, **kw: Any) -> None:
        super().__init__(cfg.max_replicas, profile, policy, block_size, token_scale, slo=slo, seed=seed, **kw)
        self.cfg, self.scale_factor = cfg, token_scale
        self.slots = [_Slot(b) for b in self.backends]
        self.slot_of = {b.name: s for b, s in zip(self.backends, self.slots, strict=True)}
        for s in self.slots[:cfg.initial]:
            s.state = SERVING
            s.since = -math.inf
        self.scaler: Scaler | None = None
        self.hot = Hotness(cfg.hot_half_life_s)
        self._src: dict[int, tuple[SimRequest, int]] = {}  # block key -> (a request holding it, block index)
        self._rng = random.Random(seed)
        self._iv = _Interval()
        self._hits = self._queries = 0                      # of engines already stopped
        self._area, self._area_t, self.peak = 0.0, 0.0, cfg.initial
        self.timeline: list[tuple[float, int, int, float]] = []
        self._refresh()

    def attach(self, scaler: Scaler) -> None:
        self.scaler = scaler

    def cache_aware_victims(self) -> CacheAwareVictims:
        return CacheAwareVictims(lambda e: self.index.engine_keys(e), lambda: self.hot.snapshot(self.now),
                                 lambda e: self.by_name[e].in_flight)

    # ---- Actuator --------------------------------------------------------------------------------
    def replicas(self, role: str = AGGREGATED) -> int:
        return sum(s.state in (STARTING, SERVING) for s in self.slots)

    def ready(self, role: str = AGGREGATED) -> int:
        return sum(s.state == SERVING for s in self.slots)

    def members(self, role: str = AGGREGATED) -> list[str]:
        serving = [s for s in self.slots if s.state == SERVING]
        return [s.backend.name for s in sorted(serving, key=lambda s: s.since)]

    def scale(self, role: str, n: int, victims: Any = ()) -> None:
        have = self.replicas(role)
        if n > have:
            for s in [s for s in self.slots if s.state == OFF][:n - have]:
                self._start(s)
        k = have - n
        for s in sorted((s for s in self.slots if s.state == STARTING), key=lambda s: -s.since):
            if k <= 0:
                break
            self._set(s, OFF)
            k -= 1
        order = list(victims) + list(reversed(self.members(role)))
        for name in dict.fromkeys(order):
            if k <= 0:
                break
            s = self.slot_of[name]
            if s.state == SERVING:
                self._set(s, DRAINING)
                self._retire_if_idle(s)
                k -= 1
        self._refresh()

    # ---- lifecycle -------------------------------------------------------------------------------
    def _set(self, s: _Slot, state: str) -> None:
        self._area += self._gpus() * (self.now - self._area_t)
        self._area_t = self.now
        s.state, s.since = state, self.now
        self.peak = max(self.peak, self._gpus())

    def _gpus(self) -> int:
        return sum(s.state != OFF for s in self.slots)

    def _start(self, s: _Slot) -> None:
        b = s.backend
        self._hits += b.core.pool.hits + b.core.tier_hits
        self._queries += b.core.pool.queries
        core = EngineCore(b.name, self.profile, self.block_size, self.scale_factor)
        core.tier = b.core.tier
        b.core, b.running, b.kv_usage = core, 0, 0.0
        self.index.forget_engine(b.name)
        s.generation += 1
        s.warmed = False
        self._set(s, STARTING)
        self._push(self.now + self.cfg.start_s, _READY, (s, s.generation))

    def _ready(self, s: _Slot, generation: int) -> None:
        if s.state != STARTING or s.generation != generation:
            return  # cancelled meanwhile
        if self.cfg.cache_aware and not s.warmed:
            s.warmed = True  # loaded now; it serves when the load is done
            self._push(self.now + self._prewarm(s.backend.core), _READY, (s, generation))
            return
        self._set(s, SERVING)
        self._refresh()

    def _prewarm(self, core: EngineCore) -> float:
        """Load the hottest chains into ``core``'s pool (unreferenced, cached); the load's seconds."""
        budget = int(core.pool.num_blocks * self.cfg.prewarm_share)
        plan = prewarm_plan(self.hot.snapshot(self.now), self.hot.parent, budget)
        plan = [k for k in plan if k in self._src]
        bs = self.block_size
        for k in plan:
            r, i = self._src[k]
            if not core.pool.allocate(1):
                break
            core.pool.store(k, r.keys[i - 1] if i else None, r.tokens[i * bs:(i + 1) * bs])
            core.pool.release([k], 0)
        events = core.pool.take_events()
        if events:
            self._push(self.now + self.event_delay_s, 2, ((core.name,), EventBatch(self.now, events)))
        nbytes = len(plan) * bs * self.scale_factor * self.profile.kv_bytes_per_token
        try:
            return tier_profile(self.profile.name).host.seconds(nbytes)
        except ValueError:
            return nbytes / 25e9  # no tier figures for this profile: a PCIe Gen4 host link

    def _retire_if_idle(self, s: _Slot) -> None:
        b = s.backend
        if s.state == DRAINING and b.in_flight == 0 and not b.core.has_work() and not b.stepping:
            self._set(s, OFF)
            self.index.forget_engine(b.name)

    def _refresh(self) -> None:
        """The routing candidates: serving replicas (a ramping one on its share of arrivals)."""
        self.backends = [s.backend for s in self.slots if s.state == SERVING]

    def _candidates(self) -> list[SimBackend]:
        if not self.cfg.cache_aware or self.cfg.ramp_s <= 0:
            return self.backends
        out = [b for b in self.backends
               if self._rng.random() < ramp_share(self.now - self.slot_of[b.name].since, self.cfg.ramp_s)]
        return out or self.backends

    # ---- the event loop --------------------------------------------------------------------------
    def simulate(self, reqs: list[SimRequest]) -> ElasticResult:
        """Simulate ``reqs`` to the end with the attached scaler (the base ``run`` knows no scaling)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for r in reqs:
            self._push(r.arrival, _ARRIVE, r)
        self._arrivals = sorted(r.arrival for r in reqs)
        self._next_arrival = 0
        self._push(self.cfg.interval_s, _TICK, None)
        while self._heap:
            now, _, kind, obj = heapq.heappop(self._heap)
            self.now = now
            if kind == _TICK:
                self._tick(now)
            elif kind == _READY:
                self._ready(*obj)
            else:  # arrivals, steps, P/D hand-offs and KV events as the fixed-size cluster handles them
                self._handle(now, kind, obj)
        return self._elastic_result(reqs, time.perf_counter() - t0, time.process_time() - c0)

    def _arrive(self, now: float, r: SimRequest) -> None:
        iv = self._iv
        iv.arrivals += 1
        iv.prompt += int(len(r.tokens) * self.scale_factor)
        if self.cfg.cache_aware:
            self.hot.touch(r.keys, now)
            for i, k in enumerate(r.keys):
                self._src.setdefault(k, (r, i))
        serving, self.backends = self.backends, self._candidates()
        try:
            super()._arrive(now, r)
        finally:
            self.backends = serving

    def _step_done(self, now: float, b: SimBackend, res: StepResult) -> None:
        iv = self._iv
        for r in res.first_tokens:
            iv.ttft.append(now - r.arrival)
            iv.prefilled += int((len(r.tokens) - r.cached) * self.scale_factor)
        for r in res.finished:
            iv.output += r.generated
            iv.tpot.append(_tpot(r))
            iv.missed_ttft += r.first_token_at - r.arrival > self.slo.ttft_s
            iv.missed_tpot += _tpot(r) > self.slo.tpot_s
        super()._step_done(now, b, res)
        s = self.slot_of[b.name]
        if s.state == DRAINING:
            self._retire_if_idle(s)

    def _signals(self, now: float) -> Signals:
        iv, self._iv = self._iv, _Interval()
        ttft, tpot = sorted(iv.ttft), sorted(iv.tpot)
        gw = GatewaySignals(
            interval_s=self.cfg.interval_s, arrivals=iv.arrivals, prompt_tokens=iv.prompt,
            prefill_tokens_done=iv.prefilled, output_tokens=iv.output, finished=len(tpot),
            queued_prefill_tokens=int(sum(b.pending_prefill_tokens for b in self.backends) * self.scale_factor),
            in_flight=sum(b.in_flight for b in self.backends), ttft_p50_s=_q(ttft, 0.5), ttft_p90_s=_q(ttft, 0.9),
            tpot_p50_s=_q(tpot, 0.5), tpot_p90_s=_q(tpot, 0.9), slo_missed_ttft=iv.missed_ttft,
            slo_missed_tpot=iv.missed_tpot)
        engines = []
        for b in self.backends:
            b.sync()
            engines.append(EngineSignals(b.name, len(b.core.waiting), b.running, b.kv_usage))
        return Signals(now, {AGGREGATED: RoleSignals(gw, tuple(engines))})

    def _tick(self, now: float) -> None:
        sig = self._signals(now)
        if self.scaler is not None:
            self.scaler.tick(sig)
        self.timeline.append((now, self.replicas(), self.ready(), sig.role(AGGREGATED).gateway.ttft_p90_s))
        busy = any(s.backend.core.has_work() for s in self.slots)
        if self._next_arrival < len(self._arrivals) or busy:
            self._push(now + self.cfg.interval_s, _TICK, None)

    def _elastic_result(self, reqs: list[SimRequest], wall: float, cpu: float) -> ElasticResult:
        end = self.now
        self._area += self._gpus() * (end - self._area_t)
        self._area_t = end
        done = self.done
        ttft = sorted(r.first_token_at - r.arrival for r in done)
        good = sum(1 for r in done if r.first_token_at - r.arrival <= self.slo.ttft_s and _tpot(r) <= self.slo.tpot_s)
        cores = [s.backend.core for s in self.slots]
        hits = self._hits + sum(c.pool.hits + c.tier_hits for c in cores)
        queries = self._queries + sum(c.pool.queries for c in cores)
        ev = self.scaler.scale_events if self.scaler else {}
        span = max(end, 1e-9)
        return ElasticResult(
            len(done), len(reqs) - len(done), good / max(len(reqs), 1), _q(ttft, 0.5), _q(ttft, 0.9), _q(ttft, 0.99),
            _q(sorted(_tpot(r) for r in done), 0.99), hits / max(queries, 1), self._area / 3600, self._area / span,
            self.peak, ev.get("up", 0), ev.get("down", 0), end, wall, cpu, self.timeline)
