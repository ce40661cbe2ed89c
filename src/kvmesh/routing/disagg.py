"""Prefill/decode disaggregation: the decode-first decision, shared by the gateway and the simulator.

An engine has a :data:`Role`: ``prefill`` (computes prompts' KV and hands it on), ``decode`` (generates,
loading a prompt's KV another engine computed) or ``both`` (the default: aggregated serving).  A fleet with
no prefill-role engine is aggregated and never consults this module — unless ``PdConfig.dynamic`` is set:
then any engine may prefill for another (**dynamic P/D** over a ``both`` fleet).

The flow is decode-first, as llm-d does it:

1. pick the **decode engine** with the routing policy, over :func:`decode_side` (``decode`` and ``both``
   engines) — load, free KV and the prefix it already caches decide, as for any request;
2. :func:`decide` ranks the possible prefill engines (:func:`prefill_side`, less the decode engine; the
   policy's pick first, then by estimated queue) and describes each, and the decode engine, as an
   :class:`EngineLoad` built only from what the gateway knows: its learned prefill rate, the prompt tokens
   routed to it and not answered, its running streams (engine metrics) and its decode step (the cost
   model's fit);
3. :func:`plan_prefill` — pure: no I/O, no clock, no randomness — makes it a **cost decision**:

   - ``step = fitted decode step + step_overhead_s`` (the step's fixed cost, which the fit leaves out);
     ``backlog = (queued + uncached) / tps``: the prompt tokens already waiting to prefill on the decode
     engine, plus this one's;
   - ``local TTFT = backlog + step`` on the decode engine;
   - ``remote TTFT = queue there + what the prefill engine lacks / its tps + transfer + step``, the transfer
     being ``uncached * kv_bytes_per_token / bandwidth + latency``;
   - a local prefill freezes the decode engine's running streams behind the whole backlog (chunked prefill
     only spreads it over steps): it **stalls** them when they are running and ``step + backlog`` exceeds
     ``tpot_budget_s`` — that is what P/D protects.  Judging one prefill alone, without the queue before
     it or the fixed overhead, let bursts of ~2k-token prompts pile up on decode engines (Azure code);
   - (``decision = "threshold"`` instead sends every prompt past ``min_remote_prefill_tokens`` to the first
     unsaturated candidate: llm-d's rule, and what the handshake's tests pin);
   - remote when it protects stalled streams at a TTFT cost within the margin, or when it is faster than
     local by more than ``ttft_margin_s`` (the decode engine's own queue is long), on the first candidate
     not saturated (queue over ``max_prefill_queue_s``) that does not stall more stream-seconds there
     (``running * its prefill time``) than it saves here.  The margin is ``ttft_margin_s`` times the stall
     in TPOT budgets (``(step + backlog) / tpot_budget_s``, at least 1) on a candidate with no streams of
     its own (a dedicated prefill engine: the hop costs TTFT only, and a local prefill leaves the split's
     prefill pool idle while it slows every stream here), and none on one with streams (dynamic P/D: the
     stall only moves, so it must not cost TTFT too — with a flat 0.5 s, chat turns paid a hop for 1.4× the
     aggregated fleet's TTFT).  Short prompts (``min_remote_prefill_tokens``), well-cached ones
     and prompts on a lightly loaded decode engine (the step with the backlog fits the budget: no stall)
     and idle decode engines (nothing to stall, and no hop is free) stay local.

The result says why (:attr:`PrefillPlan.reason`), and callers count local prefills by reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from kvmesh.routing.base import Candidate, Decision, NoCandidate, Policy, RequestContext

Role = Literal["prefill", "decode", "both"]
DecisionRule = Literal["cost", "threshold"]
ROLES: tuple[Role, ...] = get_args(Role)

# PrefillPlan.reason values
REMOTE = "remote"
SHORT_PROMPT = "short_prompt"          # too few uncached tokens on the decode engine: local prefill is cheaper
NO_PREFILL_ENGINE = "no_prefill_engine"  # no healthy prefill-role engine serves the model
PREFILL_SATURATED = "prefill_saturated"  # every prefill engine's queue is too long
NO_STALL = "no_stall"                  # the local prefill stalls no stream beyond the budget, and is not slower
REMOTE_SLOWER = "remote_slower"        # it would stall streams, but remote costs more TTFT than the margin
NO_GAIN = "no_gain"                    # every prefill engine would stall at least as many stream-seconds
DISABLED = "disabled"                  # P/D switched off in the config
LOCAL_REASONS = (SHORT_PROMPT, NO_PREFILL_ENGINE, PREFILL_SATURATED, NO_STALL, REMOTE_SLOWER, NO_GAIN, DISABLED)

T = TypeVar("T")
GB = 1e9


@dataclass(frozen=True, slots=True)
class PdConfig:
    """The decision's knobs (``[gateway.pd]`` in the config; the simulator builds one directly)."""

    enabled: bool = True
    min_remote_prefill_tokens: int = 256  # uncached prompt tokens on the decode engine below which it prefills
    max_prefill_queue_s: float = 2.0      # a prefill engine with a longer estimated queue is saturated
    prefill_timeout_s: float = 30.0       # the remote-prefill leg's limit; past it the decode engine prefills
    tpot_budget_s: float = 0.05           # a decode step longer than this, with the prefill in it, is a stall
    ttft_margin_s: float = 0.5            # TTFT a remote prefill may cost to protect stalled streams
    dynamic: bool = False                 # any engine may prefill for another (a ``both`` fleet's P/D)
    decision: DecisionRule = "cost"          # "threshold": remote from min_remote_prefill_tokens, whatever the load
    kv_bytes_per_token: float = 128 * 1024  # KV moved per uncached token (Llama-3-8B bf16)
    transfer_gbps: float = 25.0           # GB/s between a prefill and a decode engine
    transfer_latency_s: float = 0.001     # per transfer, with the second hop
    step_overhead_s: float = 0.008        # a decode step's fixed cost (H100 / Llama-3-8B); the fit omits it

    def transfer_s(self, tokens: int) -> float:
        return self.transfer_latency_s + tokens * self.kv_bytes_per_token / (self.transfer_gbps * GB)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the decision knows of one engine: the prompt tokens it would compute for this request, the
    prompt tokens routed to it and not yet answered, its prefill rate (tokens/s), the streams decoding there
    and its decode step (seconds, without any prefill in it)."""

    name: str
    uncached_tokens: int
    queued_tokens: int
    prefill_tps: float
    running: int = 0
    step_s: float = 0.0

    @property
    def queue_s(self) -> float:
        return queue_s(self.queued_tokens, self.prefill_tps)

    @property
    def prefill_s(self) -> float:
        return queue_s(self.uncached_tokens, self.prefill_tps)


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


def prefill_side(backends: Sequence[T], dynamic: bool = False) -> list[T]:
    """The engines a remote prefill may run on: ``prefill`` ones, and (``dynamic``) ``both`` ones too."""
    return [b for b in backends if role_of(b) == "prefill" or (dynamic and role_of(b) == "both")]


def is_disaggregated(backends: Sequence[object], dynamic: bool = False) -> bool:
    """Whether the P/D stage runs: a prefill-role engine, or (``dynamic``) two engines that may prefill."""
    return any(role_of(b) == "prefill" for b in backends) or (dynamic and len(prefill_side(backends, True)) > 1)


def queue_s(pending_prefill_tokens: int, prefill_tps: float) -> float:
    """Prompt tokens at a prefill throughput (tokens/s), in seconds (an engine's estimated queue)."""
    return pending_prefill_tokens / prefill_tps if prefill_tps > 0 else 0.0


def local_reason(uncached_tokens: int, cfg: PdConfig) -> str | None:
    """Why the decode engine prefills itself whatever the engines' state (disabled, short prompt), else
    None.  Callers check it first to skip scoring the prefill engines for most chat turns."""
    if not cfg.enabled:
        return DISABLED
    if uncached_tokens < cfg.min_remote_prefill_tokens:
        return SHORT_PROMPT
    return None


def plan_prefill(decode: EngineLoad, candidates: Sequence[EngineLoad], cfg: PdConfig) -> PrefillPlan:
    """Decide where the prompt's prefill runs, once the decode engine is chosen (the module docstring's
    cost rule).  ``decode``: the chosen decode engine (its ``uncached_tokens`` are what a local prefill
    computes and a remote one moves).  ``candidates``: the possible prefill engines, best first.  Returns a
    remote plan on the first candidate that pays, else a local plan with the reason: disabled, short
    prompt, no prefill engine, all saturated, no stall (local is fine), remote slower than the margin
    allows (the margin grows with the stall, see the module docstring), or no gain (the candidates would
    stall as much)."""
    reason = local_reason(decode.uncached_tokens, cfg)
    if reason is not None:
        return PrefillPlan(False, None, reason)
    if not candidates:
        return PrefillPlan(False, None, NO_PREFILL_ENGINE)
    if cfg.decision == "threshold":  # llm-d's rule: every long prompt goes to the first unsaturated engine
        return next((PrefillPlan(True, c.name, REMOTE) for c in candidates if c.queue_s <= cfg.max_prefill_queue_s),
                    PrefillPlan(False, None, PREFILL_SATURATED))
    step = decode.step_s + cfg.step_overhead_s
    backlog = decode.queue_s + decode.prefill_s  # what already waits to prefill there, and this prompt
    local_ttft = backlog + step
    stalls = decode.running > 0 and step + backlog > cfg.tpot_budget_s
    saved = decode.running * decode.prefill_s if stalls else 0.0  # stream-seconds a remote prefill spares
    # the worse the stall (in TPOT budgets), the more TTFT sparing it is worth, where no stream pays instead
    spared_margin = cfg.ttft_margin_s * max(1.0, (step + backlog) / cfg.tpot_budget_s)
    transfer = cfg.transfer_s(decode.uncached_tokens)
    reason = PREFILL_SATURATED
    for c in candidates:
        if c.queue_s > cfg.max_prefill_queue_s:
            continue
        remote_ttft = c.queue_s + c.prefill_s + transfer + step
        if remote_ttft + cfg.ttft_margin_s < local_ttft:  # the decode engine's own queue is the longer wait
            return PrefillPlan(True, c.name, REMOTE)
        if not stalls:
            return PrefillPlan(False, None, NO_STALL)
        if remote_ttft > local_ttft + (spared_margin if c.running == 0 else 0.0):
            reason = REMOTE_SLOWER
            continue
        if c.running > 0 and c.running * c.prefill_s >= saved:
            reason = NO_GAIN
            continue
        return PrefillPlan(True, c.name, REMOTE)
    return PrefillPlan(False, None, reason)


def engine_load(policy: Policy, b: Candidate, uncached: int, default_tps: float) -> EngineLoad:
    """``b`` as the decision sees it: the kv-aware cost model's learned prefill rate and fitted decode step
    (``default_tps`` and no step for other policies), its running streams (the engine's metric, else what the
    gateway has in flight there; none on a prefill-role engine) and the prompt tokens routed to it and not
    answered."""
    model = getattr(policy, "model", None)
    # a prefill-role engine runs only prefill legs: no stream of its own to stall
    running = 0 if role_of(b) == "prefill" else b.running if b.running >= 0 else b.in_flight
    if model is None:
        return EngineLoad(b.name, uncached, b.pending_prefill_tokens, default_tps, running)
    per_seq, per_ctx = model.decode_coeffs(b.name)
    ledger = getattr(getattr(policy, "scorer", None), "ledger", None)
    active = ledger.active.get(b.name, 0) if ledger is not None else 0
    return EngineLoad(b.name, uncached, b.pending_prefill_tokens, model.tps(b.name), running,
                      per_seq * running + per_ctx * active)


def decide(policy: Policy, ctx: RequestContext, d: Decision, backends: Sequence[Candidate], cfg: PdConfig,
           default_tps: float) -> PrefillPlan:
    """The P/D stage's decision for ``ctx``, routed to decode on ``d.backend``, over the live ``backends``
    — the one ranking the gateway and the simulator share.  The candidates are :func:`prefill_side`'s
    healthy engines serving the model, less the decode engine; the policy's pick among them comes first
    (with the uncached tokens it scored there), then the rest by estimated queue (the whole prompt to
    compute).  Calls ``policy.choose`` (which may draw from the policy's random tie-breaker); no I/O."""
    uncached = d.prefill_tokens if d.prefill_tokens is not None else ctx.prompt_tokens_estimate
    cfg_reason = local_reason(uncached, cfg)
    if cfg_reason is not None:  # most chat turns stop here, unscored
        return PrefillPlan(False, None, cfg_reason)
    me = d.backend.name
    pool = [b for b in prefill_side(backends, cfg.dynamic)
            if b.healthy and b.name != me and (not b.models or ctx.model in b.models)]
    first, first_unc = None, ctx.prompt_tokens_estimate
    if pool:
        try:
            pick = policy.choose(ctx, pool)
            first = pick.backend.name
            first_unc = pick.prefill_tokens if pick.prefill_tokens is not None else first_unc
        except NoCandidate:
            pass
    loads = [engine_load(policy, b, first_unc if b.name == first else ctx.prompt_tokens_estimate, default_tps)
             for b in pool]
    ranked = sorted(loads, key=lambda e: (e.name != first, e.queue_s))
    return plan_prefill(engine_load(policy, d.backend, uncached, default_tps), ranked, cfg)
