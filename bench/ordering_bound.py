"""What request *ordering* can win in ``bench/compare_real.py``: a queueing model of its recorded run.

``bench/results/routing_v2_repeats.json`` shows kvmesh kv-aware and sglang-router cache_aware at the same
engine prefix-hit rate (0.1638, ceiling 0.1646): placement has nothing left to win, so what separates them
is the order the engines serve their queues in (kvmesh sends vLLM an uncached-first, aged priority,
:mod:`kvmesh.gateway.order`).  This benchmark bounds that order's win on exactly the same requests, arrival
times and uncached token counts (``select``/``write_trace`` of compare_real, 128-token blocks):

- work: each request's uncached prompt tokens when every block is computed once anywhere (the hit ceiling,
  the best any placement can do), at least one token;
- two servers, each prefilling ``T`` tokens/s: by default the recorded run's own effective rate (tokens the
  engines computed / wall time / 2 engines, which folds in their decode steps and idle start), else
  ``--tps`` (210, prefill alone on the recording CPU); the result says which;
- each request goes, at arrival, to the server with the least unfinished work (order-independent, so every
  order below is compared on the same assignment); a server runs one request at a time, non-preemptively;
  TTFT = wait + own prefill (no decode);
- orders: FCFS, shortest-uncached-first (SJF), aged SJF (priority = arrival + a x prefill time, the
  gateway's rule, for a few ``a``), and preemptive shortest-remaining-first (SRPT), which minimises mean
  time in system on each server: no order on this assignment, preemptive or not, beats it.

Why a bound: the work is the least any router can leave, the servers never idle with work queued, and no
batching, decode or preemption cost slows them, so reordering acts on the queue alone.  ``best_order`` is
the best non-preemptive order tried (SRPT beside it as the floor).  Limits: real engines batch prefills
with decodes (chunked prefill; TTFT there includes the decode steps interleaved), so their queues are not
single servers; uncached counts follow arrival order, so a reordered request that shares a prefix with a
queued, not yet computed one is counted as a hit (``prefix_before_provider`` counts them); ratios depend
only on rate / T, so the sweep over rates is also the sensitivity to T (rate 0.5 at T is rate 0.5 x 210 / T
at 210).

    python bench/ordering_bound.py [--rate 0.5 --requests 100 --tps 210 --name ordering_bound]
"""

from __future__ import annotations

import argparse
import heapq
import json
import pathlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, pct, write_result
from bench.compare_real import BLOCK, TRACE, select, write_trace

MAX_INPUT, MAX_OUTPUT = 2048, 32  # compare_real's defaults, which the recorded run used
SERVERS = 2
FALLBACK_TPS = 210.0  # prefill tokens/s of one vLLM-CPU engine (demo-small) on the recording CPU
AGINGS = (2.0, 5.0, 20.0, 100.0)  # 20 is the gateway's default order_aging
SWEEP = (0.2, 0.25, 0.3, 0.4, 0.5, 0.75)
RECORDED = RESULTS / "routing_v2_repeats.json"


@dataclass(frozen=True, slots=True)
class Job:
    arrival_s: float
    uncached: int  # prompt tokens no earlier request computed
    providers: frozenset[int]  # earlier requests that first computed a block this one reuses


Key = Callable[[Job, float], float]  # (job, its prefill seconds) -> priority, lower first


def aged(a: float) -> Key:
    """The gateway's rule: arrival + ``a`` x expected prefill (``a = 0`` is FCFS, a large one SJF)."""
    return lambda j, p: j.arrival_s + a * p


