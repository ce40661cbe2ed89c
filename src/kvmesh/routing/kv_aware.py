"""KV-aware routing: send each request where it costs the fleet least — its own time to first token, the
prefill work the fleet would redo, and the decode slowdown it causes and suffers.

For every candidate engine e (all terms in seconds; ``tps(e)`` is its prefill throughput):

    cost(e)      = queue(e) + prefill(e) + recompute(e) + decode(e) + kv_pressure(e)
    queue(e)     = pending_prefill_tokens(e) / tps(e) + decode_penalty * running(e)
    prefill(e)   = (uncached(e) + cpu_tokens(e) * cpu_cost + storage_tokens(e) * storage_cost) / tps(e)
    recompute(e) = (recompute_weight + saturation_weight * sat) * (uncached(e) - min_e' uncached(e')) / tps(e)
    sat          = q / (q + prompt / tps),  q = min_e' pending_prefill_tokens(e') / tps(e')
    decode(e)    = decode_weight * (L * (a_e * 2 * R + b_e * (K + R * (prompt + L / 2)))  +  R * prefill(e))
    kv_pressure  = kv_pressure_s * max(0, kv_usage(e) - kv_high) / (1 - kv_high)
    balance(e)   = session_balance * (live_sessions(e) - base) * turns * min_e' uncached(e') / tps(e)
                   (requests with a session: a new one, base = min_e' live_sessions(e') and turns = expected
                   turns per session; a later turn moving off its engine h, base = live_sessions(h) - 1 and
                   turns = its turns left, at least one; 0 on h)

- **Queue and prefill** estimate this request's TTFT.  The cached prefix comes from the :class:`KvIndex`
  (longest consecutive prefix: the engine's own cache first, then blocks it can load from lower tiers).
- **Recompute** charges the prefill work redone because the prefix is cached elsewhere.  Its weight grows
  with the fleet's saturation ``sat`` (0 when some engine is idle, → 1 when even the shortest queue is long
  against this prompt's prefill): with slack, balance wins; when every engine has a queue, recomputing a
  prefix is capacity taken from every later request, and affinity wins.
- **Decode**: with R requests running on e (``max(in_flight, engine running)``) and K context tokens
  active there (prompt + expected output of what the policy routed and has not seen finish), adding this
  request of L expected output tokens lengthens each decode step by ``a_e + b_e * context`` for all of
  them, as the simulator's timing profile models a step; over L steps that is the time this stream loses
  to the others plus the time it costs them.  Its prefill also stalls the R running streams.  ``a_e``,
  ``b_e`` start from priors and are fitted online per engine from observed TPOT (``on_finished``).
- **KV pressure**: an engine near full KV space pays for the evictions and preemptions it would cause, and
  a request that does not fit waits there until running streams finish.  At 2 s (full) a Weka session kept
  extending its context on an engine whose KV a 15k-token decode filled and waited 145 s; at 10 s it moves
  (Weka, 4 engines: mean TTFT 305 → 198 ms; Mooncake unchanged).
- **Sessions as a prior**: a request whose session's previous turn went to e, and whose prompt extends
  that turn's, counts that turn's blocks as cached on e while the index has no event from e (an engine
  that publishes none, or whose stream has not started) — the cost model then decides whether moving
  the session is worth it.  Once e's events arrive they are the evidence: the index knows evictions, the
  prior does not (on the Weka traces, where one engine holds ~4 contexts, trusting the prior over the
  index cost 2.3x in mean TTFT).  And where sessions live predicts load to come: a new session is
  charged for each live session (a turn within ``session_live_s``) its engine has above the least, times
  the turns a session brings (learned from the sessions seen), so new conversations spread like sticky
  routing spreads them instead of piling onto the engines that first cached a shared system prompt (the
  busiest engine carried 4.3x the mean on the chat benchmark).  One turn's new work per live session was
  too little: a first turn of a few hundred tokens weighed less than recomputing the shared prompt
  elsewhere, and sessions still piled up where it was cached.  A later turn that would move its session
  pays the same way for the live sessions its new engine has above its old one's (less itself), times the
  turns it has left: charging starts alone sent every new session to the engine the moves kept emptiest.

``tps(e)`` is configured, then learned online from every request's TTFT: the tokens queued ahead at
dispatch plus its own uncached tokens, over its TTFT (so queued time is accounted, not ignored); an
engine not measured yet is priced at the fleet's learned mean, not at the configured prior.
Degrades gracefully: no token ids, no events yet (unknown block size) or an engine unknown to the index
all reduce to load-only scoring, and the reason is counted in ``kvmesh_routing_degraded_total``.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from kvmesh.index.hashing import BlockKey, block_keys
from kvmesh.index.index import KvIndex
from kvmesh.routing.base import Candidate, Decision, Picker, Policy, RequestContext, Scorer, Scores
from kvmesh.routing.policies import HealthyServingModel, MinCostPicker

log = logging.getLogger(__name__)

_KTOK = 1000.0  # the fit counts context in thousands of tokens, so its three regressors have similar scales


class DecodeFit:
    """Online fit of one engine's decode step, ``tpot = c0 + a * R + b * K`` (R requests running, K active
    context tokens at dispatch), from observed TPOTs: exponentially weighted least squares with a ridge
    pulling ``a`` and ``b`` towards the priors, so sparse or flat data leaves the priors standing."""

    def __init__(self, a0: float, b0: float, forget: float = 0.99, ridge: float = 4.0) -> None:
        self.prior = np.array([0.0, a0, b0 * _KTOK])
        self.forget, self.ridge = forget, ridge
        self.xtx = np.zeros((3, 3))
        self.xty = np.zeros(3)
        self.n = 0.0
        self.fitted = (a0, b0)  # read on every routing decision: solved once per observation, not per read

    def add(self, running: int, active: int, tpot_s: float) -> None:
        x = np.array([1.0, float(running), active / _KTOK])
        self.xtx = self.forget * self.xtx + np.outer(x, x)
        self.xty = self.forget * self.xty + x * tpot_s
        self.n = self.forget * self.n + 1
        self.fitted = self._solve()

    def coeffs(self) -> tuple[float, float]:
        """(a, b): seconds per running request and per active context token."""
        return self.fitted

    def _solve(self) -> tuple[float, float]:
        if self.n < 4:
            return float(self.prior[1]), float(self.prior[2]) / _KTOK
        reg = np.diag([1e-9, self.ridge, self.ridge])  # `ridge` pseudo-observations at unit load each
        try:
            c = np.linalg.solve(self.xtx + reg, self.xty + reg @ self.prior)
        except np.linalg.LinAlgError:
            return float(self.prior[1]), float(self.prior[2]) / _KTOK
        return max(float(c[1]), 0.0), max(float(c[2]), 0.0) / _KTOK


@dataclass(slots=True)
class CostModel:
    prefill_tps: float = 4000.0       # prompt tokens/s per engine before anything is learned
    decode_penalty_s: float = 0.002   # extra wait before the first token per request running on the engine
    cpu_load_cost: float = 0.1        # loading a token from a CPU tier costs this fraction of computing it
    storage_load_cost: float = 0.3
    recompute_weight: float = 0.5     # weight of prefill work redone elsewhere, fleet idle
    saturation_weight: float = 4.0    # added to it as the fleet saturates (see module docstring)
    decode_weight: float = 0.2        # seconds of TTFT worth one second of decode time (this stream + others)
    decode_s_per_seq: float = 1e-4    # prior: decode step time per running request
    decode_s_per_ctx_token: float = 2e-8  # prior: decode step time per active context token
    kv_pressure_s: float = 10.0       # at full KV a request waits for running streams to finish: seconds to minutes
    kv_high: float = 0.8
    output_tokens: int = 128          # expected output when the request does not say (then learned)
    session_prior: bool = True
    session_balance: float = 1.0      # a new session pays this x its prefill per live session above the least
    session_live_s: float = 120.0     # a session with no turn for this long no longer counts as live
    session_turns: float = 4.0        # prior: turns a session brings (then learned from the sessions seen)
    learn: bool = True
    learn_alpha: float = 0.2
    learned_tps: dict[str, float] = field(default_factory=dict)
    fits: dict[str, DecodeFit] = field(default_factory=dict)
    mean_output: float = 0.0
    fleet_tps: float = 0.0            # mean of the learned throughputs (the configured one until any is)

    def tps(self, name: str) -> float:
        """``name``'s learned prefill throughput; the fleet's mean for an engine not measured yet.  (Not the
        configured prior: the engines measured first would look faster or slower than their peers only
        because they were measured — on the chat benchmark, the first two engines to serve learned ~6,500
        tokens/s against the 4,000 prior and drew the first 11 sessions between them.)"""
        got = self.learned_tps.get(name)
        return got if got is not None else (self.fleet_tps or self.prefill_tps)

    def decode_coeffs(self, name: str) -> tuple[float, float]:
        """(a, b) of ``name``'s decode step: the priors until fitted from its observed TPOTs."""
        fit = self.fits.get(name)
        return fit.coeffs() if fit is not None else (self.decode_s_per_seq, self.decode_s_per_ctx_token)

    def expected_output(self, max_tokens: int | None) -> int:
        learned = round(self.mean_output) if self.mean_output > 0 else self.output_tokens
        return max(1, min(max_tokens, 4 * learned) if max_tokens else learned)

    def observe(self, name: str, tokens: int, ttft_s: float) -> None:
        """Fold one TTFT into ``name``'s throughput estimate: ``tokens`` is what the engine had to prefill
        before this request's first token (the tokens queued ahead at dispatch plus its own uncached)."""
        if not self.learn or tokens < 64 or ttft_s <= 0:
            return
        sample = min(max(tokens / ttft_s, self.prefill_tps / 50), self.prefill_tps * 20)
        old = self.tps(name)
        self.learned_tps[name] = (1 - self.learn_alpha) * old + self.learn_alpha * sample
        self.fleet_tps = sum(self.learned_tps.values()) / len(self.learned_tps)

    def observe_decode(self, name: str, running: int, active: int, tpot_s: float, output: int) -> None:
        """One finished stream: its mean TPOT at the load it was dispatched into; and its output length."""
        if not self.learn:
            return
        self.mean_output = output if self.mean_output <= 0 else 0.95 * self.mean_output + 0.05 * output
        if tpot_s > 0:
            fit = self.fits.get(name)
            if fit is None:
                fit = self.fits[name] = DecodeFit(self.decode_s_per_seq, self.decode_s_per_ctx_token)
            fit.add(running + 1, active, tpot_s)


