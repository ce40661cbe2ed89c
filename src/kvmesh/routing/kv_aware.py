"""KV-aware routing: send each request where its estimated time to first token is lowest.

For every candidate engine e:

    cost(e)    = queue(e) + prefill(e) + recompute_weight * (uncached(e) - min_e' uncached(e')) / tps(e)
    queue(e)   = pending_prefill_tokens(e) / tps(e) + decode_penalty * running(e)
    prefill(e) = (uncached_tokens(e) + cpu_tokens(e) * cpu_cost + storage_tokens(e) * storage_cost) / tps(e)

The first two terms estimate this request's time to first token.  The last charges the prefill work the
cluster would redo because the prefix is cached on another engine: without it, a burst sharing a long
prefix would spread out the moment the warm engine has anything queued (each one's TTFT alone is about
equal on a cold engine), recomputing the prefix everywhere and costing every later request capacity.

where the cached prefix comes from the :class:`KvIndex` (longest consecutive prefix; the engine's own cache
first, then blocks it can load from lower tiers, which cost a fraction of recomputing), ``tps(e)`` is the
engine's prefill throughput (configured, then learned online from observed TTFTs of requests that did not
queue), and ``pending_prefill_tokens`` counts prompt tokens the gateway has sent and not yet seen answered.
Because each routed request adds its uncached tokens to its engine's queue at once, a prefix shared by
every request (the Mooncake trace's first block) cannot pull them all to one replica: as soon as the warm
replica's queue costs more than the prefix saves, the next request goes elsewhere.

Degrades gracefully: no token ids (no tokenizer), no events yet (unknown block size) or an engine unknown
to the index all reduce to load-only scoring, and the reason is counted in ``kvmesh_routing_degraded_total``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from kvmesh.index.hashing import BlockKey, block_keys
from kvmesh.index.index import KvIndex
from kvmesh.routing.base import Candidate, Decision, Picker, Policy, RequestContext, Scorer, Scores
from kvmesh.routing.policies import HealthyServingModel, MinCostPicker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CostModel:
    prefill_tps: float = 4000.0       # prompt tokens/s per engine before anything is learned
    decode_penalty_s: float = 0.002   # extra wait per request already running on the engine
    cpu_load_cost: float = 0.1        # loading a token from a CPU tier costs this fraction of computing it
    storage_load_cost: float = 0.3
    recompute_weight: float = 0.5     # weight of prefill work redone elsewhere (see module docstring)
    learn: bool = True
    learn_alpha: float = 0.2
    learned_tps: dict[str, float] = field(default_factory=dict)

    def tps(self, name: str) -> float:
        return self.learned_tps.get(name, self.prefill_tps)

    def observe(self, name: str, uncached: int, ttft_s: float) -> None:
        """Fold one TTFT of a request that did not queue into ``name``'s throughput estimate."""
        if not self.learn or uncached < 64 or ttft_s <= 0:
            return
        sample = min(max(uncached / ttft_s, self.prefill_tps / 20), self.prefill_tps * 20)
        old = self.learned_tps.get(name, self.prefill_tps)
        self.learned_tps[name] = (1 - self.learn_alpha) * old + self.learn_alpha * sample


class KvCostScorer(Scorer):
    """Estimated TTFT in seconds per candidate (see the module docstring)."""

    name = "ttft_s"

    def __init__(self, index: KvIndex, model: CostModel, block_size: int | None = None,
                 degraded: Counter | None = None, policy: str = "") -> None:
        self.index = index
        self.model = model
        self.fixed_block_size = block_size
        self.degraded = degraded
        self.policy = policy

    def block_size(self) -> int | None:
        return self.fixed_block_size or self.index.block_size

    def keys(self, ctx: RequestContext) -> Sequence[BlockKey] | None:
        """The request's block keys: the gateway's (cut next to tokenisation), else cut here."""
        if ctx.block_keys is not None:
            return ctx.block_keys  # type: ignore[return-value]
        if ctx.token_ids is None:
            self._degrade("no_tokens")
            return None
        bs = self.block_size()
        if bs is None:
            self._degrade("no_block_size")
            return None
        return block_keys(ctx.token_ids, bs, self.index.seed)

    def _degrade(self, reason: str) -> None:
        if self.degraded is not None:
            self.degraded.labels(self.policy, reason).inc()

    def score(self, ctx: RequestContext, cands: list[Candidate], explain: bool = False) -> Scores:
        keys = self.keys(ctx)
        prompt = len(ctx.token_ids) if ctx.token_ids is not None else ctx.prompt_tokens_estimate
        bs = self.block_size() or 0
        matches = self.index.match(keys, [c.name for c in cands]) if keys else None
        if keys and matches is not None and not any(m.total for m in matches):
            self._degrade("cold")
        tiers = [(m.gpu * bs, m.cpu * bs, m.storage * bs) for m in matches] if matches else [(0, 0, 0)] * len(cands)
        # the engine always computes at least the prompt's last token
        uncached = [prompt - min(sum(t), max(prompt - 1, 0)) for t in tiers]
        best = min(uncached)
        mdl = self.model
        costs: list[float] = []
        for c, (_, cpu, st), unc in zip(cands, tiers, uncached, strict=True):
            tps = mdl.tps(c.name)
            queue_s = c.pending_prefill_tokens / tps + mdl.decode_penalty_s * max(c.in_flight, c.engine_queue)
            prefill_s = (unc + cpu * mdl.cpu_load_cost + st * mdl.storage_load_cost) / tps
            costs.append(queue_s + prefill_s + mdl.recompute_weight * (unc - best) / tps)
        why = ([self._explain(c, t, u, best, prompt) for c, t, u in zip(cands, tiers, uncached, strict=True)]
               if explain else None)  # asked for by /debug/route: built only then
        return Scores(costs, uncached, keys, why)

    def _explain(self, c: Candidate, tiers: tuple[int, int, int], unc: int, best: int,
                 prompt: int) -> dict[str, object]:
        mdl, tps = self.model, self.model.tps(c.name)
        queue_s = c.pending_prefill_tokens / tps + mdl.decode_penalty_s * max(c.in_flight, c.engine_queue)
        prefill_s = (unc + tiers[1] * mdl.cpu_load_cost + tiers[2] * mdl.storage_load_cost) / tps
        recompute_s = mdl.recompute_weight * (unc - best) / tps
        return {"backend": c.name, "matched_tokens": dict(zip(("GPU", "CPU", "STORAGE"), tiers, strict=True)),
                "prompt_tokens": prompt, "uncached_tokens": unc, "in_flight": c.in_flight,
                "pending_prefill_tokens": c.pending_prefill_tokens, "engine_queue": c.engine_queue,
                "prefill_tps": round(tps, 1), "queue_s": queue_s, "prefill_s": prefill_s,
                "recompute_s": recompute_s, "cost_s": queue_s + prefill_s + recompute_s}