def jobs_at(rate: float, n: int) -> tuple[list[Job], dict[str, float]]:
    """compare_real's trace for ``n`` requests at ``rate``, written by its own ``write_trace`` and read back
    (millisecond timestamps, capped prompts, 128-token blocks, exactly what aiperf replays)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "trace.jsonl"
        workload = write_trace(path, select(n, True), rate, MAX_INPUT, MAX_OUTPUT)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    first: dict[int, int] = {}  # block id -> the request that computed it
    jobs = []
    for i, r in enumerate(rows):
        uncached, providers = 0, set()
        for k, b in enumerate(r["hash_ids"]):
            if b in first:
                providers.add(first[b])
            else:
                uncached += min(BLOCK, r["input_length"] - k * BLOCK)
                first[b] = i
        jobs.append(Job(r["timestamp"] / 1000.0, max(uncached, 1), frozenset(providers)))
    return jobs, workload


def assign(jobs: list[Job], tps: float) -> list[int]:
    """Server per job: the one with the least unfinished work at its arrival (the same for every
    work-conserving order, so all orders share it)."""
    left, last, out = [0.0] * SERVERS, 0.0, []
    for j in jobs:
        left = [max(0.0, w - (j.arrival_s - last)) for w in left]
        last = j.arrival_s
        k = min(range(SERVERS), key=lambda s: (left[s], s))
        left[k] += j.uncached / tps
        out.append(k)
    return out


def serve(jobs: list[Job], idx: list[int], tps: float, key: Key) -> dict[int, tuple[float, float]]:
    """One non-preemptive server: (start, finish) per job index, the queued job of least ``key`` next."""
    out: dict[int, tuple[float, float]] = {}
    queue: list[tuple[float, int]] = []
    now, i = 0.0, 0
    while i < len(idx) or queue:
        if not queue and jobs[idx[i]].arrival_s > now:
            now = jobs[idx[i]].arrival_s
        while i < len(idx) and jobs[idx[i]].arrival_s <= now:
            j = jobs[idx[i]]
            heapq.heappush(queue, (key(j, j.uncached / tps), idx[i]))
            i += 1
        _, n = heapq.heappop(queue)
        start = now
        now += jobs[n].uncached / tps
        out[n] = (start, now)
    return out


def srpt(jobs: list[Job], idx: list[int], tps: float) -> dict[int, tuple[float, float]]:
    """One preemptive shortest-remaining-first server: (first start, finish) per job index."""
    out: dict[int, tuple[float, float]] = {}
    started: dict[int, float] = {}
    queue: list[tuple[float, int]] = []  # (remaining s, job)
    now, i = 0.0, 0
    while i < len(idx) or queue:
        if not queue:
            now = max(now, jobs[idx[i]].arrival_s)
        while i < len(idx) and jobs[idx[i]].arrival_s <= now:
            heapq.heappush(queue, (jobs[idx[i]].uncached / tps, idx[i]))
            i += 1
        rem, n = heapq.heappop(queue)
        started.setdefault(n, now)
        until = jobs[idx[i]].arrival_s if i < len(idx) else float("inf")
        if now + rem <= until:
            now += rem
            out[n] = (started[n], now)
        else:
            heapq.heappush(queue, (rem - (until - now), n))
            now = until
    return out


def orders() -> dict[str, Key | None]:
    """The orders compared; ``None`` is SRPT (preemptive, its own server loop)."""
    out: dict[str, Key | None] = {"fcfs": lambda j, p: j.arrival_s, "sjf": lambda j, p: p}
    for a in AGINGS:
        out[f"aged_{a:g}"] = aged(a)
    out["srpt"] = None
    return out


def simulate(jobs: list[Job], tps: float) -> dict[str, dict[str, float]]:
    """Per order: mean/p50/p99 TTFT (s) and how many jobs started before a prefix they reuse was done."""
    where = assign(jobs, tps)
    per_server = [[i for i, s in enumerate(where) if s == k] for k in range(SERVERS)]
    out = {}
    for name, key in orders().items():
        times: dict[int, tuple[float, float]] = {}
        for idx in per_server:
            times.update(srpt(jobs, idx, tps) if key is None else serve(jobs, idx, tps, key))
        ttft = [times[i][1] - j.arrival_s for i, j in enumerate(jobs)]
        early = sum(any(times[i][0] < times[p][1] for p in j.providers) for i, j in enumerate(jobs))
        out[name] = {"ttft_mean_s": round(sum(ttft) / len(ttft), 2), "ttft_p50_s": round(pct(ttft, 50), 2),
                     "ttft_p99_s": round(pct(ttft, 99), 2), "prefix_before_provider": early}
    return out


def at_rate(rate: float, n: int, tps: float) -> dict[str, object]:
    """One rate: every order's TTFT, each relative to FCFS, and the best non-preemptive order."""
    jobs, workload = jobs_at(rate, n)
    res = simulate(jobs, tps)
    fcfs = res["fcfs"]
    for r in res.values():
        for stat in ("mean", "p50", "p99"):
            r[f"{stat}_over_fcfs"] = round(r[f"ttft_{stat}_s"] / max(fcfs[f"ttft_{stat}_s"], 1e-9), 3)
    best = min((k for k in res if k != "srpt"), key=lambda k: res[k]["ttft_mean_s"])
    work = sum(j.uncached for j in jobs)
    return {"rate_rps": rate, "uncached_tokens": work, "ceiling_token_hit": workload["ceiling_token_hit"],
            "utilisation": round(work / tps / SERVERS / max(jobs[-1].arrival_s, 1e-9), 3),
            "best_order": best, "best_over_fcfs": res[best]["mean_over_fcfs"],
            "srpt_over_fcfs": res["srpt"]["mean_over_fcfs"], "orders": res}


