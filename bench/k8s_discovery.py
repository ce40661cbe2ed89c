"""discovery_64_ms: how long a gateway takes to follow a burst of EndpointSlice events for 64 engines.

One event loop holds the EndpointSlice list/watch stand-in (``tests/k8s_apiserver.py``), 64 minimal engines
(``/health`` and ``/v1/models`` on 64 loopback ports) and a gateway with ``discovery = "kubernetes"`` — the
real client, watch and health checks.  Each round writes 64 slices (one per pod) in one burst and times
until all 64 are healthy backends in routing, then deletes them in one burst and times until the pool is
empty.  ``discovery_64_ms`` is the median of add + remove; the parts are reported too.  The gateway's health
interval is 2 s (the default): a newcomer is checked at once by discovery, not at the next interval.

The figures are part of ``bench/results/k8s.json``: ``python bench/k8s.py`` runs this with the reconcile
and operator-memory parts.  Alone, it only prints:

    python bench/k8s_discovery.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

from aiohttp import web

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.k8s_apiserver import FakeApiServer, endpoint_slice, pod_endpoint

from kvmesh.config import GatewayConfig, KubernetesEndpoints
from kvmesh.gateway import Gateway

N = 64
NS = "bench"


async def engines(n: int) -> tuple[web.AppRunner, list[int]]:
    """n loopback ports served by one minimal engine app (what discovery and health checks call)."""
    app = web.Application()
    app.router.add_get("/health", lambda r: web.Response(text="ok"))
    app.router.add_get("/v1/models", lambda r: web.json_response({"object": "list", "data": [{"id": "m"}]}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for _ in range(n):
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, [int(a[1]) for a in runner.addresses]


async def until(pred: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not pred():
        if time.perf_counter() > deadline:
            raise TimeoutError("the gateway did not follow the burst")
        await asyncio.sleep(0.001)


async def one_round(api: FakeApiServer, gw: Gateway, ports: list[int]) -> tuple[float, float]:
    t0 = time.perf_counter()
    for i, port in enumerate(ports):
        api.apply(NS, endpoint_slice(f"engine-{i}", "engine", [pod_endpoint(f"engine-{i}", "127.0.0.1")],
                                     {"http": port}))
    await until(lambda: sum(b.healthy for b in gw.pool.backends) == len(ports))
    t1 = time.perf_counter()
    for i in range(len(ports)):
        api.delete(NS, f"engine-{i}")
    await until(lambda: not gw.pool.backends)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


async def discovery_64_ms(rounds: int = 5, n: int = N) -> dict[str, object]:
    """Median add/remove times (ms) for a burst of ``n`` EndpointSlice events, over ``rounds`` rounds."""
    api = FakeApiServer()
    await api.start()
    runner, ports = await engines(n)
    gw = Gateway(GatewayConfig(port=0, policy="round-robin", discovery="kubernetes",
                               kubernetes=KubernetesEndpoints(namespace=NS, service="engine", api_server=api.url)))
    await gw.start()
    try:
        assert gw.discovery is not None
        await asyncio.wait_for(gw.discovery.watch.synced.wait(), 30)
        times = [await one_round(api, gw, ports) for _ in range(rounds)]
    finally:
        await gw.stop()
        await runner.cleanup()
        await api.stop()
    add, remove = [a for a, _ in times], [r for _, r in times]
    return {"discovery_64_ms": round(statistics.median(a + r for a, r in times), 1),
            "discovery_64_add_ms": round(statistics.median(add), 1),
            "discovery_64_remove_ms": round(statistics.median(remove), 1),
            "backends": n, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(asyncio.run(discovery_64_ms(args.rounds)))


if __name__ == "__main__":
    main()
