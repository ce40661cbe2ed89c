"""What the cache tiers buy at cluster scale: the Mooncake conversation trace through the simulator, kv-aware.

Four configurations at each replica count, H100 / Llama-3-8B (128 KiB of KV per token), 8 GPUs per machine:
GPU prefix caches only; + each machine's DRAM tier (1 TB); + that DRAM pooled across machines (kvmesh's
ring); + pooled DRAM and an 8 TB NVMe tier per machine.  Tier transfers follow the connector: by default
(its asynchronous transfers) a request with a hit waits aside for its load while the engine's steps go on,
and no step waits for saves; ``--sync-connector`` models ``connector_async = false`` (a hit's load stalls the
admitting step, the copy-out of new blocks ends the step that computed them), where ``--overlap-loads`` /
``--overlap-saves`` are what-ifs.  PCIe ~50 GB/s host<->GPU, NVMe 7 GB/s, RDMA 25 GB/s between machines
(``kvmesh.sim.tiers``).  The ceiling is one unbounded cache shared by all, counted as the simulator counts
hits (``sim_ceiling_hit``); the trace's own token ceiling (``infinite_cache_hit_rate``) is reported beside it.

**Load sweep, knee and capacity.**  At the trace's own rate a fleet of 8 H100s is mostly idle, so TTFT is
mostly the uncached prefill and a tier can only cut it by the share it stops recomputing; the tier's queueing
benefit shows only when the fleet is busy, near its knee.  So each replica count is swept over the ``--loads``
grid (arrival times divided by the load), ascending, GPU-only and pooled DRAM+SSD at every load, until both
miss the TTFT SLO (p90 <= ``--ttft-slo-s``, 2 s); a grid that ends first is extended by doubling its last load
(at most ``--extend`` times).  Each one's bracket (highest load meeting the SLO, lowest
missing it) is then bisected at the midpoint, both side by side, until hi - lo <= ``--precision`` (3 %) of lo
or ``--max-steps``.  The **operating point** is GPU-only's knee, the bracket's lower end — the busiest a
GPU-only fleet of that size would be run — and all four configurations are run there;
``pooled_ttft_over_gpu_only`` (mean TTFT) is taken there.  ``pooled_capacity_over_gpu_only`` is pooled
DRAM+SSD's own highest load meeting the SLO over GPU-only's knee (each within the precision, so the ratio
within about twice it).  The rule assumes p90 TTFT rises with load; every run is recorded (``runs``) and a
bracket that a later run contradicts is flagged (``monotone``).  Runs are memoised: the simulator is
deterministic (one seed), so the grid, the bisections and the table share them.

**Speed.** ``sim_speedup_x`` = simulated seconds / the simulator process's CPU seconds (``time.process_time``,
so other load on the machine does not skew it), for pooled DRAM+SSD at load 1 and the largest replica count;
``sim_speedup_wall_x`` is the same over wall seconds.  Runs go ``--jobs`` at a time in forked processes.

    python bench/sim_tiers.py [--replicas 8,32] [--loads 1,2,3,4,6,8,12,16] [--precision 0.03] [--max-steps 8]
    python bench/sim_tiers.py --trace ../shared/traces/weka --format weka --name sim_tiers_weka
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import pathlib
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.index.hashing import root_seed
from kvmesh.sim.cluster import Cluster, SimResult, make_requests
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.runner import sim_ceiling_hit
from kvmesh.sim.tiers import TierConfig
from kvmesh.workloads import MOONCAKE_BLOCK, TraceRequest, infinite_cache_hit_rate, load_trace, mooncake_prompt

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
DEFAULT_TRACE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"
TB = 10**12
TPB = 16  # simulated tokens per block (each stands for MOONCAKE_BLOCK / TPB real tokens)
PROFILE = "h100-llama3-8b"
BEST, BASE = "pooled-dram-ssd", "gpu-only"
# set before the worker processes fork: the trace's prompts are built once, not once per run
_TRACE: list[TraceRequest] = []
_PROMPTS: list[list[int]] = []


def configs(dram: int, ssd: int, per_machine: int, overlap: bool = False,
            overlap_loads: bool = False, sync: bool = False) -> dict[str, TierConfig | None]:
    tc = functools.partial(TierConfig, engines_per_machine=per_machine, overlap_saves=overlap,
                           overlap_loads=overlap_loads, connector_async=not sync)
    return {
        "gpu-only": None,
        "dram": tc(dram_bytes=dram),
        "pooled-dram": tc(dram_bytes=dram, pooled=True),
        "pooled-dram-ssd": tc(dram_bytes=dram, ssd_bytes=ssd, pooled=True),
    }


def simulate(replicas: int, load: float, tiers: TierConfig | None) -> SimResult:
    """One kv-aware run over the trace with arrivals ``load`` times denser (in a worker process)."""
    sim = make_requests(_PROMPTS, [r.arrival_s / load for r in _TRACE], [r.output_tokens for r in _TRACE], TPB,
                        root_seed("kvmesh"), [r.session for r in _TRACE])
    cluster = Cluster(replicas, get_profile(PROFILE), "kv-aware", TPB, MOONCAKE_BLOCK / TPB, 0.01, tiers=tiers)
    return cluster.run(sim)


def _row(r: SimResult) -> dict[str, object]:
    return {"ttft_mean_ms": round(r.ttft_mean_s * 1000, 1), "ttft_p50_ms": round(r.ttft_p50_s * 1000, 1),
            "ttft_p90_ms": round(r.ttft_p90_s * 1000, 1), "ttft_p99_ms": round(r.ttft_p99_s * 1000, 1),
            "tpot_p99_ms": round(r.tpot_p99_s * 1000, 2), "hit_rate": round(r.hit_rate, 4),
            "tier_hit_rate": round(r.tier_hit_rate, 4), "goodput": round(r.goodput, 4),
            "utilisation": round(r.utilisation, 3), "load_s_total": round(r.load_s_total, 1),
            "virtual_s": round(r.virtual_s, 1), "wall_s": round(r.wall_s, 1), "cpu_s": round(r.cpu_s, 1)}


def _print(n: int, load: float, name: str, r: SimResult) -> None:
    print(f"| {n} | {load:g} | {name} | {r.ttft_mean_s * 1000:.0f} ms | {r.ttft_p90_s * 1000:.0f} ms | "
          f"{r.hit_rate:.3f} | {r.tier_hit_rate:.3f} | {r.utilisation:.2f} | {r.virtual_s / r.cpu_s:.0f}x |",
          flush=True)


class Runs:
    """Every (configuration, load) run of one replica count, memoised: the grid, the bisections and the knee
    table share them (the simulator is deterministic: same seed, same trace, same result)."""

    def __init__(self, pool: ProcessPoolExecutor, n: int, cfgs: dict[str, TierConfig | None]) -> None:
        self.pool, self.n, self.cfgs = pool, n, cfgs
        self.done: dict[tuple[str, float], SimResult] = {}
        self.order: list[tuple[str, float]] = []  # in the order they were run

    def get(self, wanted: list[tuple[str, float]]) -> list[SimResult]:
        """Run the ones not yet run (``--jobs`` at a time), then return all of them."""
        futs = {k: self.pool.submit(simulate, self.n, k[1], self.cfgs[k[0]]) for k in dict.fromkeys(wanted)
                if k not in self.done}
        for (name, load), f in futs.items():
            self.done[name, load] = f.result()
            self.order.append((name, load))
            _print(self.n, load, name, self.done[name, load])
        return [self.done[k] for k in wanted]

    def bracket(self, name: str, slo_s: float) -> tuple[float | None, float | None, bool]:
        """(highest load meeting the SLO below the lowest that misses it, that lowest miss, monotone): from
        every run of ``name`` so far.  Not monotone = some load above the lowest miss meets the SLO again."""
        runs = {load: r.ttft_p90_s <= slo_s for (nm, load), r in self.done.items() if nm == name}
        misses = [load for load, ok in runs.items() if not ok]
        hi = min(misses) if misses else None
        meets = [load for load, ok in runs.items() if ok and (hi is None or load < hi)]
        monotone = hi is None or not any(ok and load > hi for load, ok in runs.items())
        return (max(meets) if meets else None), hi, monotone


def grid(runs: Runs, loads: list[float], slo_s: float, extend: int) -> list[float]:
    """GPU-only and pooled DRAM+SSD at each grid load, ascending, until both have missed the SLO; a grid that
    ends first is extended by doubling its last load, at most ``extend`` times.  The loads run."""
    loads = list(loads)
    for i in range(len(loads) + extend):
        if i == len(loads):
            loads.append(loads[-1] * 2)
        if all(r.ttft_p90_s > slo_s for r in runs.get([(BASE, loads[i]), (BEST, loads[i])])):
            return loads[:i + 1]
    return loads


def bisect(runs: Runs, slo_s: float, precision: float, max_steps: int) -> int:
    """Halve GPU-only's and pooled DRAM+SSD's brackets side by side (one run of each per step) until each is
    within ``precision`` of its lower end (hi - lo <= precision * lo) or ``max_steps`` steps; the steps taken."""
    for step in range(max_steps):
        mids = []
        for name in (BASE, BEST):
            lo, hi, _ = runs.bracket(name, slo_s)
            if lo is not None and hi is not None and hi - lo > precision * lo:
                mids.append((name, (lo + hi) / 2))
        if not mids:
            return step
        runs.get(mids)
    return max_steps


def _summary(r: SimResult, slo_s: float) -> dict[str, object]:
    return {"ttft_mean_ms": round(r.ttft_mean_s * 1000, 1), "ttft_p90_ms": round(r.ttft_p90_s * 1000, 1),
            "hit_rate": round(r.hit_rate, 4), "utilisation": round(r.utilisation, 3),
            "meets_slo": r.ttft_p90_s <= slo_s}


def sweep_rows(runs: Runs, loads: list[float], slo_s: float) -> dict[str, dict[str, object]]:
    """The grid's table: GPU-only beside pooled DRAM+SSD at each grid load that was run."""
    rows: dict[str, dict[str, object]] = {}
    for load in loads:
        if (BASE, load) not in runs.done:
            break
        gpu, best = runs.done[BASE, load], runs.done[BEST, load]
        rows[f"{load:g}"] = {"gpu_only_ttft_p90_ms": round(gpu.ttft_p90_s * 1000, 1),
                             "gpu_only_ttft_mean_ms": round(gpu.ttft_mean_s * 1000, 1),
                             "gpu_only_utilisation": round(gpu.utilisation, 3),
                             "pooled_ttft_mean_ms": round(best.ttft_mean_s * 1000, 1),
                             "pooled_ttft_p90_ms": round(best.ttft_p90_s * 1000, 1),
                             "pooled_utilisation": round(best.utilisation, 3),
                             "pooled_ttft_over_gpu_only": round(best.ttft_mean_s / gpu.ttft_mean_s, 3),
                             "gpu_only_meets_slo": gpu.ttft_p90_s <= slo_s,
                             "pooled_meets_slo": best.ttft_p90_s <= slo_s}
    return rows