def derive_tps(override: float | None) -> tuple[float, str]:
    """Tokens/s per server: ``--tps`` if given, else the recorded run's computed tokens / wall / engines
    (mean over its routers), else the fallback."""
    if override is not None:
        return override, "--tps"
    try:
        m = json.loads(RECORDED.read_text())["metrics"]
        rates = [m["prompt_tokens"] * (1 - r["hit_rate"]) / r["wall_s"] / SERVERS
                 for r in m["routers"].values() if r.get("wall_s") and "hit_rate" in r]
    except (OSError, ValueError, KeyError, TypeError):
        rates = []
    if rates:
        return round(sum(rates) / len(rates), 1), (f"{RECORDED.name}: prompt_tokens x (1 - hit_rate) / wall_s / "
                                                   f"{SERVERS}, mean over {len(rates)} routers")
    return FALLBACK_TPS, "fallback (no usable figure in the recorded run)"


def table(rows: list[dict[str, object]]) -> None:
    names = list(orders())
    print(f"{'rate':>5} {'util':>5} " + " ".join(f"{n:>9}" for n in names) + "   (mean TTFT / FCFS)")
    for row in rows:
        res = row["orders"]
        assert isinstance(res, dict)
        print(f"{row['rate_rps']:>5} {row['utilisation']:>5} "
              + " ".join(f"{res[n]['mean_over_fcfs']:>9}" for n in names) + f"   fcfs {res['fcfs']['ttft_mean_s']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=0.5, help="the recorded run's arrival rate (requests/s)")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tps", type=float, default=None, help="prefill tokens/s per server (default: derived "
                    f"from {RECORDED.name}, else {FALLBACK_TPS:g})")
    ap.add_argument("--sweep", default=",".join(f"{r:g}" for r in SWEEP), help="further rates, comma-separated")
    ap.add_argument("--name", default="ordering_bound")
    a = ap.parse_args()
    if not TRACE.is_file():
        print(f"skipped: Mooncake trace not found at {TRACE}")
        return
    tps, source = derive_tps(a.tps)
    rates = sorted({a.rate, *(float(r) for r in a.sweep.split(",") if r)})
    rows = [at_rate(r, a.requests, tps) for r in rates]
    table(rows)
    main_row = next(r for r in rows if r["rate_rps"] == a.rate)
    orders_at = main_row["orders"]
    assert isinstance(orders_at, dict)
    metrics: dict[str, object] = {
        "best_order_ttft_over_fcfs_at_recorded_rate": main_row["best_over_fcfs"],
        "best_order_at_recorded_rate": main_row["best_order"],
        "srpt_ttft_over_fcfs_at_recorded_rate": main_row["srpt_over_fcfs"],
        "aged_20_ttft_over_fcfs_at_recorded_rate": orders_at["aged_20"]["mean_over_fcfs"],
        "model_fcfs_ttft_mean_s_at_recorded_rate": orders_at["fcfs"]["ttft_mean_s"],
        "recorded_rate_rps": a.rate, "requests": a.requests, "servers": SERVERS, "tps_per_server": tps,
        "tps_source": source, "agings": list(AGINGS), "block_tokens": BLOCK, "max_input": MAX_INPUT,
        "best_over_fcfs_by_rate": {f"{r['rate_rps']:g}": r["best_over_fcfs"] for r in rows}, "rates": rows}
    print(f"best order / FCFS at {a.rate:g} req/s: {main_row['best_over_fcfs']} ({main_row['best_order']}), "
          f"SRPT floor {main_row['srpt_over_fcfs']}; T = {tps} tok/s ({source})")
    print(f"wrote {write_result(a.name, metrics)}")


if __name__ == "__main__":
    main()
