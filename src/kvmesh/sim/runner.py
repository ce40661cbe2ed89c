"""Run a trace through the virtual-time simulator under several policies (``kvmesh sim``)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from kvmesh.config import RoutingConfig
from kvmesh.index.hashing import block_keys, root_seed
from kvmesh.routing.disagg import Role
from kvmesh.sim.cluster import Cluster, SimResult, make_requests
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.tiers import TierConfig
from kvmesh.workloads import MOONCAKE_BLOCK, TraceRequest, infinite_cache_hit_rate, load_trace, mooncake_prompt

DEFAULT_POLICIES = ("round-robin", "least-request", "random", "prefix", "session", "kv-aware", "oracle")


@dataclass(slots=True)
class TraceRun:
    results: list[SimResult]
    trace_span_s: float
    requests: int
    ceiling_block_hit: float
    ceiling_token_hit: float


def run_mooncake(path: str | pathlib.Path, replicas: int = 8, policies: tuple[str, ...] = DEFAULT_POLICIES,
                 profile: str = "h100-llama3-8b", tokens_per_block: int = 16, limit: int | None = None,
                 event_delay_s: float = 0.01, fmt: str = "mooncake", routing: RoutingConfig | None = None,
                 informed: bool = False, tiers: TierConfig | None = None, roles: list[Role] | None = None) -> TraceRun:
    """Raises ``TraceError`` for an unreadable trace and ``ValueError`` for an unknown profile/policy."""
    return run_requests(load_trace(path, fmt, limit), replicas, policies, profile, tokens_per_block,
                        event_delay_s, routing, informed, tiers, roles)


def run_requests(reqs: list[TraceRequest], replicas: int = 8, policies: tuple[str, ...] = DEFAULT_POLICIES,
                 profile: str = "h100-llama3-8b", tokens_per_block: int = 16, event_delay_s: float = 0.01,
                 routing: RoutingConfig | None = None, informed: bool = False,
                 tiers: TierConfig | None = None, roles: list[Role] | None = None) -> TraceRun:
    """Every policy over the same requests (trace blocks scaled to ``tokens_per_block`` tokens), with the
    cache tiers ``tiers`` describes (None: GPU prefix caches only) and the engines' P/D ``roles`` (None: all
    ``both``)."""
    prof = get_profile(profile)
    prompts = [mooncake_prompt(r, tokens_per_block) for r in reqs]
    scale = MOONCAKE_BLOCK / tokens_per_block
    seed = root_seed("kvmesh")
    results = []
    for policy in policies:
        sim = make_requests(prompts, [r.arrival_s for r in reqs], [r.output_tokens for r in reqs],
                            tokens_per_block, seed, [r.session for r in reqs])
        cluster = Cluster(replicas, prof, policy, tokens_per_block, scale, event_delay_s, routing=routing,
                          informed=informed, tiers=tiers, roles=roles)
        results.append(cluster.run(sim))
    block_hit, token_hit = infinite_cache_hit_rate(reqs)
    span = reqs[-1].arrival_s - reqs[0].arrival_s if reqs else 0.0
    return TraceRun(results, span, len(reqs), block_hit, token_hit)


def markdown(run: TraceRun) -> str:
    lines = ["| policy | TTFT mean | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | goodput | hit rate | busiest/mean "
             "| sim wall | speed-up |", "| --- " * 11 + "|"]
    for r in run.results:
        lines.append(f"| {r.policy} | {r.ttft_mean_s * 1000:.0f} ms | {r.ttft_p50_s * 1000:.0f} ms | "
                     f"{r.ttft_p99_s * 1000:.0f} ms | {r.tpot_p50_s * 1000:.1f} ms | {r.tpot_p99_s * 1000:.1f} ms | "
                     f"{r.goodput:.3f} | {r.hit_rate:.3f} | {r.busiest_over_mean:.2f} | {r.wall_s:.1f} s | "
                     f"{r.virtual_s / max(r.wall_s, 1e-9):.0f}x |")
    lines.append(f"\nInfinite shared cache ceiling: {run.ceiling_token_hit:.3f} of tokens "
                 f"({run.ceiling_block_hit:.3f} of blocks); {run.requests} requests over {run.trace_span_s:.0f} s.")
    return "\n".join(lines)


def sim_ceiling_hit(reqs: list[TraceRequest], tokens_per_block: int = 16) -> float:
    """The hit rate of one unbounded cache shared by every engine, counted as the simulator counts hits
    (whole blocks of the chained prefix, the last prompt token always computed): what tiers can reach."""
    seed, seen = root_seed("kvmesh"), set()
    hit = total = 0
    for r in reqs:
        p = mooncake_prompt(r, tokens_per_block)
        keys = list(block_keys(p, tokens_per_block, seed))
        n = 0
        for k in keys[:(len(p) - 1) // tokens_per_block]:
            if k not in seen:
                break
            n += 1
        hit, total = hit + n * tokens_per_block, total + len(p)
        seen.update(keys)
    return hit / max(total, 1)
