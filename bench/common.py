"""Shared helpers for benchmarks: percentiles, result files, starting engines and a gateway process."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import shlex
import subprocess
import sys

from kvmesh.bench.util import pct, wait_http
from kvmesh.engines.cpu import cpu_info

__all__ = ["pct", "start_gateway", "wait_http", "write_result"]
RESULTS = pathlib.Path(__file__).parent / "results"


def write_result(name: str, metrics: dict[str, object]) -> pathlib.Path:
    """bench/results/NAME.json: the command, the date, the CPU it ran on (figures move ~10x between CPU
    generations) and the metrics."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu": cpu_info().record(),
           "metrics": metrics}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def start_gateway(backends: list[str], port: int, policy: str = "round-robin",
                  extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "kvmesh", "gateway", "--port", str(port), "--policy", policy, *(extra or [])]
    for b in backends:
        args += ["--backend", b]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/ready", 30)
    return proc
