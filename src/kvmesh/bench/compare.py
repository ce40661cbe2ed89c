"""Side by side (``kvmesh bench compare``): kvmesh vs sglang-router vs vllm-router over the SAME simulated
engine pool, in real time.

8 simulated engines (Llama-3-8B/H100 profile, 512-token trace blocks scaled to 16 text words, time scaled
by ``--speedup``) run in this process and publish KV events.  Each router runs as its own process in
front of all 8; a slice of the Mooncake conversation trace is replayed open-loop at ``--speedup`` times
its timestamps (so the load matches the trace), with engine caches reset between routers.  Reported per
router: client-side streaming TTFT mean/p50/p99, TPOT (per request, first to last token) and ITL (every gap
between streamed tokens) p50/p99, goodput (the share of requests within both the TTFT and the TPOT SLO),
engine prefix-cache hit rate (engines' own counters), each engine's share of prompt tokens, errors.  The
other routers come from ``make routers`` (sglang-router and vllm-router in ``.venv-routers``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvmesh.bench.util import free_ports, pct, wait_http
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.server import SimServer
from kvmesh.workloads import MOONCAKE_BLOCK, TraceError, TraceRequest, load_mooncake, multi_turn_chat

ROUTERS_BIN = pathlib.Path(".venv-routers") / "bin"
DEFAULT_ROUTERS = ("kvmesh-kv-aware,kvmesh-round-robin,kvmesh-session,sglang-cache_aware,sglang-round_robin,"
                   "vllm-router-round_robin,vllm-router-consistent_hash,vllm-router-cache_aware,"
                   "vllm-router-kv_aware")
MODEL = "kvmesh-demo"
WORDS_PER_BLOCK = 16
BLOCK_SIZE = 16  # simulated engines' KV block (tokens)


def block_text(h: int) -> str:
    x = (h * 0x9E3779B1 + 12345) & 0xFFFFFFFF
    words = []
    for _ in range(WORDS_PER_BLOCK):
        x = (x * 1_103_515_245 + 12_345) & 0x7FFFFFFF
        words.append(f"w{x % 5000}")
    return " ".join(words) + "\n"


def prompt(r: TraceRequest) -> str:
    return "".join(block_text(h) for h in r.block_ids)


class EnginePool:
    """N simulated engines on a background event loop."""

    def __init__(self, n: int, model_dir: pathlib.Path, run_dir: pathlib.Path, time_scale: float) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        run_dir.mkdir(parents=True, exist_ok=True)
        # one block of 16 words ~ 32 tokens of the demo tokenizer stands for 512 trace tokens
        ports = free_ports(2 * n)  # HTTP, then KV events (TCP: the Rust routers subscribe too)
        self.servers = [SimServer(str(model_dir), MODEL, get_profile("h100-llama3-8b"), port=ports[i],
                                  block_size=BLOCK_SIZE, time_scale=time_scale, token_scale=MOONCAKE_BLOCK / 32,
                                  kv_events_endpoint=f"tcp://127.0.0.1:{ports[n + i]}", max_model_len=1 << 20)
                        for i in range(n)]
        for s in self.servers:
            asyncio.run_coroutine_threadsafe(s.start(), self.loop).result()

    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def stop(self) -> None:
        for s in self.servers:
            asyncio.run_coroutine_threadsafe(s.stop(), self.loop).result()


def router_cmd(name: str, urls: list[str], port: int, pool: EnginePool, model_dir: pathlib.Path) -> list[str]:
    if name.startswith("kvmesh-"):
        cmd = [sys.executable, "-m", "kvmesh", "gateway", "--port", str(port), "--policy", name[len("kvmesh-"):],
               "--tokenizer", str(model_dir)]
        for u, s in zip(urls, pool.servers, strict=True):
            cmd += ["--backend", u, "--kv-events", s.kv_events_endpoint or "-"]
        return cmd
    if name.startswith("sglang-"):
        return [str(ROUTERS_BIN / "python"), "-m", "sglang_router.launch_router", "--port", str(port),
                "--policy", name[len("sglang-"):], "--worker-urls", *urls, "--log-level", "warn"]
    policy = name[len("vllm-router-"):]
    cmd = [str(ROUTERS_BIN / "vllm-router"), "--port", str(port), "--policy", policy, "--worker-urls", *urls,
           "--log-level", "warning"]
    if policy == "kv_aware":  # its KV index is fed by the same ZMQ event streams as kvmesh's
        cmd += ["--kv-event-block-size", str(BLOCK_SIZE), "--kv-event-model", MODEL]
        for u, s in zip(urls, pool.servers, strict=True):
            cmd += ["--kv-event-source", f"{u}={s.kv_events_endpoint}"]
    return cmd


@dataclass(slots=True)
class Timings:
    """Client-side timings of one replay: per request TTFT and TPOT, and every inter-token gap."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    good: int = 0
    errors: int = 0
    # per request: (sent, s after the replay's start; TTFT s; the backend kvmesh names, else ""; session)
    requests: list[tuple[float, float, str, str]] = field(default_factory=list)