@dataclass(slots=True)
class _Routed:
    """What the policy remembers of a request in flight (to settle its load and learn when it ends)."""

    engine: str
    tokens: int
    running: int
    active: int


class Ledger:
    """Per engine: context tokens of the requests this policy routed there and has not seen finish, and
    the live sessions there (a turn within ``live_s``); per session: where its last turn went, when, and
    how many blocks that turn's prompt had (with its last key)."""

    def __init__(self, max_sessions: int = 100_000, max_routed: int = 100_000, live_s: float = 120.0) -> None:
        self.active: dict[str, int] = collections.defaultdict(int)
        self.routed: collections.OrderedDict[int, tuple[Decision, _Routed]] = collections.OrderedDict()
        # session -> (engine, blocks, last key, last seen, turns so far), least recently seen first
        self.sessions: collections.OrderedDict[str, tuple[str, int, int, float, int]] = collections.OrderedDict()
        self.live: dict[str, int] = collections.defaultdict(int)
        self.max_sessions, self.max_routed, self.live_s = max_sessions, max_routed, live_s
        self.starts = self.turns = 0  # sessions begun and turns seen: how many turns a session brings

    def expected_turns(self, prior: float, weight: float = 8.0) -> float:
        """Turns a new session will bring: the mean seen so far, pulled towards ``prior`` as if ``weight``
        sessions had shown it (sessions still running count their turns so far: a lower bound)."""
        return (weight * prior + self.turns) / (weight + self.starts)

    def start(self, d: Decision, r: _Routed) -> None:
        self.active[r.engine] += r.tokens
        self.routed[id(d)] = (d, r)  # the Decision is kept alive here, so its id stays unique
        if len(self.routed) > self.max_routed:  # a caller that never reports endings must not leak
            _, (_, old) = self.routed.popitem(last=False)
            self.active[old.engine] -= old.tokens

    def end(self, d: Decision) -> _Routed | None:
        got = self.routed.pop(id(d), None)
        if got is None:
            return None
        self.active[got[1].engine] -= got[1].tokens
        return got[1]

    def pin(self, session: str, engine: str, keys: Sequence[int], now: float) -> None:
        old = self.sessions.get(session)
        if old is not None:
            self.live[old[0]] -= 1
        self.starts, self.turns = self.starts + (old is None), self.turns + 1
        self.sessions[session] = (engine, len(keys), int(keys[-1]), now, old[4] + 1 if old is not None else 1)
        self.sessions.move_to_end(session)
        self.live[engine] += 1
        while self.sessions and (len(self.sessions) > self.max_sessions
                                 or next(iter(self.sessions.values()))[3] < now - self.live_s):
            _, gone = self.sessions.popitem(last=False)
            self.live[gone[0]] -= 1

    def more_turns(self, session: str | None, live: Sequence[int], names: Sequence[str],
                   prior_turns: float) -> list[float]:
        """Per candidate, the live sessions it would have above the balance this request keeps, times the
        turns still to come: what :attr:`CostModel.session_balance` charges for.  A new session: each
        engine's live sessions above the least, times the turns a session brings.  A session's later turn
        moving from its engine h: each other engine's live sessions above h's less this one, times the turns
        it has left (at least one).  Moves pay as starts do, or a start balanced onto the engine with the
        fewest live sessions is moved off again at its next turn, and that engine, kept the least loaded
        in sessions, draws every new one (on the chat benchmark one engine of 8 began 24 of 60 sessions)."""
        got = self.sessions.get(session) if session is not None else None
        expected = self.expected_turns(prior_turns)
        if got is None:
            low = min(live)
            return [(n - low) * expected for n in live]
        home = live[names.index(got[0])] - 1 if got[0] in names else min(live)
        left = max(expected - got[4], 1.0)
        return [0.0 if name == got[0] else max(n - home, 0) * left for n, name in zip(live, names, strict=True)]

    def prior(self, session: str | None, keys: Sequence[int]) -> tuple[str, int] | None:
        """(engine, blocks) the session's previous turn left there, if this prompt extends that turn's."""
        got = self.sessions.get(session) if session is not None else None
        if got is None or not keys or len(keys) < got[1] or int(keys[got[1] - 1]) != got[2]:
            return None
        return got[0], got[1]


