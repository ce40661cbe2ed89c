"""Soak: mixed traffic through a ``kvmesh gateway`` process for a while, with an engine killed periodically.

Two simulated engines (supervised: a killed one is restarted) behind a gateway subprocess.  Clients send a
mix of streaming and non-streaming completions and chats, hang up on some streams midway, and send some
invalid requests.  Every ``--fault-interval`` seconds one engine is killed.  Every request must end in
exactly one of: success, a clear error (OpenAI JSON error, or an SSE error event mid-stream), or the
client's own cancel — anything else (hang, malformed response, connection error) counts as lost.
The gateway's RSS and open file descriptors are read from /proc at start (after warm-up) and at the end.

    python bench/soak.py --duration 600 --fault-interval 60      # the 10-minute soak
    python bench/soak.py --duration 120 --fault-interval 30      # the CI version (tests/test_soak.py)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import random
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import wait_http, write_result
from kvmesh.config import SupervisorConfig
from kvmesh.engines import SimEngine, Supervisor
from kvmesh.models import demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = "kvmesh-demo"


def proc_stats(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open fds) of a process."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss, len(list(pathlib.Path(f"/proc/{pid}/fd").iterdir()))


def _clear_error(r: httpx.Response) -> None:
    """A clear error is an OpenAI-style JSON body; raises (→ counted as lost) otherwise."""
    if not isinstance(r.json()["error"]["message"], str):
        raise TypeError("error without a message")


async def one(http: httpx.AsyncClient, url: str, rng: random.Random, outcomes: collections.Counter[str]) -> None:
    kind = rng.choices(["stream", "whole", "chat", "cancel", "bad"], [4, 3, 2, 1, 1])[0]
    body: dict[str, object] = {"model": MODEL, "max_tokens": rng.randrange(4, 40), "ignore_eos": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "soak " * rng.randrange(1, 200)}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "soak test " * rng.randrange(1, 300)
        path = "/v1/completions"
    if kind == "bad":
        body["max_tokens"] = "lots"
    stream = kind in ("stream", "cancel")
    body["stream"] = stream
    try:
        if not stream:
            r = await http.post(url + path, json=body)
            outcomes["ok" if r.status_code == 200 else f"error_{r.status_code}"] += 1
            if r.status_code != 200:
                _clear_error(r)
            return
        async with http.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                _clear_error(r)
                outcomes[f"error_{r.status_code}"] += 1
                return
            n, last = 0, ""
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n, last = n + 1, line
                    if kind == "cancel" and n == 2:
                        outcomes["client_cancel"] += 1
                        return
            if last == "data: [DONE]":
                outcomes["ok"] += 1
            elif '"error"' in last:
                outcomes["error_midstream"] += 1
            else:
                outcomes["lost_truncated"] += 1
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        outcomes[f"lost_{type(e).__name__}"] += 1


async def traffic(url: str, duration: float, concurrency: int, outcomes: collections.Counter[str]) -> None:
    rng = random.Random(5)
    deadline = time.monotonic() + duration
    async with httpx.AsyncClient(timeout=60) as http:
        async def worker(i: int) -> None:
            r = random.Random(rng.random() + i)
            while time.monotonic() < deadline:
                await one(http, url, r, outcomes)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def faults(sup: Supervisor, duration: float, interval: float, log: list[str]) -> None:
    deadline = time.monotonic() + duration
    i = 0
    while time.monotonic() + interval < deadline:
        await asyncio.sleep(interval)
        victim = sup.engines[i % len(sup.engines)]
        assert isinstance(victim, SimEngine)
        await victim.kill()
        log.append(f"{time.monotonic():.0f}: killed {victim.name}")
        i += 1


async def run(args: argparse.Namespace) -> dict[str, object]:
    model = ROOT / "models" / "demo-tiny"
    if not demo.is_complete(model):
        demo.generate("tiny", model)
    engines = [SimEngine(f"engine-{i}", str(model), MODEL, args.engine_port + i, time_scale=0.2) for i in range(2)]
    sup = Supervisor(engines, SupervisorConfig(replicas=2, restart_backoff_s=0.5, restart_backoff_max_s=2))
    await sup.start(wait=True)
    cmd = [sys.executable, "-m", "kvmesh", "gateway", "--port", str(args.port), "--policy", "least-request"]
    for e in engines:
        cmd += ["--backend", e.url]
    gw = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    outcomes: collections.Counter[str] = collections.Counter()
    fault_log: list[str] = []
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{args.port}/ready", 30)
        url = f"http://127.0.0.1:{args.port}"
        await traffic(url, 5, args.concurrency, collections.Counter())  # warm-up, not counted
        rss0, fd0 = proc_stats(gw.pid)
        await asyncio.gather(traffic(url, args.duration, args.concurrency, outcomes),
                             faults(sup, args.duration, args.fault_interval, fault_log))
        await asyncio.sleep(1)
        rss1, fd1 = proc_stats(gw.pid)
    finally:
        gw.terminate()
        await gw.wait()
        await sup.stop()
    lost = sum(v for k, v in outcomes.items() if k.startswith("lost"))
    return {"duration_s": args.duration, "fault_interval_s": args.fault_interval, "faults": len(fault_log),
            "requests": sum(outcomes.values()), "lost_requests": lost,
            "errors_by_kind": {k: v for k, v in sorted(outcomes.items()) if k != "ok"},
            "succeeded": outcomes["ok"], "rss_start_kib": rss0, "rss_end_kib": rss1,
            "rss_growth_pct": round((rss1 - rss0) / rss0 * 100, 2), "fd_start": fd0, "fd_end": fd1,
            "fd_growth": fd1 - fd0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--fault-interval", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=18700)
    ap.add_argument("--engine-port", type=int, default=18710)
    ap.add_argument("--out", default="soak", help="result name under bench/results ('-' to skip writing)")
    args = ap.parse_args()
    m = asyncio.run(run(args))
    print(json.dumps(m, indent=2))
    if args.out != "-":
        print(f"wrote {write_result(args.out, m)}")


if __name__ == "__main__":
    main()