async def replay(url: str, reqs: list[TraceRequest], speedup: float) -> tuple[list[float], int]:
    """(TTFTs, errors) of :func:`replay_timings`."""
    tm = await replay_timings(url, reqs, speedup)
    return tm.ttft, tm.errors


async def replay_timings(url: str, reqs: list[TraceRequest], speedup: float,
                         slo: tuple[float, float] = (1.0, 0.05)) -> Timings:
    """Open loop: request i is sent at its trace timestamp / ``speedup``.  ``slo``: (TTFT s, TPOT s)."""
    out = Timings()
    t0 = time.perf_counter()
    base = reqs[0].arrival_s

    async def one(http: httpx.AsyncClient, r: TraceRequest) -> None:
        await asyncio.sleep(max(0.0, (r.arrival_s - base) / speedup - (time.perf_counter() - t0)))
        body = {"model": MODEL, "prompt": prompt(r), "max_tokens": min(max(r.output_tokens, 1), 16),
                "stream": True, "ignore_eos": True}
        headers = {"x-session-id": r.session} if r.session else {}
        start = time.perf_counter()
        stamps: list[float] = []
        try:
            async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    out.errors += 1
                    return
                backend = resp.headers.get("x-kvmesh-backend", "")
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.perf_counter() - start)
        except httpx.HTTPError:
            out.errors += 1
            return
        if stamps:
            tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
            out.ttft.append(stamps[0])
            out.requests.append((round(start - t0, 4), round(stamps[0], 4), backend, r.session or ""))
            out.tpot.append(tpot)
            out.itl += [b - a for a, b in itertools.pairwise(stamps)]
            out.good += stamps[0] <= slo[0] and tpot <= slo[1]

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1000)) as http:
        await asyncio.gather(*(one(http, r) for r in reqs))
    return out


def metric_sum(text: str, name: str) -> float:
    """The sum of a Prometheus series over its label sets in an exposition ``text`` (0 when absent)."""
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def engine_counters(urls: list[str]) -> tuple[float, float, list[float]]:
    """(prefix-cache hits, queries) over all engines and each engine's prompt tokens, from their /metrics."""
    hits = queries = 0.0
    prompt_tokens = []
    for u in urls:
        text = httpx.get(f"{u}/metrics").text
        hits += metric_sum(text, "vllm:prefix_cache_hits_total")
        queries += metric_sum(text, "vllm:prefix_cache_queries_total")
        prompt_tokens.append(metric_sum(text, "vllm:prompt_tokens_total"))
    return hits, queries, prompt_tokens


