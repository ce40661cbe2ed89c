"""Mooncake conversation trace, N simulated replicas, virtual time: every kvmesh policy and the oracle.

Uses kvmesh's real policy objects and KV index (see ``kvmesh.sim``); GPU-class timing profile
(Llama-3-8B on H100).  The policies start from the gateway's default cost model and learn online; the
oracle minimises TTFT + decode cost with exact state.  Reports TTFT and TPOT p50/p99, goodput (TTFT
<= 2 s and TPOT <= 4x an idle step) and load spread.  Prints the table and writes
``bench/results/sim_mooncake.json``.

    python bench/sim_mooncake.py [--trace ../shared/traces/mooncake/conversation_trace.jsonl --replicas 8]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.sim.runner import DEFAULT_POLICIES, markdown, run_mooncake

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
DEFAULT_TRACE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"


def _from(result: str, key: str) -> object:
    """A metric of another benchmark's result file (``bench/compare_routers.py``, ``bench/sim_fidelity.py``)."""
    path = pathlib.Path(__file__).parent / "results" / f"{result}.json"
    try:
        return json.loads(path.read_text())["metrics"].get(key)
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=pathlib.Path, default=DEFAULT_TRACE)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--profile", default="h100-llama3-8b")
    ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--format", default="mooncake", help="mooncake, azure or weka (a directory of conversations)")
    ap.add_argument("--name", default="sim_mooncake", help="result file name under bench/results")
    args = ap.parse_args()
    if not args.trace.exists():
        sys.exit(f"trace not found: {args.trace} (the Mooncake trace lives in ../shared/traces/, see its README)")
    run = run_mooncake(args.trace, args.replicas, DEFAULT_POLICIES, args.profile, args.tokens_per_block, args.limit,
                       fmt=args.format)
    print(markdown(run))
    by = {r.policy: r for r in run.results}
    kv, rr, oracle = by["kv-aware"], by["round-robin"], by["oracle"]
    metrics: dict[str, object] = {
        "trace_format": args.format, "replicas": args.replicas, "profile": args.profile, "requests": run.requests,
        "tokens_per_block": args.tokens_per_block,
        "kvaware_ttft_mean_over_rr": round(kv.ttft_mean_s / rr.ttft_mean_s, 3),
        "kvaware_ttft_mean_over_oracle": round(kv.ttft_mean_s / oracle.ttft_mean_s, 3),
        "kvaware_over_oracle": round(kv.ttft_mean_s / oracle.ttft_mean_s, 3),  # issue 19's name for the same
        "kvaware_tpot_p99_over_oracle": round(kv.tpot_p99_s / oracle.tpot_p99_s, 3) if oracle.tpot_p99_s else None,
        "kvaware_goodput_over_rr": round(kv.goodput / rr.goodput, 3) if rr.goodput else None,
        "oracle_objective": "TTFT + decode_weight x decode cost (kvmesh.routing.kv_aware.decode_cost)",
        "kvaware_hit_over_oracle": round(kv.hit_rate / oracle.hit_rate, 3) if oracle.hit_rate else None,
        "sim_speedup_x": round(run.trace_span_s / kv.wall_s, 1),
        # Measured by their own scripts (real time / real vLLM), copied here when their results exist.
        "kvaware_ttft_mean_over_sglang": _from("compare_routers", "kvaware_ttft_mean_over_sglang"),
        "kvaware_ttft_mean_over_sglang_chat": _from("compare_routers_chat", "kvaware_ttft_mean_over_sglang"),
        "sim_ttft_error_pct": _from("sim_fidelity", "sim_ttft_error_pct"),
        "ceiling_token_hit": round(run.ceiling_token_hit, 4),
        "policies": {r.policy: {"ttft_mean_ms": round(r.ttft_mean_s * 1000, 1),
                                "ttft_p50_ms": round(r.ttft_p50_s * 1000, 1),
                                "ttft_p99_ms": round(r.ttft_p99_s * 1000, 1), "hit_rate": round(r.hit_rate, 4),
                                "tpot_p50_ms": round(r.tpot_p50_s * 1000, 2),
                                "tpot_p99_ms": round(r.tpot_p99_s * 1000, 2), "goodput": round(r.goodput, 4),
                                "busiest_over_mean": round(r.busiest_over_mean, 3),
                                "wall_s": round(r.wall_s, 2), "requests_per_engine": r.per_engine}
                     for r in run.results},
    }
    print(f"\nkv-aware / round-robin mean TTFT x{metrics['kvaware_ttft_mean_over_rr']}; kv-aware / oracle mean TTFT "
          f"x{metrics['kvaware_ttft_mean_over_oracle']}; kv-aware hit / oracle hit "
          f"{metrics['kvaware_hit_over_oracle']}; simulator {metrics['sim_speedup_x']}x faster than real time")
    print(f"wrote {write_result(args.name, metrics)}")


if __name__ == "__main__":
    main()
