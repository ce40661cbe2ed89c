"""Operator benchmark (pure part): reconcile time for 1, 100 and 1,000 ModelServices and the operator's RSS
holding 100 of them with their desired objects → bench/results/k8s.json (``reconcile_ms_p99``,
``operator_rss_mib_100``; ``discovery_64_ms`` is written by the discovery benchmark)."""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import resource
import statistics
import sys
import time

from kvmesh.k8s.api import ModelService
from kvmesh.k8s.reconcile import Observed, reconcile

OUT = pathlib.Path(__file__).parent / "results" / "k8s.json"


def services(count: int) -> list[ModelService]:
    return [ModelService.from_object({"metadata": {"name": f"m{i}", "namespace": "ml", "uid": f"u{i}"},
                                      "spec": {"model": {"name": f"model-{i}", "source": f"pvc://models/m{i}"},
                                               "roles": {"aggregated": {"replicas": 1 + i % 8}}}})
            for i in range(count)]


def main() -> None:
    metrics: dict[str, object] = {}
    p99 = 0.0
    for count in (1, 100, 1000):
        fleet, samples = services(count), []
        t_all = time.perf_counter()
        for ms in fleet:
            t = time.perf_counter()
            reconcile(ms, Observed(), time.time())
            samples.append((time.perf_counter() - t) * 1000)
        total = (time.perf_counter() - t_all) * 1000
        q = statistics.quantiles(samples, n=100) if len(samples) > 1 else samples * 99
        metrics[f"reconcile_{count}"] = {"total_ms": total, "p50_ms": statistics.median(samples), "p99_ms": q[98]}
        p99 = max(p99, q[98])
    held = [reconcile(ms, Observed(), time.time()) for ms in services(100)]
    metrics["operator_rss_mib_100"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["reconcile_ms_p99"] = p99
    metrics["held_objects_100"] = sum(len(r.apply) for r in held)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    old_metrics = old.get("metrics", {})
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "cpu": platform.processor() or platform.machine(),
              "metrics": {**{k: v for k, v in old_metrics.items() if k.startswith("discovery")}, **metrics}}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
