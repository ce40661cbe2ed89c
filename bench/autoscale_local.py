"""``kvmesh up --autoscale`` on real processes under a step load: does it scale out and back in without
failing a request, cutting a stream, or serving a new replica's first requests from a cold cache?

A child process runs the stack (gateway + simulated engines, ``kvmesh.stack.Stack`` with the local
autoscaler, as ``kvmesh up --autoscale`` builds it); this process is the load generator and the observer.
The engines are simulated (``kind = "sim"``, the ``cpu-demo-small`` profile with 4 batch slots, so a queue
forms within seconds); the policy is the real ``queue`` policy (KEDA on ``vllm:num_requests_waiting``, target
5 per replica) with its windows shortened through ``LocalConfig.tuning`` (a 2 s polling period instead of
30 s, a 45 s cooldown instead of 360 s) so the whole step fits in ~4 minutes.

Load: closed-loop streaming clients (``stream_options.include_usage``, so each answer says its cached prompt
tokens), every prompt a shared 256-token hot prefix + a unique 32-token suffix; low (2 clients) → high (16)
→ low (2).  Recorded: replicas over time (``GET /debug/autoscale`` every second), the scale events, failed
requests and cut streams (a stream without ``[DONE]`` or with an error event), and for each replica the
scale-out started, the cached prompt tokens of its first requests (pre-warm observed when they hold the hot
prefix: a cold replica's first request would find 0).  A correctness bench more than a timing one: run it
under ``nice``; the figures that matter are counts.

    python bench/autoscale_local.py              # -> bench/results/autoscale_local.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp

from kvmesh.autoscale.local import LocalConfig
from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig, engine_config
from kvmesh.models import demo
from kvmesh.sim.profiles import PROFILES
from kvmesh.stack import DEMO_MODEL_NAME, Stack

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench.common import write_result

HOT = [11 + (i * 7) % 4000 for i in range(256)]  # the shared hot prefix: 16 blocks of 16 tokens
PHASES = (("low", 40.0, 2), ("high", 75.0, 16), ("low", 90.0, 2))  # (name, seconds, clients)
POLICY = "queue"
TUNING = {"period_s": 2.0, "scale_down_window_s": 45.0}
MAX_REPLICAS = 3
FIRST_N = 3  # a new replica's first requests examined for pre-warm


# ---- the child: the stack -------------------------------------------------------------------------
async def serve(run_dir: pathlib.Path, port: int, base_port: int) -> None:
    model = demo.generate("tiny", run_dir / "demo-tiny")
    profile = dataclasses.replace(PROFILES["cpu-demo-small"], name="bench-4-slots", max_running=4)
    (run_dir / "profile.json").write_text(json.dumps(dataclasses.asdict(profile)))
    cfg = StackConfig(model_size="tiny", models_dir=str(model.parent),
                      engine=engine_config(kind="sim", model=str(model), served_model_name=DEMO_MODEL_NAME,
                                           profile=str(run_dir / "profile.json")),
                      supervisor=SupervisorConfig(replicas=1, base_port=base_port, run_dir=str(run_dir)),
                      gateway=GatewayConfig(port=port, policy="kv-aware", health_interval_s=0.5),
                      cache=CacheNodeConfig(enabled=False))
    auto = LocalConfig(policy=POLICY, min_replicas=1, max_replicas=MAX_REPLICAS, interval_s=1.0, start_s=1.0,
                       ramp_s=5.0, tuning=TUNING)
    st = Stack(cfg, autoscale=auto)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await st.start(wait=True)
    print(st.gateway.url, flush=True)
    try:
        await stop.wait()
    finally:
        await st.stop()


# ---- the parent: load and observation ---------------------------------------------------------------
@dataclasses.dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    cut: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    by_backend: dict[str, list[tuple[float, int]]] = dataclasses.field(default_factory=dict)  # (t, cached)


async def one(http: aiohttp.ClientSession, url: str, n: int, tally: Tally, t0: float) -> None:
    body = {"model": DEMO_MODEL_NAME, "prompt": [*HOT, *(5000 + (n * 32 + j) % 3000 for j in range(32))],
            "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with http.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                tally.failed += 1
                tally.errors.append(f"{r.status}: {(await r.text())[:200]}")
                return
            backend = r.headers.get("x-kvmesh-backend", "?")
            lines = [ln.decode().strip() async for ln in r.content if ln.startswith(b"data: ")]
    except (aiohttp.ClientError, TimeoutError) as e:
        tally.failed += 1
        tally.errors.append(repr(e))
        return
    bad = [ln for ln in lines[:-1] if "error" in json.loads(ln[len("data: "):])]  # an error event mid-stream
    if not lines or lines[-1] != "data: [DONE]" or bad:
        tally.cut += 1
        tally.errors.append(f"cut stream from {backend}: {(bad or lines)[-1:]}")
        return
    usage = json.loads(lines[-2][len("data: "):]).get("usage") or {}
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    tally.ok += 1
    tally.by_backend.setdefault(backend, []).append((time.monotonic() - t0, cached))


async def client(http: aiohttp.ClientSession, url: str, until: float, tally: Tally, t0: float,
                 counter: list[int]) -> None:
    while time.monotonic() < until:
        counter[0] += 1
        await one(http, url, counter[0], tally, t0)


async def observe(http: aiohttp.ClientSession, url: str, t0: float, samples: list[dict[str, Any]],
                  done: asyncio.Event) -> dict[str, Any]:
    state: dict[str, Any] = {}
    while not done.is_set():
        async with http.get(f"{url}/debug/autoscale") as r:
            state = await r.json()
        samples.append({"t": round(time.monotonic() - t0, 1), "serving": len(state["serving"]),
                        "starting": len(state["starting"]), "draining": len(state["draining"])})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1.0)
    return state


async def drive(url: str) -> dict[str, Any]:
    tally, counter = Tally(), [0]
    samples: list[dict[str, Any]] = []
    done = asyncio.Event()
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        watcher = asyncio.create_task(observe(http, url, t0, samples, done))
        phases = []
        for name, secs, clients in PHASES:
            start = time.monotonic()
            await asyncio.gather(*(client(http, url, start + secs, tally, t0, counter) for _ in range(clients)))
            phases.append({"phase": name, "clients": clients, "from_s": round(start - t0, 1),
                           "to_s": round(time.monotonic() - t0, 1)})
        await asyncio.sleep(2.0)  # one more sample after the last request
        done.set()
        state = await watcher
    return {"tally": tally, "samples": samples, "phases": phases, "state": state}


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    tally: Tally = run["tally"]
    state, samples = run["state"], run["samples"]
    events = [{k: v for k, v in ev.items() if k != "t"} for ev in state["events"]]
    scaled_out = [ev["replica"] for ev in events if ev["event"] == "serving"]
    first = {name: [c for _, c in sorted(tally.by_backend.get(name, []))[:FIRST_N]] for name in scaled_out}
    prewarmed = {name: bool(cs) and all(c >= len(HOT) - 16 for c in cs) for name, cs in first.items()}
    return {
        "policy": POLICY, "tuning": TUNING, "max_replicas": MAX_REPLICAS, "phases": run["phases"],
        "requests_ok": tally.ok, "failed_requests": tally.failed, "streams_cut": tally.cut,
        "errors": tally.errors[:10], "scale_events": state["scale_events"],
        "scale_out_replicas": scaled_out,
        "scale_in_stopped": [ev for ev in events if ev["event"] == "stopped"],
        "max_replicas_seen": max(s["serving"] for s in samples),
        "final_replicas": samples[-1]["serving"],
        "new_replica_first_cached_tokens": first, "hot_prefix_tokens": len(HOT),
        "prewarm_observed": bool(prewarmed) and all(prewarmed.values()),
        "prewarmed_prompts": [ev.get("prewarmed_prompts") for ev in events if ev["event"] == "serving"],
        "requests_per_backend": {b: len(v) for b, v in sorted(tally.by_backend.items())},
        "replicas_over_time": samples,
        "decisions_tail": [{k: d[k] for k in ("replicas", "recommended", "desired", "reason")}
                           for d in state["decisions"][-5:]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", nargs=3, metavar=("RUN_DIR", "PORT", "BASE_PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=18480, help="the gateway's port")
    ap.add_argument("--base-port", type=int, default=18490, help="engine-0's port (then +1, +2)")
    a = ap.parse_args()
    if a.serve:
        asyncio.run(serve(pathlib.Path(a.serve[0]), int(a.serve[1]), int(a.serve[2])))
        return
    with tempfile.TemporaryDirectory(prefix="kvmesh-autoscale-") as run_dir:
        child = subprocess.Popen([sys.executable, __file__, "--serve", run_dir, str(a.port), str(a.base_port)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            url = child.stdout.readline().strip() if child.stdout is not None else ""
            if not url.startswith("http"):
                raise SystemExit(f"the stack did not start (exit {child.wait()})")
            run = asyncio.run(drive(url))
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(60)
    metrics = summarise(run)
    out = write_result("autoscale_local", metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "replicas_over_time"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