def engine_ttft(urls: list[str]) -> tuple[float, float]:
    """(sum of seconds, count) of the engines' own TTFT histograms (``vllm:time_to_first_token_seconds``:
    from the engine's arrival to its first token), so a run can tell the engines' share of the client's
    TTFT from the router's and the wire's."""
    total = count = 0.0
    for u in urls:
        text = httpx.get(f"{u}/metrics").text
        total += metric_sum(text, "vllm:time_to_first_token_seconds_sum")
        count += metric_sum(text, "vllm:time_to_first_token_seconds_count")
    return total, count


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and its live children, from /proc (0 where unreadable).
    The routers share the host with the simulated engines they drive: a router that burns CPU slows the
    engines' clocks too, so its CPU is reported beside its latencies."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        kids = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    total = 0.0
    for p in [str(pid), *kids]:
        try:
            fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


class RouteProbe:
    """A diagnostic (``KVMESH_BENCH_PROBE=1``): every ``period_s`` asks the kvmesh gateway's ``/debug/route``
    where a new session's first turn would go, and writes each answer (every candidate's cost terms and what
    the policy has learned) to ``probe-NAME-K.jsonl`` in the run directory.  Costs the gateway one route a
    period, so it is off in recorded runs."""

    def __init__(self, url: str, log_dir: pathlib.Path, name: str, reqs: list[TraceRequest],
                 period_s: float = 0.25) -> None:
        k = len(list(log_dir.glob(f"probe-{name}-*.jsonl")))
        self.path, self.url, self.period_s = log_dir / f"probe-{name}-{k}.jsonl", url, period_s
        self.body = {"model": MODEL, "prompt": prompt(reqs[0]), "max_tokens": 16}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        t0 = time.perf_counter()
        with httpx.Client(timeout=10) as http, open(self.path, "w") as f:
            n = 0
            while not self.done.wait(self.period_s):
                n += 1
                r = http.post(f"{self.url}/debug/route", json=self.body, headers={"x-session-id": f"probe-{n}"})
                f.write(json.dumps({"t_s": round(time.perf_counter() - t0, 3), **r.json()}) + "\n")

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def write_requests(log_dir: pathlib.Path, name: str, rows: list[tuple[float, float, str, str]]) -> None:
    """One run's requests (sent at, TTFT, backend) as ``requests-NAME-K.jsonl`` in the run directory, K the
    run's number: a bad run can be read in time (which requests, when, on which engine), not only as a mean."""
    k = len(list(log_dir.glob(f"requests-{name}-*.jsonl")))
    with open(log_dir / f"requests-{name}-{k}.jsonl", "w") as f:
        for sent, ttft, backend, session in rows:
            f.write(json.dumps({"sent_s": sent, "ttft_s": ttft, "backend": backend, "session": session}) + "\n")