def decode_cost(a: float, b: float, running: int, active: int, prompt: int, out: int, prefill_s: float) -> float:
    """Decode time (seconds, summed over streams) a request adds on an engine with ``running`` requests and
    ``active`` context tokens: each of its ``out`` steps is ``a * running + b * active`` longer than on an
    idle engine, each of the others' is ``a + b * context`` longer while it runs, and its prefill of
    ``prefill_s`` stalls them all."""
    return out * (2 * a * running + b * (active + running * (prompt + out / 2))) + running * prefill_s


@dataclass(slots=True)
class _Terms:
    """One candidate's cost, term by term (seconds)."""

    queue_s: float
    prefill_s: float
    recompute_s: float
    decode_s: float
    kv_s: float
    balance_s: float

    @property
    def total(self) -> float:
        return self.queue_s + self.prefill_s + self.recompute_s + self.decode_s + self.kv_s + self.balance_s


class KvCostScorer(Scorer):
    """The estimated cost in seconds per candidate (see the module docstring)."""

    name = "cost_s"

    def __init__(self, index: KvIndex, model: CostModel, block_size: int | None = None,
                 degraded: Counter | None = None, policy: str = "") -> None:
        self.index = index
        self.model = model
        self.ledger = Ledger(live_s=model.session_live_s)
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

    def tiers(self, ctx: RequestContext, keys: Sequence[BlockKey] | None,
              cands: list[Candidate]) -> list[tuple[int, int, int]]:
        """Matched prompt tokens per candidate by tier (GPU, CPU, STORAGE), the session prior applied."""
        bs = self.block_size() or 0
        matches = self.index.match(keys, [c.name for c in cands]) if keys else None
        if keys and matches is not None and not any(m.total for m in matches):
            self._degrade("cold")
        tiers = [(m.gpu * bs, m.cpu * bs, m.storage * bs) for m in matches] if matches else [(0, 0, 0)] * len(cands)
        prior = self.ledger.prior(ctx.session_id, keys) if self.model.session_prior and keys else None
        if prior is not None and bs and not self.hears(prior[0]):
            engine, n = prior[0], prior[1] * bs
            for i, c in enumerate(cands):
                g, cpu, st = tiers[i]
                if c.name == engine and g < n:  # the previous turn's blocks: on the GPU tier, where it ran
                    rest = max(g + cpu + st - n, 0)
                    tiers[i] = (n, min(cpu, rest), rest - min(cpu, rest))
        return tiers

    def hears(self, name: str) -> bool:
        """Whether ``name``'s KV events reach the index: then its evidence (evictions included) beats the
        session prior, which would keep claiming blocks the engine has since evicted."""
        e = self.index.engines.get(name)
        return e is not None and e.events > 0

    def score(self, ctx: RequestContext, cands: list[Candidate], explain: bool = False) -> Scores:
        keys = self.keys(ctx)
        prompt = ctx.prompt_tokens_estimate  # exact once tokenised (estimated past a lazy stop)
        tiers = self.tiers(ctx, keys, cands)
        # the engine always computes at least the prompt's last token
        uncached = [prompt - min(sum(t), max(prompt - 1, 0)) for t in tiers]
        mdl = self.model
        tps = [mdl.tps(c.name) for c in cands]
        q = min(c.pending_prefill_tokens / t for c, t in zip(cands, tps, strict=True))
        own = prompt / (sum(tps) / len(tps))
        sat = q / (q + own) if q > 0 else 0.0
        weight = mdl.recompute_weight + mdl.saturation_weight * sat
        out = mdl.expected_output(ctx.max_tokens)
        best = min(uncached)
        # a session sends more turns where it is: spread sessions like live sessions, not requests
        if ctx.session_id is not None and mdl.session_balance > 0:
            live = [self.ledger.live.get(c.name, 0) for c in cands]
            more = self.ledger.more_turns(ctx.session_id, live, [c.name for c in cands], mdl.session_turns)
        else:
            more = [0.0] * len(cands)
        terms = [self._terms(c, t, tier, unc, best, weight, prompt, out, m)
                 for c, t, tier, unc, m in zip(cands, tps, tiers, uncached, more, strict=True)]
        why = ([{"backend": c.name, "matched_tokens": dict(zip(("GPU", "CPU", "STORAGE"), tier, strict=True)),
                 "prompt_tokens": prompt, "uncached_tokens": unc, "in_flight": c.in_flight,
                 "pending_prefill_tokens": c.pending_prefill_tokens, "engine_queue": c.engine_queue,
                 "running": c.running, "kv_usage": c.kv_usage, "active_tokens": self.ledger.active.get(c.name, 0),
                 "prefill_tps": round(t, 1), "saturation": round(sat, 3), "expected_output": out,
                 "queue_s": tm.queue_s, "prefill_s": tm.prefill_s, "recompute_s": tm.recompute_s,
                 "decode_s": tm.decode_s, "kv_pressure_s": tm.kv_s, "live_sessions": self.ledger.live.get(c.name, 0),
                 "session_balance_s": tm.balance_s, "cost_s": tm.total}
                for c, t, tier, unc, tm in zip(cands, tps, tiers, uncached, terms, strict=True)]
               if explain else None)  # asked for by /debug/route: built only then
        return Scores([tm.total for tm in terms], uncached, keys, why)

    def _terms(self, c: Candidate, tps: float, tiers: tuple[int, int, int], unc: int, best: int,
               weight: float, prompt: int, out: int, more_turns: float) -> _Terms:
        mdl = self.model
        running = max(c.in_flight, c.running)
        queue_s = c.pending_prefill_tokens / tps + mdl.decode_penalty_s * max(c.in_flight, c.engine_queue)
        prefill_s = (unc + tiers[1] * mdl.cpu_load_cost + tiers[2] * mdl.storage_load_cost) / tps
        a, b = mdl.decode_coeffs(c.name)
        decode_s = mdl.decode_weight * decode_cost(a, b, running, self.ledger.active.get(c.name, 0), prompt, out,
                                                   prefill_s)
        kv_s = (mdl.kv_pressure_s * max(0.0, c.kv_usage - mdl.kv_high) / max(1 - mdl.kv_high, 1e-6)
                if c.kv_usage >= 0 else 0.0)
        # the work a session brings that no engine has cached yet, once per turn it is expected to bring:
        # where it starts hardly matters to a session that extends a long shared context (a sub-agent), and
        # much to one that is mostly new
        balance_s = mdl.session_balance * more_turns * best / tps
        return _Terms(queue_s, prefill_s, weight * (unc - best) / tps, decode_s, kv_s, balance_s)


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

    def holds(self, key: int) -> bool:
        return self.index.holds(key)

    def on_more_keys(self, ctx: RequestContext, d: Decision, keys: Sequence[int]) -> None:
        ttl = self.learned_ttl_s if self.learn_from_routing else None
        self.index.add_pending(d.backend.name, keys, ttl)  # type: ignore[arg-type]

    def on_routed(self, ctx: RequestContext, d: Decision) -> None:
        b, ledger = d.backend, self.scorer.ledger
        if d.block_keys:
            ttl = self.learned_ttl_s if self.learn_from_routing else None
            self.index.add_pending(b.name, d.block_keys, ttl)  # type: ignore[arg-type]
            if ctx.session_id is not None:
                ledger.pin(ctx.session_id, b.name, d.block_keys, self.index.clock())
        prompt = ctx.prompt_tokens_estimate  # exact once tokenised (estimated past a lazy stop)
        ledger.start(d, _Routed(b.name, prompt + self.model.expected_output(ctx.max_tokens),
                                max(b.in_flight, b.running), ledger.active.get(b.name, 0)))

    def on_first_token(self, ctx: RequestContext, d: Decision, ttft_s: float, queued_tokens: int) -> None:
        if d.prefill_tokens is not None:
            self.model.observe(d.backend.name, queued_tokens + d.prefill_tokens, ttft_s)

    def on_finished(self, ctx: RequestContext, d: Decision, decode_s: float, output_tokens: int) -> None:
        r = self.scorer.ledger.end(d)
        if r is not None and output_tokens >= 3:
            self.model.observe_decode(r.engine, r.running, r.active, decode_s / (output_tokens - 1), output_tokens)


class SessionPicker(Picker):
    """Sticks a session (``x-session-id``) to the replica that served it, unless that replica is
    overloaded (more than ``slack`` requests above the least-loaded one); then re-pins by least load."""

    def __init__(self, max_sessions: int = 100_000, slack: int = 4, rng: random.Random | None = None) -> None:
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
