"""A quiet tenant's TTFT while another tenant floods the fleet — with and without kvmesh's admission queue.

Two simulated engines (the ``cpu-demo-small`` timing profile, real time) behind a gateway, started as one
``kvmesh up --engine-kind sim`` process, with two tenants.  Phase "solo": the quiet tenant sends a short
streaming request every ``--interval`` seconds.  Phase "flood": the same, while the noisy tenant keeps
``--flood`` requests in flight (closed loop, longer outputs).  Both phases run twice: with admission control
(``max_in_flight_per_backend``: excess requests wait in the gateway, admitted by virtual token counters
across tenants) and without it (everything goes straight to the engines' own FCFS queues).  Reported: the
quiet tenant's p50/p99 TTFT per phase and the flood/solo p99 ratio (goal ≤ 2 with admission), plus the
noisy tenant's throughput.

    python bench/fairness.py [--duration 30] [--flood 32] [--engine-kind vllm --name fairness_vllm]
    python bench/fairness.py --engine-kind vllm --replicas 1 --engine-cores 1 --gateway-cores 0 \
        --name fairness_vllm_isolated

``--engine-cores`` / ``--gateway-cores`` keep the engines' processes (vLLM-CPU busy-polls between its API
server, engine core and worker) off the cores the gateway and this load generator run on, as separate
machines would; without them, everything shares every core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import pct, wait_http, write_result
from kvmesh.config import parse_cpu_list
from kvmesh.gateway.tenants import hash_key
from kvmesh.models import demo
from kvmesh.stack import DEMO_MODEL_NAME

KEYS = {"quiet": "sk-quiet", "noisy": "sk-noisy"}


async def ttft(http: httpx.AsyncClient, url: str, key: str, max_tokens: int, stream: bool = True) -> float | None:
    body = {"model": DEMO_MODEL_NAME, "prompt": "fairness probe " * 20, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    if not stream:  # the flood: the engines work as hard, the gateway and this client relay one body each
        r = await http.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        return time.perf_counter() - t0 if r.status_code == 200 else None
    first = None
    async with http.stream("POST", f"{url}/v1/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - t0
    return first


async def phase(url: str, args: argparse.Namespace, flood: bool) -> dict[str, Any]:
    stop = asyncio.Event()
    noisy_done = 0

    async def noisy_worker(http: httpx.AsyncClient) -> None:
        nonlocal noisy_done
        while not stop.is_set():
            if await ttft(http, url, KEYS["noisy"], 64, stream=args.stream_flood) is not None:
                noisy_done += 1

    quiet: list[float] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=args.flood + 8)) as http:
        workers = [asyncio.create_task(noisy_worker(http)) for _ in range(args.flood if flood else 0)]
        await asyncio.sleep(3 if flood else 0)  # let the flood fill the fleet first
        probes = []
        t_end = time.monotonic() + args.duration
        while time.monotonic() < t_end:
            probes.append(asyncio.create_task(ttft(http, url, KEYS["quiet"], 8)))
            await asyncio.sleep(args.interval)
        quiet = [t for t in await asyncio.gather(*probes) if t is not None]
        stop.set()
        await asyncio.gather(*workers)
    return {"quiet_ttft_p50_s": pct(quiet, 50), "quiet_ttft_p99_s": pct(quiet, 99), "quiet_n": len(quiet),
            "noisy_rps": noisy_done / (args.duration + 3) if flood else 0.0}


def run(args: argparse.Namespace, admission: bool, tmp: pathlib.Path) -> dict[str, Any]:
    """The stack runs as its own process (``kvmesh up``), as in production: clients do not share its CPU
    time or event loop."""
    tf = tmp / "tenants.toml"
    tf.write_text("".join(f'[[tenants]]\nname = "{t}"\nkey_sha256 = ["{hash_key(k)}"]\n' for t, k in KEYS.items()))
    model = tmp / "demo-tiny"
    if not demo.is_complete(model):
        demo.generate("tiny", model)
    port = args.port + 10
    limits = f"max_in_flight_per_backend = {args.per_backend}\n" if admission else ""
    pin = f'cpu_affinity = "{args.engine_cores}"\ncpu_bind = "{args.engine_cores}"\n' if args.engine_cores else ""
    # vLLM-only fields: a simulated engine's config refuses them (it runs inside the `kvmesh up` process)
    vllm_only = "max_model_len = 4096\n" + pin if args.engine_kind == "vllm" else ""
    conf = tmp / f"stack-{admission}.toml"
    conf.write_text(f"""model_size = "tiny"
engine_kind = "{args.engine_kind}"
[engine]
kind = "{args.engine_kind}"
model = "{model}"
served_model_name = "{DEMO_MODEL_NAME}"
{vllm_only}[cache]
enabled = false
[supervisor]
replicas = {args.replicas}
base_port = {args.port}
run_dir = "{tmp / 'run'}"
[gateway]
port = {port}
policy = "least-request"
tenants_file = "{tf}"
max_queue = 10000
queue_timeout_s = 300
{limits}""")
    gw_cores = parse_cpu_list(args.gateway_cores) if args.gateway_cores else None
    proc = subprocess.Popen([sys.executable, "-m", "kvmesh", "up", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, gw_cores)) if gw_cores else None)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ready", 300)
        solo = asyncio.run(phase(url, args, flood=False))
        flooded = asyncio.run(phase(url, args, flood=True))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    ratio = flooded["quiet_ttft_p99_s"] / solo["quiet_ttft_p99_s"]
    name = "with admission" if admission else "without admission"
    print(f"{name:>18}: quiet p99 TTFT solo {solo['quiet_ttft_p99_s'] * 1000:.0f} ms, under flood "
          f"{flooded['quiet_ttft_p99_s'] * 1000:.0f} ms ({ratio:.2f}x); noisy {flooded['noisy_rps']:.1f} req/s")
    return {"solo": solo, "flood": flooded, "p99_flood_over_solo": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--flood", type=int, default=32)
    ap.add_argument("--per-backend", type=int, default=4)
    ap.add_argument("--port", type=int, default=28900)
    ap.add_argument("--engine-kind", choices=["sim", "vllm"], default="sim",
                    help="sim: two simulated engines (default); vllm: two vLLM-CPU engines, tiny demo model")
    ap.add_argument("--stream-flood", action=argparse.BooleanOptionalAction, default=True,
                    help="the noisy tenant streams (default) or not (less relay work on a small machine)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--engine-cores", help="CPU list for every engine process (e.g. '1'); default: all")
    ap.add_argument("--gateway-cores", help="CPU list for the gateway and this load generator (e.g. '0')")
    ap.add_argument("--name", default="fairness", help="result file name (bench/results/NAME.json)")
    args = ap.parse_args()
    if args.gateway_cores:
        os.sched_setaffinity(0, parse_cpu_list(args.gateway_cores))
    with tempfile.TemporaryDirectory() as d:
        with_adm = run(args, True, pathlib.Path(d))
        without = run(args, False, pathlib.Path(d))
    metrics = {"quiet_p99_flood_over_solo": with_adm["p99_flood_over_solo"],
               "quiet_p99_flood_over_solo_without_admission": without["p99_flood_over_solo"],
               "with_admission": with_adm, "without_admission": without}
    metrics.update(engine_kind=args.engine_kind, replicas=args.replicas, engine_cores=args.engine_cores,
                   gateway_cores=args.gateway_cores, flood=args.flood, stream_flood=args.stream_flood)
    print("wrote", write_result(args.name, metrics))


if __name__ == "__main__":
    main()
