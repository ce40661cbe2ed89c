"""Discovery from Kubernetes, driven by scripted EndpointSlice watch events.

The API server is the protocol stand-in of ``tests/k8s_apiserver.py`` (list + chunked watch of EndpointSlices);
the rest is real: the official client's list/watch, in-process gateways with simulated or scripted engines
served over HTTP, and ``kvmesh cache-node`` processes whose pool follows the cache-node slices.  Every wait is
on a condition (``wait_until``), never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

pytest.importorskip("kubernetes_asyncio")

from kvmesh.cache.client import NodeClient
from kvmesh.config import CacheNodeConfig, GatewayConfig, KubernetesEndpoints
from kvmesh.discovery.kubernetes import slice_endpoints
from kvmesh.gateway import Gateway
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.server import SimServer
from kvmesh.stack import DEMO_MODEL_NAME
from tests.helpers import LoopThread, free_port_block, wait_until
from tests.k8s_apiserver import FakeApiServer, endpoint_slice, pod_endpoint
from tests.scripted_engine import ScriptedEngine

NS = "kvmesh"


@pytest.fixture
def sims(loop_thread: LoopThread, tiny_model: pathlib.Path) -> Iterator[list[SimServer]]:
    """Two simulated engines publishing KV events on tcp:// (as an engine pod's named port would)."""
    base = free_port_block(2)
    servers = [loop_thread.call(lambda i=i: SimServer(str(tiny_model), DEMO_MODEL_NAME, get_profile("cpu-demo-small"),
                                                       time_scale=0.01,
                                                       kv_events_endpoint=f"tcp://127.0.0.1:{base + i}"))
               for i in range(2)]
    for s in servers:
        loop_thread.run(s.start())
    yield servers
    for s in servers:
        loop_thread.run(s.stop())


def engine_slice(pod: str, http_port: int, kv_port: int | None = None, **state: bool) -> dict[str, Any]:
    """One slice per engine pod (each listens on its own port here; slices group endpoints by port set)."""
    ports = {"http": http_port} | ({"kv-events": kv_port} if kv_port else {})
    return endpoint_slice(pod, "engine", [pod_endpoint(pod, "127.0.0.1", **state)], ports)


def sim_slice(i: int, sim: SimServer, **state: bool) -> dict[str, Any]:
    kv = int(sim.kv_events_endpoint.rsplit(":", 1)[1]) if sim.kv_events_endpoint else None
    return engine_slice(f"engine-{i}", sim.port, kv, **state)


def scripted_slice(i: int, eng: ScriptedEngine, **state: bool) -> dict[str, Any]:
    return engine_slice(f"engine-{i}", int(eng.url.rsplit(":", 1)[1]), **state)


def discovering_gateway(make_gateway: Any, api: FakeApiServer, **kw: Any) -> Gateway:
    spec = KubernetesEndpoints(namespace=NS, service="engine", api_server=api.url)
    gw: Gateway = make_gateway(discovery="kubernetes", kubernetes=spec, health_interval_s=0.2, **kw)
    return gw


def routable(gw: Gateway) -> set[str]:
    return {b.name for b in gw.pool.backends if b.healthy}