def _bracket_row(runs: Runs, name: str, slo_s: float) -> dict[str, object]:
    lo, hi, monotone = runs.bracket(name, slo_s)
    return {"load": lo, "lowest_load_missing": hi, "monotone": monotone,
            "precision": round((hi - lo) / lo, 4) if lo is not None and hi is not None else None}


def replica_count(pool: ProcessPoolExecutor, n: int, args: argparse.Namespace, ceiling: float,
                  cfgs: dict[str, TierConfig | None], max_steps: int) -> tuple[dict[str, object], dict[str, object]]:
    """Grid, bisections, GPU-only's knee and the four-configuration table there, for ``n`` replicas."""
    loads, slo = [float(x) for x in args.loads.split(",")], args.ttft_slo_s
    runs = Runs(pool, n, cfgs)
    loads = grid(runs, loads, slo, args.extend)
    steps = bisect(runs, slo, args.precision, max_steps)
    knee, cap = _bracket_row(runs, BASE, slo), _bracket_row(runs, BEST, slo)
    # GPU-only misses the SLO even at the lightest load: the table is at that load, stated as such
    op = knee["load"] if isinstance(knee["load"], float) else loads[0]
    table = dict(zip(cfgs, runs.get([(name, op) for name in cfgs]), strict=True))
    best, gpu, one = table[BEST], table[BASE], runs.done[BEST, loads[0]]
    capacity = (round(cap["load"] / knee["load"], 3)
                if isinstance(cap["load"], float) and isinstance(knee["load"], float) else None)
    head: dict[str, object] = {
        f"pooled_hit_over_ceiling_{n}": round(best.hit_rate / ceiling, 3),
        f"pooled_ttft_over_gpu_only_{n}": round(best.ttft_mean_s / gpu.ttft_mean_s, 3),
        f"pooled_ttft_p90_over_gpu_only_{n}": round(best.ttft_p90_s / gpu.ttft_p90_s, 3),
        f"operating_load_{n}": op, f"pooled_capacity_load_{n}": cap["load"],
        f"pooled_capacity_over_gpu_only_{n}": capacity,
        f"sim_speedup_x_{n}": round(one.virtual_s / one.cpu_s, 1),
        f"sim_speedup_wall_x_{n}": round(one.virtual_s / one.wall_s, 1)}
    return {"operating_load": op, "operating_point_meets_slo": knee["load"] is not None, "gpu_only_knee": knee,
            "pooled_capacity": cap, "bisection_steps": steps, "max_bisection_steps": max_steps,
            "sweep": sweep_rows(runs, loads, slo),
            "runs": [{"config": name, "load": load, **_summary(runs.done[name, load], slo)}
                     for name, load in runs.order],
            "at_operating_point": {name: _row(r) for name, r in table.items()},
            "at_first_load": {name: _row(runs.done[name, loads[0]]) for name in (BASE, BEST)}}, head


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--trace", type=pathlib.Path, default=DEFAULT_TRACE)
    ap.add_argument("--format", default="mooncake", help="mooncake, azure or weka (a directory of conversations)")
    ap.add_argument("--replicas", default="8,32", help="comma-separated replica counts")
    ap.add_argument("--per-machine", type=int, default=8, help="engines (GPUs) per machine")
    ap.add_argument("--dram-tb", type=float, default=1.0, help="DRAM tier per machine, TB")
    ap.add_argument("--ssd-tb", type=float, default=8.0, help="NVMe tier per machine, TB")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--loads", default="1,2,3,4,6,8,12,16", help="arrival-rate multiples to sweep, ascending (1 = the "
                    "trace's own rate)")
    ap.add_argument("--ttft-slo-s", type=float, default=2.0, help="TTFT p90 SLO: GPU-only's knee and pooled capacity")
    ap.add_argument("--precision", type=float, default=0.03, help="bisect each bracket until (hi - lo) <= this * lo")
    ap.add_argument("--extend", type=int, default=6, help="doublings of the last grid load at most, while a "
                    "configuration still meets the SLO there")
    ap.add_argument("--max-steps", default="8", help="bisection steps at most: one value, or one per --replicas")
    ap.add_argument("--sync-connector", action="store_true", help="the connector with connector_async = false: "
                    "loads stall the admitting step, saves end the step that computed them")
    ap.add_argument("--overlap-loads", action="store_true", help="with --sync-connector, what-if: tier loads "
                    "streamed layer by layer behind the step's compute")
    ap.add_argument("--overlap-saves", action="store_true", help="with --sync-connector, what-if: saves copied "
                    "out behind compute")
    ap.add_argument("--jobs", type=int, default=2, help="simulations run at once (processes)")
    ap.add_argument("--name", default="sim_tiers", help="result file name under bench/results")
    return ap.parse_args()


