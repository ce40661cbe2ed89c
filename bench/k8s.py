"""Kubernetes control plane benchmark → bench/results/k8s.json, one command for the three figures:

- ``reconcile_ms_p99``: the pure reconcile (ModelService + observed objects → desired objects and status) for
  fleets of 1, 100 and 1,000 ModelServices, each reconciled once from nothing (the most objects to build);
  the figure is the worst p99 of the three fleets, each fleet's total/p50/p99 is reported too;
- ``discovery_64_ms``: a gateway following a burst of 64 EndpointSlice events — all 64 healthy backends, then
  all removed — through the real client's list/watch against the protocol stand-in
  (:func:`bench.k8s_discovery.discovery_64_ms`; the median of add + remove over the rounds);
- ``operator_rss_mib_100``: resident memory of a fresh process that imports what ``kvmesh operator`` imports
  (the official client included) and holds 100 ModelServices with their desired objects — measured in a
  child, so neither the 1,000-service fleet above nor the discovery run inflates it.

    python bench/k8s.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from bench.k8s_discovery import discovery_64_ms
from kvmesh.k8s.api import ModelService
from kvmesh.k8s.reconcile import Observed, Result, reconcile

FLEETS = (1, 100, 1000)


def services(count: int) -> list[ModelService]:
    return [ModelService.from_object({"metadata": {"name": f"m{i}", "namespace": "ml", "uid": f"u{i}"},
                                      "spec": {"model": {"name": f"model-{i}", "source": f"pvc://models/m{i}"},
                                               "roles": {"aggregated": {"replicas": 1 + i % 8}}}})
            for i in range(count)]


def reconcile_times() -> dict[str, object]:
    metrics: dict[str, object] = {}
    p99 = 0.0
    for count in FLEETS:
        fleet, samples = services(count), []
        t_all = time.perf_counter()
        for ms in fleet:
            t = time.perf_counter()
            reconcile(ms, Observed(), time.time())
            samples.append((time.perf_counter() - t) * 1000)
        total = (time.perf_counter() - t_all) * 1000
        q99 = statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else samples[0]
        metrics[f"reconcile_{count}"] = {"total_ms": round(total, 2), "p50_ms": round(statistics.median(samples), 3),
                                         "p99_ms": round(q99, 3)}
        p99 = max(p99, q99)
    metrics["reconcile_ms_p99"] = round(p99, 3)
    return metrics


def rss_child() -> None:
    """In the child: the operator's imports and 100 reconciled ModelServices held; prints RSS and objects."""
    import kvmesh.k8s.operator  # noqa: F401  (what the operator process loads, kubernetes_asyncio included)

    held: list[Result] = [reconcile(ms, Observed(), time.time()) for ms in services(100)]
    status = pathlib.Path("/proc/self/status").read_text()
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    print(json.dumps({"operator_rss_mib_100": round(rss_kib / 1024, 1),
                      "held_objects_100": sum(len(r.apply) for r in held)}))


def operator_rss() -> dict[str, object]:
    out = subprocess.run([sys.executable, __file__, "--rss-child"], check=True, capture_output=True, text=True)
    got: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="Bursts of 64 EndpointSlice events to time")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child()
        return
    metrics = {**reconcile_times(), **operator_rss(), **asyncio.run(discovery_64_ms(args.rounds))}
    print(json.dumps(metrics, indent=2))
    print(write_result("k8s", metrics))


if __name__ == "__main__":
    main()