class KvAwarePolicy(Policy):
    """``kv-aware`` (index fed by engine events) and ``prefix`` (index learned from routed prompts)."""

    needs_tokens = True

    def __init__(self, name: str, index: KvIndex, model: CostModel, *, learn_from_routing: bool = False,
                 learned_ttl_s: float = 600.0, block_size: int | None = None,
                 registry: CollectorRegistry | None = None, rng: random.Random | None = None) -> None:
        degraded = Counter("kvmesh_routing_degraded", "Requests a KV-aware policy scored on load only, by "
                           "reason (no_tokens, no_block_size, cold)", ["policy", "reason"],
                           registry=registry) if registry is not None else None
        self.scorer = KvCostScorer(index, model, block_size, degraded, name)
        super().__init__(name, [HealthyServingModel()], [(self.scorer, 1.0)], MinCostPicker(rng))
        self.index = index
        self.model = model
        self.learn_from_routing = learn_from_routing
        self.learned_ttl_s = learned_ttl_s

    def block_size(self) -> int | None:
        """Block size keys are cut at (learned from events, or fixed for ``prefix``); None until known."""
        return self.scorer.block_size()

    @property
    def event_index(self) -> KvIndex | None:
        # ``prefix`` learns its index from what it routes: engine events would feed nothing it reads.
        return None if self.learn_from_routing else self.index

    def key_spec(self, salt: str | None) -> tuple[int, int] | None:
        bs = self.block_size()
        return None if bs is None else (bs, self.index.seed_for(salt))

    def on_routed(self, ctx: RequestContext, d: Decision) -> None:
        if d.block_keys:
            ttl = self.learned_ttl_s if self.learn_from_routing else None
            self.index.add_pending(d.backend.name, d.block_keys, ttl)  # type: ignore[arg-type]

    def on_first_token(self, ctx: RequestContext, d: Decision, ttft_s: float, queued_tokens: int) -> None:
        if queued_tokens == 0 and d.prefill_tokens is not None:
            self.model.observe(d.backend.name, d.prefill_tokens, ttft_s)


class SessionPicker(Picker):
    """Sticks a session (``x-session-id``) to the replica that served it, unless that replica is
    overloaded (more than ``slack`` requests above the least-loaded one); then re-pins by least load."""

    def __init__(self, max_sessions: int = 100_000, slack: int = 4, rng: random.Random | None = None) -> None:
        import collections

        self.pins: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.max_sessions = max_sessions
        self.slack = slack
        self.fallback = MinCostPicker(rng)
        self.repins = 0

    def pick(self, ctx: RequestContext, cands: list[Candidate], costs: list[float]) -> int:
        least = self.fallback.pick(ctx, cands, [float(c.in_flight) for c in cands])
        sid = ctx.session_id
        if sid is None:
            return least
        pinned = self.pins.get(sid)
        for i, c in enumerate(cands):
            if c.name == pinned and c.in_flight <= cands[least].in_flight + self.slack:
                self.pins.move_to_end(sid)
                return i
        if pinned is not None:
            self.repins += 1
        self.pins[sid] = cands[least].name
        self.pins.move_to_end(sid)
        if len(self.pins) > self.max_sessions:
            self.pins.popitem(last=False)
        return least
