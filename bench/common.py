"""Shared helpers for benchmarks: percentiles, result files, starting engines and a gateway process."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import shlex
import subprocess
import sys
import time

import httpx
import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def write_result(name: str, metrics: dict[str, object]) -> pathlib.Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "metrics": metrics}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def start_gateway(backends: list[str], port: int, policy: str = "round-robin",
                  extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "kvmesh", "gateway", "--port", str(port), "--policy", policy, *(extra or [])]
    for b in backends:
        args += ["--backend", b]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/ready", 30)
    return proc
