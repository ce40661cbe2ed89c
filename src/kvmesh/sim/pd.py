"""Prefill/decode disaggregation in the virtual-time simulator, decided by the gateway's own code.

A cluster whose engines include ``prefill``-role ones runs every arrival through the gateway's decode-first
flow (:mod:`kvmesh.gateway.pd`, with the pure decision of :mod:`kvmesh.routing.disagg`):

1. the routing policy picks the **decode engine** among :func:`decode_side` (``decode`` and ``both``), and the
   request is committed to it (``on_routed``), as the gateway's route stage does;
2. :func:`kvmesh.routing.disagg.decide` — the gateway's own ranking and cost decision — says whether a
   **remote prefill** pays (the tokens the decode engine would prefill, its running streams and decode step,
   the prefill engines' queues and rates, the profile's transfer figures); a local plan forwards the
   request to the decode engine.  With ``PdConfig.dynamic`` any ``both`` engine may prefill for another;
3. a remote plan sends the **prefill leg** (``max_tokens = 1``, no session) to the prefill engine, which runs
   it like any request — a prefill-role engine's batches hold only such legs, so they are prefill-only;
4. when the leg's token is out, the request is forwarded to the decode engine (no prefill pending there)
   and its KV **moves**: the tokens the decode engine does not cache itself, times the profile's
   ``kv_bytes_per_token``, over ``kv_transfer_gbps`` plus ``kv_transfer_latency_s``.  Each engine has one
   NIC: transfers into the same decode engine or out of the same prefill engine queue behind each other.
   The transfer is **not overlapped** with the prefill (layer-wise streaming would start it during the
   prefill and hide most of it): the conservative default;
5. the decode engine then admits the request with its KV in hand (``SimRequest.remote_kv``): the received
   blocks are cached and announced as ``BlockStored`` events, as vLLM does for blocks a connector loaded,
   and it computes the last prompt token in its next step — so TTFT = queue + prefill + transfer + the first
   decode step.

Not modelled: the prefill engine keeping the blocks referenced until the decode engine has read them
(vLLM's delayed free; they stay cached but evictable here), and the decode engine reserving blocks while
the transfer is in flight (here it allocates on admission, after it).  Not thread-safe; driven by the
cluster's event loop.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmesh.routing import Decision, RequestContext
from kvmesh.routing.disagg import REMOTE, PdConfig, PrefillPlan, decide, decode_side, role_of
from kvmesh.sim.core import SimRequest

if TYPE_CHECKING:
    from kvmesh.sim.cluster import Cluster, SimBackend

GB = 1e9


@dataclass(slots=True)
class Transfers:
    """KV transfers over each engine's one NIC (``gbps`` GB/s, ``latency_s`` per transfer)."""

    gbps: float
    latency_s: float
    free_at: dict[str, float] = field(default_factory=dict)  # engine -> when its NIC is free again
    count: int = 0
    bytes: float = 0.0
    seconds: list[float] = field(default_factory=list)       # per transfer, from ready to landed

    def start(self, now: float, src: str, dst: str, nbytes: float) -> float:
        """When ``nbytes`` sent from ``src`` at ``now`` (or once either NIC is free) have landed on ``dst``."""
        begin = max(now, self.free_at.get(src, 0.0), self.free_at.get(dst, 0.0))
        end = begin + self.latency_s + nbytes / (self.gbps * GB)
        self.free_at[src] = self.free_at[dst] = end
        self.count += 1
        self.bytes += nbytes
        self.seconds.append(end - now)
        return end


@dataclass(slots=True)
class _Leg:
    """A remote prefill in flight: the client's request, its routing context and decode decision."""

    req: SimRequest
    ctx: RequestContext
    decode: Decision
    prefill_engine: str