def gateway_overhead_ms(url: str) -> float | None:
    """kvmesh's own mean pre-forward time (tokenise, route, admit) from its /metrics."""
    text = httpx.get(f"{url}/metrics").text
    total = re.search(r"^kvmesh_gateway_overhead_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^kvmesh_gateway_overhead_seconds_count (\S+)$", text, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return None
    return round(float(total.group(1)) / float(count.group(1)) * 1000, 2)


def run_router(name: str, pool: EnginePool, reqs: list[TraceRequest], args: CompareArgs,
               model_dir: pathlib.Path, port: int, log_dir: pathlib.Path) -> dict[str, object]:
    urls = pool.urls()
    for u in urls:
        httpx.post(f"{u}/reset_prefix_cache").raise_for_status()
    proc = subprocess.Popen(router_cmd(name, urls, port, pool, model_dir), stdout=subprocess.DEVNULL,
                            stderr=open(log_dir / f"router-{name}.log", "wb"))  # noqa: SIM115
    tm = Timings()
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 60)
        h0, q0, p0 = engine_counters(urls)
        e0 = engine_ttft(urls)
        probe = RouteProbe(f"http://127.0.0.1:{port}", log_dir, name, reqs) if name.startswith("kvmesh-") and \
            os.environ.get("KVMESH_BENCH_PROBE") == "1" else None
        cpu0 = cpu_seconds(proc.pid)
        t_start = time.perf_counter()
        tm = asyncio.run(replay_timings(f"http://127.0.0.1:{port}", reqs, args.speedup * args.load,
                                        (args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)))
        wall = time.perf_counter() - t_start
        if probe is not None:
            probe.stop()
        cpu = cpu_seconds(proc.pid) - cpu0
        h1, q1, p1 = engine_counters(urls)
        e1 = engine_ttft(urls)
        overhead = gateway_overhead_ms(f"http://127.0.0.1:{port}") if name.startswith("kvmesh-") else None
    finally:
        proc.terminate()
        proc.wait(10)
    write_requests(log_dir, name, tm.requests)
    load = [b - a for a, b in zip(p0, p1, strict=True)]
    ttfts = tm.ttft

    def ms(xs: list[float], q: float) -> float | None:
        return round(pct(xs, q) * 1000, 2) if xs else None

    engine_ms = (e1[0] - e0[0]) / (e1[1] - e0[1]) * 1000 if e1[1] > e0[1] else None
    return {"ttft_mean_ms": round(sum(ttfts) / max(len(ttfts), 1) * 1000, 1),
            # the engines' own mean TTFT: the client's less this is the router's and the wire's share
            **({"engine_ttft_mean_ms": round(engine_ms, 1)} if engine_ms is not None else {}),
            "ttft_p50_ms": ms(ttfts, 50), "ttft_p99_ms": ms(ttfts, 99),
            "tpot_p50_ms": ms(tm.tpot, 50), "tpot_p99_ms": ms(tm.tpot, 99),
            "itl_p50_ms": ms(tm.itl, 50), "itl_p99_ms": ms(tm.itl, 99),
            "goodput": round(tm.good / max(len(reqs), 1), 4), "goodput_rps": round(tm.good / max(wall, 1e-9), 2),
            "hit_rate": round((h1 - h0) / max(q1 - q0, 1), 4), "ok": len(ttfts), "errors": tm.errors,
            # prompt tokens per engine / the mean: 1.0 everywhere = perfectly even
            "load_max_over_mean": round(max(load) / max(sum(load) / len(load), 1), 3),
            **({"gateway_pre_forward_ms": overhead} if overhead is not None else {}),
            "router_cpu_s": round(cpu, 2), "wall_s": round(wall, 1),
            "ttfts_ms": sorted(round(t * 1000, 1) for t in ttfts)}


@dataclass(slots=True)
class CompareArgs:
    requests: int = 400
    speedup: float = 4.0
    load: float = 1.0
    routers: str = DEFAULT_ROUTERS
    workload: str = "mooncake"  # mooncake (needs the trace) | chat (multi-turn sessions, generated)
    plot: pathlib.Path | None = None  # PNG: TTFT CDF per router
    slo_ttft_ms: float = 1000.0  # goodput: requests with TTFT and TPOT within these
    slo_tpot_ms: float = 50.0
    repeats: int = 1  # run the router list this many times, interleaved (a, b, a, b): see merge_runs


