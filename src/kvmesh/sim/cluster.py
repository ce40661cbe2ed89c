"""Virtual-time cluster simulator: N simulated engines behind kvmesh's real routing policies and KV index.

A discrete-event loop over arrivals, engine iterations and KV-event deliveries.  Routing calls the same
``Policy`` objects the gateway uses (built by ``make_policy``), over backend views that carry the same
load signals the gateway tracks (in-flight requests, prompt tokens sent and not yet answered, the engine's
running count and KV usage) and the same outcome hooks (first token, end of stream); the ``kv-aware``
policy reads a real :class:`KvIndex` fed with vLLM-format events from the simulated block pools,
delivered after ``event_delay_s``.  By default the policies start from the gateway's default cost model
and learn throughput and decode step online, as they must in a real deployment (``informed=True`` hands
them the profile's true figures instead).  ``oracle`` sees every engine's cache, queue, batch and context
exactly and minimises the same TTFT + decode cost with the profile's true coefficients: the ceiling the
event-driven policies are measured against.

Reported per policy: TTFT and TPOT (per request, first to last token) mean/p50/p99, the engine hit rate,
each engine's share of prompt tokens, and goodput — the share of requests meeting both the TTFT and the
TPOT SLO.

With ``tiers`` (:class:`kvmesh.sim.tiers.TierConfig`) each machine of ``engines_per_machine`` engines gets a
cache node (DRAM over SSD), optionally pooled; their tier events (medium CPU / STORAGE) reach the same index
after ``event_delay_s``, credited to the engines that can read them.  ``hit_rate`` then counts GPU hits and
tier loads; ``tier_hit_rate`` the loads alone.

With ``roles`` naming some engines ``prefill``, arrivals take the gateway's decode-first P/D flow
(:mod:`kvmesh.sim.pd`): a decode engine is routed first, the shared decision in
:mod:`kvmesh.routing.disagg` sends long uncached prompts to a prefill engine, and their KV moves to the
decode engine over the profile's transfer bandwidth; ``SimResult.pd`` reports remote vs local prefills,
the transfers and each role's load.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmesh.config import RoutingConfig
from kvmesh.index.events import EventBatch
from kvmesh.index.hashing import block_keys
from kvmesh.index.index import KvIndex
from kvmesh.routing import Policy, RequestContext, make_policy
from kvmesh.routing.base import Candidate, CandidateState, Decision, Scorer, Scores
from kvmesh.routing.disagg import PdConfig, Role, is_disaggregated
from kvmesh.routing.kv_aware import decode_cost
from kvmesh.routing.policies import HealthyServingModel, MinCostPicker
from kvmesh.sim.core import EngineCore, SimRequest, StepResult
from kvmesh.sim.pd import PdFlow
from kvmesh.sim.profiles import TimingProfile
from kvmesh.sim.tiers import MachineView, TierConfig, TierSystem, tier_profile

_ARRIVE, _STEP_DONE, _EVENTS, _DELIVER = 0, 1, 2, 3


@dataclass(slots=True, kw_only=True)
class SimBackend(CandidateState):
    """What a policy sees of a simulated engine (the gateway's ``Backend`` load fields), plus its core."""

    core: EngineCore
    role: Role = "both"
    stepping: bool = False
    busy_s: float = 0.0   # virtual time spent stepping
    pending_of: dict[int, int] = field(default_factory=dict)

    def sync(self) -> None:
        """Refresh the engine-reported figures (the gateway scrapes them from the engine's /metrics)."""
        core = self.core
        self.running = len(core.running)
        self.kv_usage = core.pool.held_blocks() / max(core.pool.num_blocks, 1)


class OracleScorer(Scorer):
    """Exact cached prefix, queued prefill, batch and context of every engine; the profile's true prefill
    throughput and decode step.  Minimises TTFT + ``decode_weight`` * decode cost (``decode_cost``)."""

    name = "oracle_cost_s"

    def __init__(self, profile: TimingProfile, scale: float, decode_weight: float) -> None:
        self.tps = profile.prefill_tps / scale
        self.profile, self.scale, self.decode_weight = profile, scale, decode_weight

    def score(self, ctx: RequestContext, cands: list[Candidate], explain: bool = False) -> Scores:
        costs, uncached = [], []
        n = len(ctx.token_ids or ())
        out, p = ctx.max_tokens or 1, self.profile
        for c in cands:
            core: EngineCore = c.core  # type: ignore[attr-defined]
            cached = min(core.pool.cached_prefix(ctx.block_keys or ()) * core.block_size, max(n - 1, 0))
            uncached.append(n - cached)
            prefill_s = (n - cached) / self.tps
            ttft = core.queued_prefill_tokens() / self.tps + prefill_s + p.decode_s_per_seq * len(core.running)
            batch = len(core.running) + len(core.waiting)
            decode = decode_cost(p.decode_s_per_seq, p.decode_s_per_ctx_token * self.scale, batch,
                                 core.context_tokens(), n, out, prefill_s)
            costs.append(ttft + self.decode_weight * decode)
        return Scores(costs, uncached)


@dataclass(slots=True)
class SimResult:
    policy: str
    requests: int
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    hit_rate: float
    wall_s: float
    virtual_s: float
    per_engine: list[int]
    tpot_mean_s: float = 0.0
    tpot_p50_s: float = 0.0
    tpot_p99_s: float = 0.0
    goodput: float = 0.0            # share of requests within both SLOs
    busiest_over_mean: float = 0.0  # the busiest engine's prompt tokens over the mean (1.0 = even)
    tier_hit_rate: float = 0.0      # share of prompt tokens loaded from DRAM/SSD/pool tiers
    load_s_total: float = 0.0       # time engines spent loading from the tiers
    pd: dict[str, Any] = field(default_factory=dict)  # P/D clusters: PdFlow.stats()
    ttft_p90_s: float = 0.0
    cpu_s: float = 0.0              # this process's CPU time for the run (a speed figure other load cannot skew)
    utilisation: float = 0.0        # engines' mean share of the run spent stepping

    def row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Slo:
    """Goodput counts requests with TTFT <= ``ttft_s`` and TPOT <= ``tpot_s``."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1

    @classmethod
    def for_profile(cls, p: TimingProfile, ttft_s: float = 2.0) -> Slo:
        """TPOT within 4x one stream's step on an idle engine."""
        return cls(ttft_s, 4 * (p.overhead_s + p.decode_s_per_seq))


class Cluster:
    def __init__(self, replicas: int, profile: TimingProfile, policy: str, block_size: int,
                 token_scale: float = 1.0, event_delay_s: float = 0.01, seed: int = 0, *,
                 routing: RoutingConfig | None = None, informed: bool = False, slo: Slo | None = None,
                 tiers: TierConfig | None = None, roles: list[Role] | None = None,
                 pd: PdConfig | None = None) -> None:
        self.profile = profile
        self.block_size = block_size
        self.event_delay_s = event_delay_s
        self.now = 0.0
        if roles is not None and len(roles) != replicas:
            raise ValueError(f"{len(roles)} roles for {replicas} replicas")
        self.backends = [SimBackend(name=f"e{i}", core=EngineCore(f"e{i}", profile, block_size, token_scale),
                                    role=roles[i] if roles else "both") for i in range(replicas)]
        self.by_name = {b.name: b for b in self.backends}
        self.tiers: TierSystem | None = None
        if tiers is not None and tiers.enabled:
            block_bytes = block_size * token_scale * profile.kv_bytes_per_token
            self.tiers = TierSystem(tiers, tier_profile(tiers.profile or profile.name), replicas, block_size,
                                    block_bytes)
            for i, b in enumerate(self.backends):
                b.core.tier = MachineView(self.tiers, self.tiers.machine_of(i))
        cfg = routing or RoutingConfig(prefix_block_size=block_size)
        # speculative entries expire in virtual time
        self.index = KvIndex("kvmesh", pending_ttl_s=cfg.speculative_ttl_s, clock=lambda: self.now)
        for source, readers, _ in self.tiers.readers if self.tiers else ():
            self.index.serve(source, readers)  # a node's events are applied once, not once per reader
        if informed:  # the profile's true figures, in simulated tokens, instead of learning them
            cfg = cfg.model_copy(update={
                "prefill_tps": profile.prefill_tps / token_scale, "decode_penalty_s": profile.decode_s_per_seq,
                "decode_s_per_seq": profile.decode_s_per_seq,
                "decode_s_per_ctx_token": profile.decode_s_per_ctx_token * token_scale})
        self.routing = cfg
        self.slo = slo or Slo.for_profile(profile)
        if policy == "oracle":
            oracle = OracleScorer(profile, token_scale, cfg.decode_weight)
            self.policy = Policy("oracle", [HealthyServingModel()], [(oracle, 1.0)], MinCostPicker(random.Random(seed)))
        else:
            self.policy = make_policy(policy, seed=seed, index=self.index, cfg=cfg)
        self.policy_name = policy
        pd = pd or PdConfig()
        self.pd = PdFlow(self, pd) if is_disaggregated(self.backends, pd.dynamic) else None
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self.done: list[SimRequest] = []
        # rid -> (routing context, the decision, tokens queued ahead, when forwarded)
        self._ctx: dict[int, tuple[RequestContext, Decision, int, float]] = {}
        self._give_up: Callable[[SimRequest], bool] | None = None
        self.gave_up = False
        self._arrivals: list[float] = []
        self._next_arrival = 0

    def _handle(self, now: float, kind: int, obj: Any) -> None:
        """One event off the heap (a subclass adds its own kinds and passes the rest here)."""
        if kind == _ARRIVE:
            self._arrive(now, obj)
        elif kind == _STEP_DONE:
            self._step_done(now, *obj)
        elif kind == _DELIVER:
            self._enqueue(now, *obj)
        else:
            for name in obj[0]:
                self.index.apply(name, obj[1])

    def _push(self, t: float, kind: int, obj: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, obj))

    def run(self, reqs: list[SimRequest], give_up: Callable[[SimRequest], bool] | None = None) -> SimResult:
        """Simulate ``reqs`` to the end, or until ``give_up`` (told of each finished request) says True."""
        t0, c0 = time.perf_counter(), time.process_time()
        for r in reqs:
            self._push(r.arrival, _ARRIVE, r)
        # A decode-only engine fast-forwards until the next arrival: only an arrival can add work to it (other
        # engines' steps and index deliveries cannot), and its routing signals stay fixed during the run.  Under
        # P/D a landing KV transfer adds work too, at a time not known when the run starts (the prefill leg may
        # still be running), so P/D clusters step one iteration at a time.
        self._arrivals = sorted(r.arrival for r in reqs)
        self._next_arrival = 0
        now = 0.0
        self._give_up = give_up
        self.gave_up = False
        while self._heap and not self.gave_up:
            now, _, kind, obj = heapq.heappop(self._heap)
            self.now = now
            self._handle(now, kind, obj)
        res = self._result(time.perf_counter() - t0, now)
        res.cpu_s = time.process_time() - c0
        return res

    def _arrive(self, now: float, r: SimRequest) -> None:
        self._next_arrival += 1
        ctx = RequestContext(request_id=str(r.rid), model="sim", endpoint="completions", token_ids=r.tokens,
                             prompt_tokens_estimate=len(r.tokens), block_keys=r.keys, max_tokens=r.max_tokens,
                             session_id=r.session)
        for c in self.backends:
            c.sync()
        spec = self.policy.key_spec(None)
        if self.policy.needs_tokens and (spec is None or spec[0] != self.block_size):
            ctx.block_keys = None  # the policy cuts its own keys (e.g. before it learned the block size)
        if self.pd is not None:
            self.pd.arrive(now, r, ctx)
            return
        d = self.policy.choose(ctx, self.backends)
        self.policy.on_routed(ctx, d)
        self.forward(now, r, ctx, d)

    def forward(self, now: float, r: SimRequest, ctx: RequestContext, d: Decision, enqueue: bool = True) -> None:
        """Commit ``r`` to ``d.backend`` as the gateway's forward stage does (its prefill tokens pending until
        its first token, one more in flight); the engine gets it now, or (``enqueue=False``) once
        :meth:`deliver_at` says its KV has arrived."""
        b: SimBackend = d.backend  # type: ignore[assignment]
        unc = len(r.tokens) if d.prefill_tokens is None else d.prefill_tokens
        b.pending_of[r.rid] = unc
        b.pending_prefill_tokens += unc
        b.in_flight += 1
        r.engine = b.name
        self._ctx[r.rid] = (ctx, d, b.pending_prefill_tokens - unc, now)
        if enqueue:
            self._enqueue(now, b, r)

    def deliver_at(self, t: float, b: SimBackend, r: SimRequest) -> None:
        """``r`` reaches ``b``'s queue at ``t`` (its KV transfer has landed)."""
        self._push(t, _DELIVER, (b, r))

    def _enqueue(self, now: float, b: SimBackend, r: SimRequest) -> None:
        b.core.add(r)
        if not b.stepping:
            self._step(now, b)

    def _step(self, now: float, b: SimBackend) -> None:
        b.stepping = True
        arr, i = self._arrivals, self._next_arrival
        horizon = now if self.pd is not None else arr[i] if i < len(arr) else math.inf
        res = b.core.step(now, horizon)
        b.busy_s += res.duration
        self._push(now + res.duration, _STEP_DONE, (b, res))

    def _step_done(self, now: float, b: SimBackend, res: StepResult) -> None:
        for r in res.first_tokens:
            unc = b.pending_of.pop(r.rid, 0)
            b.pending_prefill_tokens -= unc
            ctx, d, queued, sent = self._ctx[r.rid]
            self.policy.on_first_token(ctx, d, now - sent, queued)
        for r in res.finished:
            b.in_flight -= 1
            ctx, d, _, _ = self._ctx.pop(r.rid)
            self.policy.on_finished(ctx, d, r.done_at - r.first_token_at, r.generated)
            if self.pd is not None and self.pd.is_leg(r):
                self.pd.prefilled(now, r)
                continue
            self.done.append(r)
            if self._give_up is not None and self._give_up(r):
                self.gave_up = True
        events = b.core.pool.take_events()
        if events:
            self._push(now + self.event_delay_s, _EVENTS, ((b.name,), EventBatch(now, events)))
        if self.tiers is not None:
            for source, evs in self.tiers.take_events():
                self._push(now + self.event_delay_s, _EVENTS, ((source,), EventBatch(now, evs)))
        b.stepping = False
        if b.core.has_work():
            self._step(now, b)

    def _result(self, wall: float, end: float) -> SimResult:
        ttft = sorted(r.first_token_at - r.arrival for r in self.done)
        tpot = sorted(_tpot(r) for r in self.done)
        loaded = sum(b.core.tier_hits for b in self.backends)
        hits = sum(b.core.pool.hits for b in self.backends) + loaded
        queries = sum(b.core.pool.queries for b in self.backends)
        good = sum(1 for r in self.done if r.first_token_at - r.arrival <= self.slo.ttft_s
                   and _tpot(r) <= self.slo.tpot_s)
        load = [sum(len(r.tokens) for r in self.done if r.engine == b.name) for b in self.backends
                if b.role != "prefill"]  # requests are counted where they decode
        n = max(len(ttft), 1)
        return SimResult(self.policy_name, len(self.done), sum(ttft) / n, _q(ttft, 0.5), _q(ttft, 0.99),
                         hits / max(queries, 1), wall, end,
                         [sum(1 for r in self.done if r.engine == b.name) for b in self.backends],
                         sum(tpot) / n, _q(tpot, 0.5), _q(tpot, 0.99), good / n,
                         max(load, default=0) / max(sum(load) / max(len(load), 1), 1), loaded / max(queries, 1),
                         self.tiers.stats.seconds if self.tiers else 0.0,
                         self.pd.stats(end) if self.pd is not None else {}, _q(ttft, 0.9), 0.0,
                         sum(b.busy_s for b in self.backends) / max(len(self.backends) * end, 1e-9))


def _q(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0.0


def _tpot(r: SimRequest) -> float:
    """Mean time per output token after the first (0 for single-token answers)."""
    return (r.done_at - r.first_token_at) / (r.generated - 1) if r.generated > 1 else 0.0


def make_requests(prompts: list[list[int]], arrivals: list[float], outputs: list[int], block_size: int,
                  seed: int, sessions: list[str] | None = None) -> list[SimRequest]:
    sids = sessions or [""] * len(prompts)
    return [SimRequest(i, p, list(block_keys(p, block_size, seed)), max(1, o), a, session=s or None)
            for i, (p, a, o, s) in enumerate(zip(prompts, arrivals, outputs, sids, strict=True))]