class PdFlow:
    """The decode-first flow of one simulated cluster (its ``pd`` attribute when some engine prefills)."""

    def __init__(self, cluster: Cluster, cfg: PdConfig) -> None:
        self.cluster = cluster
        self.cfg = cfg
        scale = cluster.backends[0].core.scale if cluster.backends else 1.0
        p = cluster.profile
        # the threshold is in real tokens; routing sees simulated ones (``token_scale`` real tokens each); the
        # transfer's figures are the profile's
        self.sim_cfg = dataclasses.replace(
            cfg, min_remote_prefill_tokens=math.ceil(cfg.min_remote_prefill_tokens / scale),
            kv_bytes_per_token=p.kv_bytes_per_token * scale, transfer_gbps=p.kv_transfer_gbps,
            transfer_latency_s=p.kv_transfer_latency_s, step_overhead_s=p.overhead_s)
        self.decoders = decode_side(cluster.backends)
        if not self.decoders:
            raise ValueError("a P/D cluster needs at least one decode (or both) engine")
        self.transfers = Transfers(p.kv_transfer_gbps, p.kv_transfer_latency_s)
        self.bytes_per_token = p.kv_bytes_per_token * scale
        self.plans: collections.Counter[str] = collections.Counter()
        self._legs: dict[int, _Leg] = {}

    # ---- the gateway's stages ---------------------------------------------------------------------
    def arrive(self, now: float, r: SimRequest, ctx: RequestContext) -> None:
        """Route ``r`` decode-first, then prefill it remotely or forward it to its decode engine."""
        cl = self.cluster
        d = cl.policy.choose(ctx, self.decoders)
        cl.policy.on_routed(ctx, d)
        plan = self.plan(ctx, d)
        self.plans[plan.reason] += 1
        if not plan.remote or plan.engine is None:
            cl.forward(now, r, ctx, d)
            return
        leg = SimRequest(-(r.rid + 1), r.tokens, r.keys, 1, now, salt=r.salt)
        lctx = dataclasses.replace(ctx, session_id=None)  # the session's turns live on its decode engine
        ld = Decision(cl.by_name[plan.engine], policy=cl.policy.name, prefill_tokens=ctx.prompt_tokens_estimate,
                      block_keys=ctx.block_keys)
        cl.policy.on_routed(lctx, ld)
        self._legs[leg.rid] = _Leg(r, ctx, d, plan.engine)
        cl.forward(now, leg, lctx, ld)

    def plan(self, ctx: RequestContext, d: Decision) -> PrefillPlan:
        """The gateway's decision (``kvmesh.routing.disagg.decide``) over the simulated engines."""
        cl = self.cluster
        return decide(cl.policy, ctx, d, cl.backends, self.sim_cfg, cl.routing.prefill_tps)

    @staticmethod
    def is_leg(r: SimRequest) -> bool:
        return r.rid < 0

    def prefilled(self, now: float, leg: SimRequest) -> None:
        """The prefill leg answered: forward the request to its decode engine and move the KV there."""
        cl = self.cluster
        got = self._legs.pop(leg.rid)
        r, d = got.req, got.decode
        d.prefill_tokens = 0  # the decode engine loads the prompt: nothing to prefill in its queue
        cl.forward(now, r, got.ctx, d, enqueue=False)
        b: SimBackend = d.backend  # type: ignore[assignment]
        core = b.core
        local = min(core.pool.cached_prefix(r.keys) * core.block_size, len(r.tokens) - 1)
        nbytes = (len(r.tokens) - local) * self.bytes_per_token
        r.remote_kv = True
        cl.deliver_at(self.transfers.start(now, got.prefill_engine, b.name, nbytes), b, r)

    # ---- what it did ------------------------------------------------------------------------------
    def stats(self, end_s: float) -> dict[str, Any]:
        """Remote vs local prefills (by reason), the transfers, and each role's load."""
        t = self.transfers
        secs = sorted(t.seconds)
        local = {k: v for k, v in self.plans.items() if k != REMOTE}
        return {"remote_prefills": self.plans[REMOTE], "local_prefills": sum(local.values()),
                "local_by_reason": dict(sorted(local.items())), "transfers": t.count,
                "transfer_bytes": t.bytes, "transfer_mean_s": sum(secs) / max(len(secs), 1),
                "transfer_p99_s": secs[min(len(secs) - 1, int(0.99 * len(secs)))] if secs else 0.0,
                "kv_transfer_gbps": t.gbps, "transfer_overlaps_prefill": False,
                "roles": role_load(self.cluster.backends, end_s)}


def role_load(backends: Sequence[SimBackend], end_s: float) -> dict[str, dict[str, float]]:
    """Per role: engines, the share of time they spent stepping, and the prompt tokens they computed
    (neither found in their cache, nor loaded from a tier, nor received from a prefill engine)."""
    out: dict[str, dict[str, float]] = {}
    for b in backends:
        row = out.setdefault(role_of(b), {"engines": 0, "busy_s": 0.0, "computed_tokens": 0.0})
        c = b.core
        row["engines"] += 1
        row["busy_s"] += b.busy_s
        row["computed_tokens"] += (c.pool.queries - c.pool.hits - c.tier_hits - c.received) * c.scale
    for row in out.values():
        row["busy_share"] = row["busy_s"] / max(row["engines"] * end_s, 1e-9)
    return out
