"""Side by side (``kvmesh bench compare``): kvmesh vs sglang-router vs vllm-router over the SAME simulated
engine pool, in real time.

8 simulated engines (Llama-3-8B/H100 profile, 512-token trace blocks scaled to 16 text words, time scaled
by ``--speedup``) run in this process and publish KV events.  Each router runs as its own process in
front of all 8; a slice of the Mooncake conversation trace is replayed open-loop at ``--speedup`` times
its timestamps (so the load matches the trace), with engine caches reset between routers.  Reported per
router: client-side streaming TTFT mean/p50/p99, engine prefix-cache hit rate (engines' own counters),
errors.  The other routers come from ``make routers`` (sglang-router and vllm-router in ``.venv-routers``).
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx

from kvmesh.bench.util import pct, wait_http
from kvmesh.bench.workloads import MOONCAKE_BLOCK, TraceRequest, load_mooncake
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.server import SimServer

ROUTERS_BIN = pathlib.Path(".venv-routers") / "bin"
DEFAULT_ROUTERS = ("kvmesh-kv-aware,kvmesh-round-robin,sglang-cache_aware,sglang-round_robin,"
                   "vllm-router-round_robin,vllm-router-consistent_hash")
MODEL = "kvmesh-demo"
WORDS_PER_BLOCK = 16


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
        self.servers = [SimServer(str(model_dir), MODEL, get_profile("h100-llama3-8b"), port=18500 + i,
                                  block_size=16, time_scale=time_scale, token_scale=MOONCAKE_BLOCK / 32,
                                  kv_events_endpoint=f"ipc://{run_dir}/sim{i}.sock", max_model_len=1 << 20)
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
    return [str(ROUTERS_BIN / "vllm-router"), "--port", str(port), "--policy", name[len("vllm-router-"):],
            "--worker-urls", *urls, "--log-level", "warning"]


async def replay(url: str, reqs: list[TraceRequest], speedup: float) -> tuple[list[float], int]:
    """Open loop: request i is sent at its trace timestamp / ``speedup``."""
    ttfts: list[float] = []
    errors = 0
    t0 = time.perf_counter()
    base = reqs[0].arrival_s

    async def one(http: httpx.AsyncClient, r: TraceRequest) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, (r.arrival_s - base) / speedup - (time.perf_counter() - t0)))
        body = {"model": MODEL, "prompt": prompt(r), "max_tokens": min(max(r.output_tokens, 1), 16),
                "stream": True, "ignore_eos": True}
        start = time.perf_counter()
        try:
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    errors += 1
                    return
                first = True
                async for line in resp.aiter_lines():
                    if first and line.startswith("data: {"):
                        ttfts.append(time.perf_counter() - start)
                        first = False
        except httpx.HTTPError:
            errors += 1

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1000)) as http:
        await asyncio.gather(*(one(http, r) for r in reqs))
    return ttfts, errors


def hit_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in urls:
        text = httpx.get(f"{u}/metrics").text
        hits += sum(float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M))
        queries += sum(float(v) for v in re.findall(r"^vllm:prefix_cache_queries_total\{[^}]*\} (\S+)$", text, re.M))
    return hits, queries


def run_router(name: str, pool: EnginePool, reqs: list[TraceRequest], args: CompareArgs,
               model_dir: pathlib.Path, port: int, log_dir: pathlib.Path) -> dict[str, object]:
    urls = pool.urls()
    for u in urls:
        httpx.post(f"{u}/reset_prefix_cache").raise_for_status()
    proc = subprocess.Popen(router_cmd(name, urls, port, pool, model_dir), stdout=subprocess.DEVNULL,
                            stderr=open(log_dir / f"router-{name}.log", "wb"))  # noqa: SIM115
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 60)
        h0, q0 = hit_counters(urls)
        ttfts, errors = asyncio.run(replay(f"http://127.0.0.1:{port}", reqs, args.speedup * args.load))
        h1, q1 = hit_counters(urls)
    finally:
        proc.terminate()
        proc.wait(10)
    return {"ttft_mean_ms": round(sum(ttfts) / max(len(ttfts), 1) * 1000, 1),
            "ttft_p50_ms": round(pct(ttfts, 50) * 1000, 1) if ttfts else None,
            "ttft_p99_ms": round(pct(ttfts, 99) * 1000, 1) if ttfts else None,
            "hit_rate": round((h1 - h0) / max(q1 - q0, 1), 4), "ok": len(ttfts), "errors": errors}


@dataclass(slots=True)
class CompareArgs:
    requests: int = 400
    speedup: float = 4.0
    load: float = 1.0
    routers: str = DEFAULT_ROUTERS


def compare(trace: pathlib.Path, model_dir: pathlib.Path, run_dir: pathlib.Path,
            args: CompareArgs) -> dict[str, object]:
    """Run every router of ``args.routers`` over the same 8 simulated engines; returns the metrics."""
    # sglang-router probes workers with HTTP/2 (gRPC) at start-up; the simulated engines answer HTTP/1.1
    # only and aiohttp logs each probe as a bad request.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    reqs = load_mooncake(trace, args.requests)
    run_dir.mkdir(parents=True, exist_ok=True)
    pool = EnginePool(8, model_dir, run_dir, 1.0 / args.speedup)
    results: dict[str, dict[str, object]] = {}
    try:
        for i, name in enumerate(args.routers.split(",")):
            if not name.startswith("kvmesh-") and not ROUTERS_BIN.is_dir():
                results[name] = {"error": "not installed: run `make routers`"}
                continue
            try:
                results[name] = run_router(name, pool, reqs, args, model_dir, 18600 + i, run_dir)
            except (TimeoutError, OSError, httpx.HTTPError) as e:
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:32} {results[name]}")
    finally:
        pool.stop()
    metrics: dict[str, object] = {"requests": args.requests, "speedup": args.speedup, "load": args.load,
                                  "routers": results}
    kv, sg, rr = (results.get(k, {}) for k in ("kvmesh-kv-aware", "sglang-cache_aware", "kvmesh-round-robin"))
    for key, other in (("kvaware_ttft_mean_over_sglang", sg), ("kvaware_ttft_mean_over_rr", rr)):
        a, b = kv.get("ttft_mean_ms"), other.get("ttft_mean_ms")
        if isinstance(a, float) and isinstance(b, float):
            metrics[key] = round(a / b, 3)
    return metrics
