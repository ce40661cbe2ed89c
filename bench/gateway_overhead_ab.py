"""The gateway's added latency, this tree against another kvmesh source tree, side by side in one run.

One simulated engine (``kvmesh engine --kind sim``, the tiny demo model) and two ``kvmesh gateway`` processes
in front of it: one from this tree, one from ``--baseline-src`` (e.g. a ``git worktree`` of an older commit).
Each round sends one non-streaming request directly and one through each gateway, in a shuffled order, over
kept-alive connections, so whatever else the machine does hits all three alike.  Reported: p50/p99 of the
paired differences (gateway − direct) for each tree, and their ratio.  Use it when the machine is too busy
for ``bench/gateway_overhead.py``'s absolute figures to mean anything.

    git worktree add /tmp/base <commit>
    python bench/gateway_overhead_ab.py --baseline-src /tmp/base/src [--requests 1000 --policy round-robin]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import pct, wait_http, write_result
from kvmesh.models import demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = "kvmesh-demo"


def spawn(args: list[str], src: pathlib.Path | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if src is not None:  # the baseline tree's kvmesh shadows the installed one
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.Popen([sys.executable, "-m", "kvmesh", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def gateway_args(port: int, engine: str, policy: str, model_dir: pathlib.Path) -> list[str]:
    extra = ["--tokenizer", str(model_dir)] if policy in ("kv-aware", "prefix") else []
    return ["gateway", "--port", str(port), "--backend", engine, "--policy", policy, *extra]


def rounds(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    body = {"model": MODEL, "prompt": "hello " * 64, "max_tokens": 1}
    times: dict[str, list[float]] = {k: [] for k in urls}
    rng = random.Random(0)
    with httpx.Client(timeout=60) as c:
        for i in range(n + 20):
            order = list(urls)
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                c.post(f"{urls[k]}/v1/completions", json=body).raise_for_status()
                if i >= 20:  # warm-up rounds are not counted
                    times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-src", type=pathlib.Path, required=True, help="the other tree's src/ directory")
    ap.add_argument("--requests", type=int, default=1000, help="rounds (one request per side each)")
    ap.add_argument("--policy", default="round-robin")
    ap.add_argument("--port", type=int, default=18300)
    a = ap.parse_args()
    model_dir = ROOT / "models" / "demo-tiny"
    if not demo.is_complete(model_dir):
        demo.generate("tiny", model_dir)
    engine = f"http://127.0.0.1:{a.port}"
    procs = [spawn(["engine", "--kind", "sim", "--model", str(model_dir), "--port", str(a.port),
                    "--served-model-name", MODEL, "--time-scale", "0.001"])]
    try:
        wait_http(f"{engine}/health", 60)
        procs.append(spawn(gateway_args(a.port + 1, engine, a.policy, model_dir)))
        procs.append(spawn(gateway_args(a.port + 2, engine, a.policy, model_dir), a.baseline_src))
        urls = {"direct": engine, "this": f"http://127.0.0.1:{a.port + 1}",
                "baseline": f"http://127.0.0.1:{a.port + 2}"}
        for u in urls.values():
            wait_http(f"{u}/v1/models", 60)
        t = rounds(urls, a.requests)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    added = {k: [g - d for g, d in zip(t[k], t["direct"], strict=True)] for k in ("this", "baseline")}
    m: dict[str, object] = {"requests": a.requests, "policy": a.policy, "baseline_src": str(a.baseline_src),
                            "direct_p50_ms": round(pct(t["direct"], 50) * 1000, 3)}
    for k, xs in added.items():
        m[f"{k}_added_p50_ms"] = round(pct(xs, 50) * 1000, 3)
        m[f"{k}_added_p99_ms"] = round(pct(xs, 99) * 1000, 3)
    m["added_p50_this_over_baseline"] = round(float(m["this_added_p50_ms"]) /  # type: ignore[arg-type]
                                              max(float(m["baseline_added_p50_ms"]), 1e-9), 3)  # type: ignore[arg-type]
    print(m)
    print(f"wrote {write_result(f'gateway_overhead_ab_{a.policy}', m)}")


if __name__ == "__main__":
    main()