def complete(gw: Gateway, prompt: str = "hello there", stream: bool = False) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/completions", timeout=30,
                      json={"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 3, "stream": stream})


def test_ready_endpoints_join_and_serve_deleted_ones_leave(loop_thread: LoopThread, api: FakeApiServer,
                                                           sims: list[SimServer], make_gateway: Any) -> None:
    gw = discovering_gateway(make_gateway, api, policy="round-robin")
    assert loop_thread.call(lambda: gw.discovery).watch.lists <= 1  # type: ignore[union-attr]
    for i, s in enumerate(sims):
        loop_thread.call(lambda i=i, s=s: api.apply(NS, sim_slice(i, s)))
    wait_until(lambda: routable(gw) == {"engine-0", "engine-1"}, 30, "both engines to join")
    assert {b.url for b in gw.pool.backends} == {s.url for s in sims}
    for _ in range(4):
        r = complete(gw)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"]
    assert all(s.metrics.prompt.labels(*s.metrics.labels)._value.get() > 0 for s in sims)  # round-robin used both

    loop_thread.call(lambda: api.delete(NS, "engine-0"))
    wait_until(lambda: {b.name for b in gw.pool.backends} == {"engine-1"}, 30, "engine-0 to leave")
    assert complete(gw).status_code == 200
    loop_thread.call(lambda: api.delete(NS, "engine-1"))
    wait_until(lambda: not gw.pool.backends, 30, "engine-1 to leave")
    assert httpx.get(f"{gw.url}/ready").status_code == 503


def test_terminating_backend_drains_in_flight_finishes_new_requests_go_elsewhere(
        loop_thread: LoopThread, api: FakeApiServer, make_gateway: Any) -> None:
    a, b = ScriptedEngine("a"), ScriptedEngine("b")
    for e in (a, b):
        loop_thread.run(e.start())
    try:
        gw = discovering_gateway(make_gateway, api, policy="least-request")
        loop_thread.call(lambda: api.apply(NS, scripted_slice(0, a)))
        wait_until(lambda: routable(gw) == {"engine-0"}, 30, "engine-0 to join")
        with httpx.Client(timeout=30) as http, http.stream(
                "POST", f"{gw.url}/v1/completions",
                json={"model": "kvmesh-demo", "prompt": "x", "max_tokens": 3, "stream": True}) as held:
            lines = held.iter_lines()
            assert next(line for line in lines if line.startswith("data:")) == \
                'data: {"object": "text_completion", "choices": [{"index": 0, "text": "t0"}]}'
            assert a.open_streams == 1  # held open by the scripted engine until its gate is released

            loop_thread.call(lambda: api.apply(NS, scripted_slice(1, b)))
            loop_thread.call(lambda: api.apply(NS, scripted_slice(0, a, terminating=True)))
            wait_until(lambda: routable(gw) == {"engine-1"}, 30, "engine-0 to drain and engine-1 to join")
            for _ in range(3):  # new requests: all on engine-1
                assert complete(gw).status_code == 200
            assert gw.pool.get("engine-1") is not None and gw.pool.get("engine-0") is None

            loop_thread.call(lambda: [g.set() for g in a.gates])  # the in-flight request finishes on engine-0
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert [json.loads(x[5:])["choices"][0]["text"] for x in rest[:-1]] == ["t1", "t2"]
        assert a.open_streams == 0

        loop_thread.call(lambda: api.delete(NS, "engine-0"))
        wait_until(lambda: "engine-0" not in gw.discovery.known, 30, "engine-0 to be gone")  # type: ignore[union-attr]
        assert {x.name for x in gw.pool.backends} == {"engine-1"}
    finally:
        for e in (a, b):
            loop_thread.run(e.stop())


def test_kv_events_followed_while_present_cleared_when_gone(loop_thread: LoopThread, api: FakeApiServer,
                                                             sims: list[SimServer], make_gateway: Any,
                                                             tiny_model: pathlib.Path) -> None:
    gw = discovering_gateway(make_gateway, api, policy="kv-aware", tokenizer=str(tiny_model))
    loop_thread.call(lambda: api.apply(NS, sim_slice(0, sims[0])))
    wait_until(lambda: routable(gw) == {"engine-0"}, 30, "engine-0 to join")
    assert gw.feed is not None and gw.index is not None
    assert gw.feed.subs["engine-0"].endpoint == sims[0].kv_events_endpoint  # from the slice's kv-events port

    def indexed() -> int:
        e = gw.index.engines.get("engine-0")  # type: ignore[union-attr]
        return len(e.hashes) if e is not None else 0

    def served_and_indexed() -> bool:  # a SUB socket may miss the first batch while it connects
        assert complete(gw, "the quick brown fox jumps over the lazy dog " * 8).status_code == 200
        return indexed() > 0

    wait_until(served_and_indexed, 30, "engine-0's KV events to reach the index")
    loop_thread.call(lambda: api.apply(NS, sim_slice(0, sims[0], terminating=True)))
    wait_until(lambda: not gw.pool.backends, 30, "engine-0 to drain")
    assert "engine-0" in gw.feed.subs and indexed() > 0  # draining: still followed, entries kept
    loop_thread.call(lambda: api.delete(NS, "engine-0"))
    wait_until(lambda: "engine-0" not in gw.feed.subs, 30, "engine-0's subscription to stop")  # type: ignore[union-attr]
    assert indexed() == 0


def test_bookmark_and_a_watch_the_server_ends_resume_without_a_relist(
        loop_thread: LoopThread, api: FakeApiServer, sims: list[SimServer], make_gateway: Any) -> None:
    gw = discovering_gateway(make_gateway, api, policy="round-robin")
    loop_thread.call(lambda: api.apply(NS, sim_slice(0, sims[0])))
    wait_until(lambda: routable(gw) == {"engine-0"}, 30, "engine-0 to join")
    watch = gw.discovery.watch  # type: ignore[union-attr]
    loop_thread.call(api.bookmark)
    wait_until(lambda: watch.bookmarks == 1, 30, "the bookmark")
    assert watch.resource_version == str(api.rv)
    # The server ends the watch (its timeout); a change made meanwhile is replayed from the history.
    loop_thread.call(lambda: (api.end_watches(), api.apply(NS, sim_slice(1, sims[1]))))
    wait_until(lambda: routable(gw) == {"engine-0", "engine-1"}, 30, "engine-1 to join after the re-watch")
    assert api.requests.count("list") == 1 and watch.lists == 1 and watch.watches >= 2


def test_expired_watch_410_relists_and_sees_what_changed_meanwhile(
        loop_thread: LoopThread, api: FakeApiServer, sims: list[SimServer], make_gateway: Any) -> None:
    gw = discovering_gateway(make_gateway, api, policy="round-robin")
    for i, s in enumerate(sims):
        loop_thread.call(lambda i=i, s=s: api.apply(NS, sim_slice(i, s)))
    wait_until(lambda: routable(gw) == {"engine-0", "engine-1"}, 30, "both engines to join")
    watch = gw.discovery.watch  # type: ignore[union-attr]
    # Disconnected, engine-1 is deleted and the history compacted: the re-watch gets 410 Gone, the re-list
    # is the only way to learn of the deletion.
    loop_thread.call(lambda: (api.end_watches(), api.delete(NS, "engine-1"), api.compact()))
    wait_until(lambda: {b.name for b in gw.pool.backends} == {"engine-0"}, 30, "engine-1 to leave after the re-list")
    assert watch.lists == 2
    i = api.requests.index("watch-410")
    assert api.requests[i + 1] == "list"
    assert complete(gw).status_code == 200


def test_endpoint_conditions_follow_the_api_rules() -> None:
    """nil ``ready`` is ready, nil ``terminating`` is not terminating; a terminating endpoint never serves."""
    from kubernetes_asyncio.client import ApiClient

    raw = endpoint_slice("s", "engine", [{"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "p0"}},
                                         {"addresses": ["10.0.0.2"], "hostname": "h1"},
                                         pod_endpoint("p2", "10.0.0.3", terminating=True),
                                         pod_endpoint("p3", "fd00::3", ready=False)], {"http": 8000})
    raw |= {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1"}

    async def deserialize() -> Any:  # the client's own deserialisation (its ApiClient needs a running loop)
        async with ApiClient() as client:
            return client.deserialize(SimpleNamespace(data=json.dumps(raw)), "V1EndpointSlice")

    obj = asyncio.run(deserialize())
    eps = {e.name: e for e in slice_endpoints(obj)}
    assert [eps[n].serving for n in ("p0", "h1", "p2", "p3")] == [True, True, False, False]
    assert eps["p2"].terminating and not eps["p3"].terminating
    assert eps["p3"].host() == "[fd00::3]" and eps["p0"].port(None, "http") == 8000


def test_config_requires_a_source_and_no_static_list() -> None:
    spec = KubernetesEndpoints(service="engine")
    assert spec.label_selector() == "kubernetes.io/service-name=engine"
    with pytest.raises(ValueError, match=r"service or kubernetes\.selector"):
        GatewayConfig(discovery="kubernetes")
    with pytest.raises(ValueError, match="drop the static backends"):
        GatewayConfig(discovery="kubernetes", kubernetes=spec, backends=("http://x:1",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drop etcd and peers"):
        CacheNodeConfig(discovery="kubernetes", kubernetes=spec, etcd="http://etcd:2379")
    with pytest.raises(ValueError, match="not both"):
        KubernetesEndpoints(service="a", selector="b=c")


# -- the cache pool's membership from the cache-node DaemonSet's EndpointSlices ---------------------------------

def cache_slice(ports: dict[str, int], terminating: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    # A DaemonSet's pods share one port number on different machines; here each has its own on loopback, so
    # each pod gets its own slice (slices group endpoints by port set).
    return {nid: endpoint_slice(f"cache-{nid}", "cache",
                                [pod_endpoint(nid, "127.0.0.1", terminating=nid in terminating)], {"peer": port})
            for nid, port in ports.items()}


def pool_members(c: NodeClient) -> int | None:
    st = c.stats()
    return st.pool.members if st is not None and st.pool is not None else None


def test_cache_pool_members_follow_the_cache_node_slices(loop_thread: LoopThread, api: FakeApiServer,
                                                         tmp_path: pathlib.Path) -> None:
    ids = [f"cache-node-{i}" for i in range(3)]
    base = free_port_block(3)
    ports = {nid: base + i for i, nid in enumerate(ids)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for nid in ids:
        d = tmp_path / nid
        d.mkdir()
        procs[nid] = subprocess.Popen(
            [sys.executable, "-m", "kvmesh", "cache-node", "--socket", str(d / "node.sock"), "--run-dir", str(d),
             "--node-id", nid, "--peer-port", str(ports[nid]), "--dram-mib", "16", "--ssd-mib", "0",
             "--discovery", "kubernetes", "--k8s-namespace", NS, "--k8s-service", "cache",
             "--k8s-api-server", api.url],
            stdout=subprocess.DEVNULL, stderr=open(d / "log", "ab"))  # noqa: SIM115
    clients = {nid: NodeClient(tmp_path / nid / "node.sock", retry_s=0.0) for nid in ids}
    try:
        for s in cache_slice(ports).values():
            loop_thread.call(lambda s=s: api.apply(NS, s))
        for nid in ids:
            wait_until(lambda nid=nid: pool_members(clients[nid]) == 3, 60, f"{nid} to see the pool of 3")
        # cache-node-2 terminates: the others drop it from their rings (it still runs: not their health checks)
        loop_thread.call(lambda: api.apply(NS, cache_slice(ports, {"cache-node-2"})["cache-node-2"]))
        for nid in ids[:2]:
            wait_until(lambda nid=nid: pool_members(clients[nid]) == 2, 60, f"{nid} to drop cache-node-2")
        # the history compacted while the watches were down: 410, re-list, cache-node-2 back as a new pod
        loop_thread.call(lambda: (api.end_watches(), api.apply(NS, cache_slice(ports)["cache-node-2"]),
                                  api.compact()))
        for nid in ids[:2]:
            wait_until(lambda nid=nid: pool_members(clients[nid]) == 3, 60, f"{nid} to re-list cache-node-2")
        assert api.requests.count("watch-410") >= 2
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
