"""What the cache tiers buy at cluster scale: the Mooncake conversation trace through the simulator, kv-aware.

Four configurations at each replica count, H100 / Llama-3-8B (128 KiB of KV per token), 8 GPUs per machine:
GPU prefix caches only; + each machine's DRAM tier (1 TB); + that DRAM pooled across machines (kvmesh's
ring); + pooled DRAM and an 8 TB NVMe tier per machine.  Load times follow the connector (synchronous, not
overlapped with compute): PCIe ~50 GB/s host→GPU, NVMe 7 GB/s, RDMA 25 GB/s between machines
(``kvmesh.sim.tiers``).  The ceiling is one unbounded cache shared by all, counted as the simulator counts
hits (``sim_ceiling_hit``); the trace's own token ceiling (``infinite_cache_hit_rate``) is reported beside it.
Prints the table and writes ``bench/results/sim_tiers.json``.

    python bench/sim_tiers.py [--replicas 8,32] [--trace DIR --format weka --name sim_tiers_weka]
    python bench/sim_tiers.py --load 3 --replicas 8 --name sim_tiers_load3   # a fleet the trace keeps busy
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.sim.cluster import SimResult
from kvmesh.sim.runner import run_requests, sim_ceiling_hit
from kvmesh.sim.tiers import TierConfig
from kvmesh.workloads import infinite_cache_hit_rate, load_trace

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
DEFAULT_TRACE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"
TB = 10**12


def configs(dram: int, ssd: int, per_machine: int) -> dict[str, TierConfig | None]:
    return {
        "gpu-only": None,
        "dram": TierConfig(engines_per_machine=per_machine, dram_bytes=dram),
        "pooled-dram": TierConfig(engines_per_machine=per_machine, dram_bytes=dram, pooled=True),
        "pooled-dram-ssd": TierConfig(engines_per_machine=per_machine, dram_bytes=dram, ssd_bytes=ssd, pooled=True),
    }


def _row(r: SimResult) -> dict[str, object]:
    return {"ttft_mean_ms": round(r.ttft_mean_s * 1000, 1), "ttft_p50_ms": round(r.ttft_p50_s * 1000, 1),
            "ttft_p99_ms": round(r.ttft_p99_s * 1000, 1), "tpot_p99_ms": round(r.tpot_p99_s * 1000, 2),
            "hit_rate": round(r.hit_rate, 4), "tier_hit_rate": round(r.tier_hit_rate, 4),
            "goodput": round(r.goodput, 4), "load_s_total": round(r.load_s_total, 1), "wall_s": round(r.wall_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=pathlib.Path, default=DEFAULT_TRACE)
    ap.add_argument("--format", default="mooncake", help="mooncake, azure or weka (a directory of conversations)")
    ap.add_argument("--replicas", default="8,32", help="comma-separated replica counts")
    ap.add_argument("--per-machine", type=int, default=8, help="engines (GPUs) per machine")
    ap.add_argument("--dram-tb", type=float, default=1.0, help="DRAM tier per machine, TB")
    ap.add_argument("--ssd-tb", type=float, default=8.0, help="NVMe tier per machine, TB")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--load", type=float, default=1.0, help="arrivals this much denser than the trace's (a fleet "
                    "sized tighter than the trace's: at 1.0 eight H100s are mostly idle)")
    ap.add_argument("--name", default="sim_tiers", help="result file name under bench/results")
    args = ap.parse_args()
    if not args.trace.exists():
        sys.exit(f"trace not found: {args.trace} (the traces live in ../shared/traces/, see its README)")
    reqs = [dataclasses.replace(r, arrival_s=r.arrival_s / args.load)
            for r in load_trace(args.trace, args.format, args.limit)]
    ceiling, (_, trace_ceiling) = sim_ceiling_hit(reqs), infinite_cache_hit_rate(reqs)
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    runs: dict[str, dict[str, dict[str, object]]] = {}
    head: dict[str, float] = {}
    print(f"{len(reqs)} requests over {span:.0f} s; ceiling {ceiling:.3f} (trace token ceiling {trace_ceiling:.3f})")
    print("| replicas | tiers | TTFT mean | TTFT p99 | hit rate | from tiers | goodput | sim wall |\n"
          + "| --- " * 8 + "|")
    for n in [int(x) for x in args.replicas.split(",")]:
        runs[str(n)] = {}
        results = {}
        for name, tiers in configs(int(args.dram_tb * TB), int(args.ssd_tb * TB), args.per_machine).items():
            r = run_requests(reqs, n, ("kv-aware",), tiers=tiers).results[0]
            results[name] = r
            runs[str(n)][name] = _row(r)
            print(f"| {n} | {name} | {r.ttft_mean_s * 1000:.0f} ms | {r.ttft_p99_s * 1000:.0f} ms | {r.hit_rate:.3f} | "
                  f"{r.tier_hit_rate:.3f} | {r.goodput:.3f} | {r.wall_s:.0f} s |", flush=True)
        best, gpu = results["pooled-dram-ssd"], results["gpu-only"]
        head[f"pooled_hit_over_ceiling_{n}"] = round(best.hit_rate / ceiling, 3)
        head[f"pooled_ttft_over_gpu_only_{n}"] = round(best.ttft_mean_s / gpu.ttft_mean_s, 3)
        head[f"sim_speedup_x_{n}"] = round(span / best.wall_s, 1)
    last = args.replicas.split(",")[-1]
    metrics: dict[str, object] = {
        "trace_format": args.format, "requests": len(reqs), "trace_span_s": round(span, 1), "load": args.load,
        "profile": "h100-llama3-8b", "policy": "kv-aware", "engines_per_machine": args.per_machine,
        "dram_tb_per_machine": args.dram_tb, "ssd_tb_per_machine": args.ssd_tb,
        "load_overlaps_compute": False, "ceiling_hit": round(ceiling, 4),
        "trace_token_ceiling": round(trace_ceiling, 4),
        "pooled_hit_over_ceiling": head[f"pooled_hit_over_ceiling_{last}"],
        "pooled_ttft_over_gpu_only": head[f"pooled_ttft_over_gpu_only_{last}"],
        "sim_speedup_x": head[f"sim_speedup_x_{last}"], **head, "runs": runs}
    print(f"\npooled hit / ceiling {metrics['pooled_hit_over_ceiling']}, pooled mean TTFT / GPU-only "
          f"{metrics['pooled_ttft_over_gpu_only']}, simulator {metrics['sim_speedup_x']}x real time "
          f"({last} replicas)")
    print(f"wrote {write_result(args.name, metrics)}")


if __name__ == "__main__":
    main()