def main() -> None:
    args = _args()
    if not args.trace.exists():
        sys.exit(f"trace not found: {args.trace} (the traces live in ../shared/traces/, see its README)")
    _TRACE[:] = load_trace(args.trace, args.format, args.limit)
    _PROMPTS[:] = [mooncake_prompt(r, TPB) for r in _TRACE]
    reqs = _TRACE
    ceiling, (_, trace_ceiling) = sim_ceiling_hit(reqs), infinite_cache_hit_rate(reqs)
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    cfgs = configs(int(args.dram_tb * TB), int(args.ssd_tb * TB), args.per_machine, args.overlap_saves,
                   args.overlap_loads, args.sync_connector)
    print(f"{len(reqs)} requests over {span:.0f} s; ceiling {ceiling:.3f} (trace token ceiling {trace_ceiling:.3f})")
    print("| replicas | load | tiers | TTFT mean | TTFT p90 | hit rate | from tiers | utilisation | speed (CPU) |\n"
          + "| --- " * 9 + "|")
    slo = f"TTFT p90 <= {args.ttft_slo_s:g} s"
    base: dict[str, object] = {
        "trace_format": args.format, "requests": len(reqs), "trace_span_s": round(span, 1),
        "profile": PROFILE, "policy": "kv-aware", "engines_per_machine": args.per_machine,
        "dram_tb_per_machine": args.dram_tb, "ssd_tb_per_machine": args.ssd_tb,
        "connector": "synchronous" if args.sync_connector else "async (loads wait aside, saves on a thread)",
        "load_overlaps_compute": args.overlap_loads or not args.sync_connector,
        "save_copy_charged": args.sync_connector and not args.overlap_saves,
        "ceiling_hit": round(ceiling, 4),
        "trace_token_ceiling": round(trace_ceiling, 4), "loads": args.loads, "ttft_slo_s": args.ttft_slo_s,
        "grid_extend": args.extend, "bisection_precision": args.precision, "max_bisection_steps": args.max_steps,
        "operating_point_rule": f"GPU-only's knee: the highest load at which GPU-only meets {slo}, bracketed by "
                                "the grid (its last load doubled while a configuration still meets it) and "
                                f"bisected to (hi - lo) <= {args.precision:g} * lo; all four configurations are run "
                                "there",
        "capacity_rule": f"pooled DRAM+SSD's highest load meeting {slo}, found the same way, over GPU-only's knee",
        "sim_speedup_rule": "simulated seconds / simulator process CPU seconds, pooled DRAM+SSD at the first load"}
    counts = [int(x) for x in args.replicas.split(",")]
    steps = [int(x) for x in args.max_steps.split(",")]
    runs: dict[str, dict[str, object]] = {}
    head: dict[str, object] = {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for n, max_steps in zip(counts, steps * len(counts) if len(steps) == 1 else steps, strict=True):
            runs[str(n)], h = replica_count(pool, n, args, ceiling, cfgs, max_steps)
            head.update(h)
            print(f"\n{n} replicas: GPU-only knee x{h[f'operating_load_{n}']}, pooled mean TTFT / GPU-only there "
                  f"{h[f'pooled_ttft_over_gpu_only_{n}']}, pooled capacity x{h[f'pooled_capacity_load_{n}']} "
                  f"({h[f'pooled_capacity_over_gpu_only_{n}']} of GPU-only's), hit / ceiling "
                  f"{h[f'pooled_hit_over_ceiling_{n}']}, simulator {h[f'sim_speedup_x_{n}']}x real time (CPU)")
            # written after each replica count, so a run cut short keeps what it finished (``replicas_done``)
            last = str(n)
            metrics = {**base, "replicas_done": list(runs), **{k: head[f"{k}_{last}"] for k in (
                "pooled_hit_over_ceiling", "pooled_ttft_over_gpu_only", "pooled_capacity_over_gpu_only",
                "sim_speedup_x", "sim_speedup_wall_x")}, **head, "runs": runs}
            print(f"wrote {write_result(args.name, metrics)}", flush=True)

if __name__ == "__main__":
    main()
