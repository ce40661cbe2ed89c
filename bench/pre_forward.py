"""The gateway's pre-forward time (arrival → forwarding) replaying the Mooncake conversation trace.

The setup of ``kvmesh bench compare``: 8 simulated engines in this process, a real kvmesh gateway process
(kv-aware policy, the demo tokenizer) in front of them, a slice of the trace replayed open-loop as streamed
``/v1/completions``.  The time is read from the gateway's own ``kvmesh_gateway_overhead_seconds``
histogram (read, parse, validate, admit, tokenise, block keys, route): the mean is exact, p50/p99 are
interpolated linearly inside the histogram's buckets (edges 0.25, 0.5, 1, 2.5, 5 ms ...), and
``le_1ms`` is the exact fraction of requests forwarded within 1 ms.

First the tokenise stage alone (encode + block keys per prompt, in trace order, in this process): a full
encode, the prefix cache, and the lazy stop (``encode_held``, with "held" = every block of the prompts before:
no eviction, lazy's worst case); the ids are checked equal.  Then one gateway run per variant over the same
engines (caches reset between): ``eager`` (every prompt encoded whole, no prefix cache: the gateway before
this work), ``cached`` (whole, with the prefix cache) and ``lazy`` (the default: up to the first block no
engine holds).  The gateway runs as a child of this script (``--serve``), built like ``kvmesh gateway``,
pinned to its own CPU (``--gateway-cpu``) while the engines and the load generator run on the others — as
they would on separate machines; without that, a 2-core host measures its own contention.

    python bench/pre_forward.py [--requests 600 --speedup 4 --load 1 --variants eager,cached,lazy]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import wait_http, write_result
from kvmesh.bench.compare import BLOCK_SIZE, EnginePool, prompt, replay
from kvmesh.bench.util import pct
from kvmesh.models import demo
from kvmesh.tokenize import PromptTokenizer
from kvmesh.workloads import load_mooncake

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"
PORT = 18690


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """([(upper edge, cumulative count)], sum, count) of a Prometheus histogram without labels."""
    buckets = [(float(le), float(v)) for le, v in re.findall(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M)]
    total = re.search(rf"^{name}_sum (\S+)$", text, re.M)
    count = re.search(rf"^{name}_count (\S+)$", text, re.M)
    return buckets, float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Linear interpolation inside the bucket holding quantile ``q`` (as Prometheus' histogram_quantile)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lo_edge, lo_count = 0.0, 0.0
    for edge, count in buckets:
        if count >= rank:
            if edge == float("inf"):
                return lo_edge
            return lo_edge + (edge - lo_edge) * (rank - lo_count) / max(count - lo_count, 1e-9)
        lo_edge, lo_count = edge, count
    return None


def overhead_stats(url: str) -> dict[str, float | None]:
    text = httpx.get(f"{url}/metrics").text
    buckets, total, count = histogram(text, "kvmesh_gateway_overhead_seconds")
    tok_buckets, tok_total, tok_count = histogram(text, "kvmesh_gateway_tokenize_seconds")
    le_1ms = next((c for e, c in buckets if e == 0.001), None)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 3)

    return {"pre_forward_p50_ms": ms(quantile(buckets, 0.5)), "pre_forward_p99_ms": ms(quantile(buckets, 0.99)),
            "pre_forward_mean_ms": ms(total / count) if count else None,
            "le_1ms": round(le_1ms / count, 4) if le_1ms is not None and count else None,
            "tokenize_p50_ms": ms(quantile(tok_buckets, 0.5)),
            "tokenize_mean_ms": ms(tok_total / tok_count) if tok_count else None}


def stage_only(model_dir: pathlib.Path, trace: pathlib.Path, n: int) -> dict[str, object]:
    """The tokenise stage's own work per request (encode + block keys, one thread, no queueing), replaying
    ``n`` prompts in trace order through a cache-less tokenizer and a prefix-cached one; also checks they
    agree."""
    full, cached, lazy = (PromptTokenizer(model_dir, prefix_cache=False), PromptTokenizer(model_dir),
                          PromptTokenizer(model_dir))
    times: dict[str, list[float]] = {"full": [], "cached": [], "lazy": []}
    reused = total = 0
    held: set[int] = set()  # as if the engines held every block routed so far (no eviction): lazy's worst case
    for r in load_mooncake(trace, n):
        text = prompt(r)
        t0 = time.perf_counter()
        a = full.encode(text, True, BLOCK_SIZE, 1)
        t1 = time.perf_counter()
        b = cached.encode(text, True, BLOCK_SIZE, 1)
        t2 = time.perf_counter()
        c = lazy.encode_held(text, True, BLOCK_SIZE, 1, held.__contains__)
        t3 = time.perf_counter()
        if a.ids != b.ids or a.keys != b.keys or c.ids != a.ids[:len(c.ids)] or c.keys != (a.keys or [])[:len(c.keys)]:
            raise AssertionError("the prefix cache or the lazy stop changed the ids")  # exactness is the contract
        for name, dt in (("full", t1 - t0), ("cached", t2 - t1), ("lazy", t3 - t2)):
            times[name].append(dt)
        reused, total = reused + b.reused, total + len(b.ids)
        held.update(a.keys or [])
    return {"requests": n, "reused_token_fraction": round(reused / total, 4),
            **{f"{name}_{q}_ms": round(pct(ts, q) * 1000, 3) for name, ts in times.items() for q in (50, 99)}}


def run_variant(variant: str, pool: EnginePool, args: argparse.Namespace,
                model_dir: pathlib.Path, log_dir: pathlib.Path) -> dict[str, object]:
    urls = pool.urls()
    for u in urls:
        httpx.post(f"{u}/reset_prefix_cache").raise_for_status()
    cmd = [sys.executable, __file__, "--serve", json.dumps({
        "urls": urls, "events": [s.kv_events_endpoint for s in pool.servers], "tokenizer": str(model_dir),
        "port": PORT, "variant": variant, "cpu": args.gateway_cpu})]
    log = log_dir / f"gateway-{variant}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{PORT}"
    try:
        _wait_ready(proc, url)
        reqs = load_mooncake(args.trace, args.requests)
        ttfts, errors = asyncio.run(replay(url, reqs, args.speedup * args.load))
        stats: dict[str, object] = {**overhead_stats(url)}
    finally:
        proc.terminate()
        proc.wait(10)
    stats.update({"ttft_p50_ms": round(pct(ttfts, 50) * 1000, 1) if ttfts else None,
                  "ok": len(ttfts), "errors": errors})
    return stats


def _wait_ready(proc: subprocess.Popen[bytes], url: str) -> None:
    for _ in range(120):
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited ({proc.returncode}); see run/pre_forward/gateway-*.log")
        try:
            wait_http(f"{url}/v1/models", 0.5)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"{url} not ready after 60 s")


def serve(spec_json: str) -> None:
    """Child mode: the gateway ``kvmesh gateway --policy kv-aware`` would run (``lazy``, the default), or
    tokenising every prompt whole first (``cached``), or also without the prefix cache (``eager``)."""
    import logging

    from kvmesh.cli import _serve
    from kvmesh.config import GatewayConfig
    from kvmesh.gateway import Gateway
    from kvmesh.gateway.tokens import TokenStage

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(spec_json)
    backends = [{"url": u, "kv_events": e} for u, e in zip(spec["urls"], spec["events"], strict=True)]
    if spec["cpu"] is not None:
        os.sched_setaffinity(0, {spec["cpu"]})
    cfg = GatewayConfig.model_validate({"backends": backends, "port": spec["port"], "policy": "kv-aware",
                                        "tokenizer": spec["tokenizer"], "lazy_tokenize": spec["variant"] == "lazy"})
    gw = Gateway(cfg)
    if gw.tokens is not None and spec["variant"] == "eager":
        gw.tokens.close()
        gw.tokens = TokenStage(cfg.tokenizer, gw.metrics, prefix_cache=False)
    _serve(gw.start, gw.stop, lambda: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--speedup", type=float, default=4.0, help="engines run this much faster than real time")
    ap.add_argument("--load", type=float, default=1.0, help="arrivals this much denser than the trace's")
    ap.add_argument("--trace", type=pathlib.Path, default=TRACE)
    ap.add_argument("--variants", default="eager,cached,lazy",
                    help="eager (tokenise all, no prefix cache), cached (tokenise all, prefix cache), lazy (default)")
    ap.add_argument("--gateway-cpu", type=int, default=0 if (os.cpu_count() or 1) > 1 else None,
                    help="pin the gateway to this CPU and everything else off it (default 0 on 2+ cores)")
    ap.add_argument("--stage-requests", type=int, default=3993, help="prompts for the stage-only measurement")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return
    if not a.trace.is_file():
        print(f"SKIP: the Mooncake trace is absent ({a.trace}); nothing recorded")
        return
    model_dir = ROOT / "models" / "demo-tiny"
    if not demo.is_complete(model_dir):
        demo.generate("tiny", model_dir)
    stage = stage_only(model_dir, a.trace, a.stage_requests)
    print(f"tokenise stage only: {stage}")
    run_dir = ROOT / "run" / "pre_forward"
    if a.gateway_cpu is not None:  # engines and load generator off the gateway's core, as on separate machines
        os.sched_setaffinity(0, (os.sched_getaffinity(0) - {a.gateway_cpu}) or os.sched_getaffinity(0))
    pool = EnginePool(8, model_dir, run_dir, 1.0 / a.speedup)
    results: dict[str, object] = {}
    try:
        for v in a.variants.split(","):
            results[v] = r = run_variant(v, pool, a, model_dir, run_dir)
            print(f"{v:6}: {r}")
    finally:
        pool.stop()
    metrics = {"workload": "mooncake", "requests": a.requests, "speedup": a.speedup, "load": a.load,
               "policy": "kv-aware", "stage_only": stage, **results}
    on = results.get("lazy")
    if isinstance(on, dict):
        metrics["pre_forward_p50_ms"] = on["pre_forward_p50_ms"]
        metrics["pre_forward_p99_ms"] = on["pre_forward_p99_ms"]
    print(f"wrote {write_result('pre_forward', metrics)}")


if __name__ == "__main__":
    main()