def load_workload(trace: pathlib.Path | None, args: CompareArgs) -> list[TraceRequest]:
    if args.workload == "chat":
        # 8 turns per session, turns ~4 s apart, 0.5 sessions/s starting; a 4-block system prompt shared by all
        return multi_turn_chat(-(-args.requests // 8), 8, rate=0.5, think_s=4.0, system_blocks=4,
                               user_blocks=2, answer_blocks=1, output_tokens=16)[: args.requests]
    if args.workload != "mooncake":
        raise TraceError(f"unknown workload {args.workload!r}: mooncake or chat")
    if trace is None:
        raise TraceError("the mooncake workload needs --trace (the Mooncake conversation trace)")
    return load_mooncake(trace, args.requests)


def plot_cdfs(results: dict[str, dict[str, object]], path: pathlib.Path, title: str) -> None:
    """TTFT CDF per router, one line each (needs matplotlib: ``pip install 'kvmesh[plots]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in results.items():
        xs = m.get("ttfts_ms")
        if isinstance(xs, list) and xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, client side, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(trace: pathlib.Path | None, model_dir: pathlib.Path, run_dir: pathlib.Path,
            args: CompareArgs) -> dict[str, object]:
    """Run every router of ``args.routers`` over the same 8 simulated engines; returns the metrics."""
    # sglang-router probes workers with HTTP/2 (gRPC) at start-up; the simulated engines answer HTTP/1.1
    # only and aiohttp logs each probe as a bad request.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    reqs = load_workload(trace, args)
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in [*run_dir.glob("requests-*.jsonl"), *run_dir.glob("probe-*.jsonl")]:  # an earlier compare's
        old.unlink()
    pool = EnginePool(8, model_dir, run_dir, 1.0 / args.speedup)
    runs: dict[str, list[dict[str, object]]] = {}
    try:
        for _ in range(max(args.repeats, 1)):  # interleaved: a slow spell of the host hits every router
            for name in args.routers.split(","):
                m = run_one(name, pool, reqs, args, model_dir, run_dir)
                runs.setdefault(name, []).append(m)
                print(router_line(name, m), flush=True)
    finally:
        pool.stop()
    results = {name: merge_runs(rs) for name, rs in runs.items()}
    if args.plot is not None:
        plot_cdfs(results, args.plot, f"{args.workload}: {len(reqs)} requests, 8 simulated engines")
    for m in results.values():
        m.pop("ttfts_ms", None)
    metrics: dict[str, object] = {"workload": args.workload, "requests": len(reqs), "speedup": args.speedup,
                                  "load": args.load, "routers": results}
    metrics["slo"] = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}
    metrics.update(ratios(results))
    if args.repeats > 1:
        metrics["repeats"] = args.repeats
        metrics.update(paired_ratios(runs))
    return metrics


def run_one(name: str, pool: EnginePool, reqs: list[TraceRequest], args: CompareArgs,
            model_dir: pathlib.Path, run_dir: pathlib.Path) -> dict[str, object]:
    """One replay through router ``name``; an error entry (not an exception) when it cannot run."""
    if not name.startswith("kvmesh-") and not ROUTERS_BIN.is_dir():
        return {"error": "not installed: run `make routers`"}
    try:
        return run_router(name, pool, reqs, args, model_dir, free_ports(1)[0], run_dir)
    except (TimeoutError, OSError, httpx.HTTPError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def merge_runs(rs: list[dict[str, object]]) -> dict[str, object]:
    """One router's repeats as one entry: request counts summed, every other figure the mean of the runs,
    and each run's mean TTFT kept (``ttft_mean_ms_runs``) so the spread stays visible.  Real-time replays
    on a shared 2-core host move 10-30 % from run to run; one run per router decides nothing."""
    ok = [r for r in rs if "error" not in r]
    if len(rs) == 1 or not ok:
        return rs[0]
    out: dict[str, object] = {"runs": len(ok)}
    for key, first in ok[0].items():
        vals = [r.get(key) for r in ok]
        if key in ("ok", "errors"):
            out[key] = sum(v for v in vals if isinstance(v, (int, float)))
        elif key == "ttfts_ms":
            out[key] = sorted(x for v in vals if isinstance(v, list) for x in v)
        elif isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in vals):
            out[key] = round(sum(v for v in vals if isinstance(v, (int, float))) / len(vals), 4)
    out["ttft_mean_ms_runs"] = [r.get("ttft_mean_ms") for r in ok]
    if len(ok) < len(rs):
        out["failed_runs"] = len(rs) - len(ok)
    return out


def paired_ratios(runs: dict[str, list[dict[str, object]]]) -> dict[str, object]:
    """kv-aware's ratios within each round (the same host conditions, give or take a minute): the list,
    so a reader sees whether a mean ratio is one lucky round."""
    n = min((len(v) for v in runs.values()), default=0)
    per_round = [ratios({name: rs[i] for name, rs in runs.items()}) for i in range(n)]
    keys = sorted({k for r in per_round for k in r})
    return {f"{k}_runs": [r.get(k) for r in per_round] for k in keys}


def router_line(name: str, m: dict[str, object]) -> str:
    """One line per finished router while the comparison runs (the table follows at the end)."""
    if "error" in m:
        return f"{name}: {m['error']}"
    return (f"{name}: TTFT mean {m['ttft_mean_ms']} ms (engines' own {m.get('engine_ttft_mean_ms')} ms), "
            f"p99 {m['ttft_p99_ms']} ms; goodput {m['goodput']}; "
            f"hit rate {m['hit_rate']}; {m['ok']} ok, {m['errors']} errors; router CPU {m.get('router_cpu_s')} s")


_COLUMNS = (("TTFT mean ms", "ttft_mean_ms"), ("engine TTFT", "engine_ttft_mean_ms"), ("TTFT p50", "ttft_p50_ms"),
            ("TTFT p99", "ttft_p99_ms"), ("TPOT p50", "tpot_p50_ms"), ("TPOT p99", "tpot_p99_ms"),
            ("goodput", "goodput"),
            ("hit rate", "hit_rate"), ("busiest/mean", "load_max_over_mean"), ("router CPU s", "router_cpu_s"),
            ("ok", "ok"), ("errors", "errors"))


def table(metrics: dict[str, object]) -> Table:
    """The routers side by side (a rich table): one row per router, a router that could not run says why."""
    t = Table(title=f"{metrics['workload']}: {metrics['requests']} requests, 8 simulated engines, speed-up "
                    f"{metrics['speedup']}, load x{metrics['load']}")
    t.add_column("router", no_wrap=True)
    for title, _ in _COLUMNS:
        t.add_column(title, justify="right")
    routers = metrics["routers"]
    for name, m in routers.items() if isinstance(routers, dict) else ():
        if "error" in m:
            t.add_row(name, Text(str(m["error"]), style="red"), *[""] * (len(_COLUMNS) - 1))
        else:
            t.add_row(name, *("-" if m.get(key) is None else str(m[key]) for _, key in _COLUMNS))
    return t


def print_table(metrics: dict[str, object]) -> None:
    """:func:`table` and the kv-aware ratios, on stdout (plain text when stdout is not a terminal)."""
    console = Console()
    if not console.is_terminal:  # a pipe or a file: rich would squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table(metrics))
    for key, value in metrics.items():
        if key.startswith("kvaware_"):
            console.print(f"{key} = {value}", highlight=False)


def ratios(results: dict[str, dict[str, object]]) -> dict[str, float]:
    """kv-aware against the others: mean TTFT, TPOT p99 and goodput ratios, and its load spread."""
    kv = results.get("kvmesh-kv-aware", {})
    out: dict[str, float] = {}
    pairs = (("kvaware_ttft_mean_over_sglang", "sglang-cache_aware", "ttft_mean_ms"),
             ("kvaware_ttft_mean_over_rr", "kvmesh-round-robin", "ttft_mean_ms"),
             ("kvaware_ttft_mean_over_session", "kvmesh-session", "ttft_mean_ms"),
             ("kvaware_tpot_p99_over_session", "kvmesh-session", "tpot_p99_ms"),
             ("kvaware_goodput_over_rr", "kvmesh-round-robin", "goodput"))
    for key, other, field_ in pairs:
        a, b = kv.get(field_), results.get(other, {}).get(field_)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = round(a / b, 3)
    spread = kv.get("load_max_over_mean")
    if isinstance(spread, float):
        out["kvaware_busiest_over_mean"] = spread
    return out
