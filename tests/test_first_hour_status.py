"""Issue 18 items 9 and 10: what ``kvmesh cache status``, ``/debug/route`` and ``/v1/models`` say to a new user."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from kvmesh.cache.client import NodeClient
from kvmesh.cache.node import CacheNode
from tests.helpers import LoopThread, wait_until
from tests.scripted_engine import ScriptedEngine
from tests.test_cache_node import keys, node_config, put

KVMESH = [sys.executable, "-m", "kvmesh"]


@pytest.fixture
def node(tmp_path: pathlib.Path, loop_thread: LoopThread) -> Iterator[CacheNode]:
    n = CacheNode(node_config(tmp_path), tmp_path)
    loop_thread.run(n.start())
    yield n
    loop_thread.run(n.stop())


def test_cold_lookups_count_as_misses(node: CacheNode) -> None:
    """Two cold prompts and one warm one: 2 misses and the warm one's hits, not "100 %"."""
    c = NodeClient(node.socket_path)
    ks = keys(3)
    assert c.lookup(keys(2, b"cold1")) == 0 and c.lookup(keys(2, b"cold2")) == 0  # the engine stops here
    for k in ks:
        assert put(c, k, os.urandom(4096))
    assert c.lookup(ks) == 3
    c.release(c.get(ks))
    st = c.stats()
    c.close()
    assert st is not None and (st.reads.hits, st.reads.misses) == (3, 2)
    assert st.reads.hit_rate == pytest.approx(0.6)


def test_debug_route_get_with_a_long_prompt_is_json_414(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=("http://127.0.0.1:1",))
    r = httpx.get(f"{gw.url}/debug/route", params={"prompt": "x" * 20000})
    assert r.status_code == 414 and "POST /debug/route" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.url}/debug/route", json={"model": "m", "prompt": "x" * 20000})
    assert r.status_code != 414


def test_up_help_shows_tables_and_host() -> None:
    r = subprocess.run([*KVMESH, "up", "--help"], capture_output=True, text=True, timeout=60,
                       env=os.environ | {"COLUMNS": "200"})
    assert "[gateway]" in r.stdout and "[supervisor]" in r.stdout and "--host" in r.stdout, r.stdout
    assert "[default: (8000)]" in r.stdout or "[default: 8000]" in r.stdout


def test_cache_status_finds_a_stacks_node(tmp_path: pathlib.Path) -> None:
    """With no --socket, ``kvmesh cache status`` finds the node of a stack (run/<port>/cache-node.sock) and
    names the absolute path it tried when there is none."""
    r = subprocess.run([*KVMESH, "cache", "status"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1 and str(tmp_path / "run" / "cache-node.sock") in r.stderr, r.stderr
    proc = subprocess.Popen([*KVMESH, "cache-node", "--run-dir", "run/8123", "--dram-mib", "2", "--ssd-mib", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        from tests.helpers import wait_until

        status = [*KVMESH, "cache", "status", "--json"]
        wait_until(lambda: subprocess.run(status, capture_output=True, timeout=30, cwd=tmp_path).returncode == 0,
                   60, "the node")
    finally:
        proc.send_signal(2)
        proc.communicate(timeout=60)


def test_models_before_any_replica_is_ready_is_503(make_gateway, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    """Item 9: /v1/models answers what /ready answers: an OpenAI-style 503 with Retry-After while no replica is
    ready (backends known or not), the list once one is."""
    for backends, why in (((("http://127.0.0.1:1",)), "no replica is ready yet"),
                          ((), "no backend is configured or discovered yet")):
        gw = make_gateway(backends=backends)
        r = httpx.get(f"{gw.url}/v1/models")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["message"] == f"{why}; wait on /ready"
        assert r.json()["error"]["type"] == "service_unavailable"
    eng = loop_thread.call(lambda: ScriptedEngine("s0"))
    loop_thread.run(eng.start())
    try:
        gw = make_gateway(backends=(eng.url,))
        wait_until(lambda: httpx.get(f"{gw.url}/ready").status_code == 200, 60, "the gateway's /ready")
        r = httpx.get(f"{gw.url}/v1/models")
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["kvmesh-demo"]
    finally:
        loop_thread.run(eng.stop())
