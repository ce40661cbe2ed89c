"""Streaming relay and least-request placement against scripted upstreams (exact, timing-free)."""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.helpers import LoopThread, wait_until
from tests.scripted_engine import ScriptedEngine

TTFT_S = 2.0  # first-token timeout: a hung engine's certain fate, a healthy one's generous deadline


@pytest.fixture
def scripted(loop_thread: LoopThread) -> Iterator[list[ScriptedEngine]]:
    engines = [loop_thread.call(lambda i=i: ScriptedEngine(f"s{i}")) for i in range(2)]
    for e in engines:
        loop_thread.run(e.start())
    yield engines
    for e in engines:
        loop_thread.run(e.stop())


def release_all(loop_thread: LoopThread, engines: list[ScriptedEngine]) -> None:
    def go() -> None:
        for e in engines:
            for g in e.gates:
                g.set()

    loop_thread.call(go)


def test_first_event_is_relayed_before_the_next_exists(scripted, make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=(scripted[0].url,))
    body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith('data: {"object": "text_completion"')  # only event 1 exists yet
        release_all(loop_thread, scripted)
        rest = [x for x in lines if x.startswith("data: ")]
    assert len(rest) == 3 and rest[-1] == "data: [DONE]"


def test_least_request_alternates_exactly(scripted, make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=tuple(e.url for e in scripted), policy="least-request")
    body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 2, "stream": True}
    names = []
    with contextlib.ExitStack() as held, httpx.Client(timeout=10) as http:
        for _ in range(10):
            r = held.enter_context(http.stream("POST", f"{gw.url}/v1/completions", json=body))
            names.append(r.headers["x-kvmesh-backend"])
        assert [b.in_flight for b in gw.pool.backends] == [5, 5]
        release_all(loop_thread, scripted)
    assert collections.Counter(names) == {"backend-0": 5, "backend-1": 5}
    assert all(a != b for a, b in zip(names[::2], names[1::2], strict=True))


def test_hung_engine_is_bypassed_by_the_first_token_timeout(make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    hung, ok = (loop_thread.call(lambda h=h: ScriptedEngine("x", hang=h)) for h in (True, False))
    for e in (hung, ok):
        loop_thread.run(e.start())
    try:
        # The hung engine never answers, so the timeout fires for certain; TTFT_S only bounds how long the
        # healthy one may take to send its first event on a loaded machine.
        gw = make_gateway(backends=(hung.url, ok.url), policy="round-robin", ttft_timeout_s=TTFT_S,
                          health_interval_s=300)
        body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 1, "stream": True}
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == "backend-1"
            assert [x for x in r.iter_lines() if x.startswith("data: ")][-1] == "data: [DONE]"
        assert not gw.pool.backends[0].healthy
        assert 'kvmesh_gateway_errors_total{kind="upstream_ttft_timeout"} 1.0' in httpx.get(f"{gw.url}/metrics").text
    finally:
        for e in (hung, ok):
            loop_thread.run(e.stop())


def test_circuit_breaker_opens_probes_and_closes(make_gateway, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    hung = loop_thread.call(lambda: ScriptedEngine("hung", hang=True))
    good = loop_thread.call(lambda: ScriptedEngine("good"))
    for e in (hung, good):
        loop_thread.run(e.start())
    # Frequent health checks: a hung engine answers /health, which must NOT close its breaker.
    gw = make_gateway(backends=(hung.url, good.url), policy="round-robin", ttft_timeout_s=TTFT_S,
                      health_interval_s=0.1)
    body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 1, "stream": True}
    b0 = gw.pool.backends[0]
    # The cooldown is long enough never to end by itself during the test; the test ends it by hand (as a
    # clock would), so what is open and what is half-open does not depend on how fast the machine runs.
    b0.breaker.base_s, b0.breaker.max_s = 100.0, 1000.0

    def served() -> str:
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            list(r.iter_lines())
            return r.headers["x-kvmesh-backend"]

    def end_cooldown() -> None:
        def go() -> None:
            b0.breaker.opened_at -= b0.breaker.cooldown_s

        loop_thread.call(go)
        assert loop_thread.call(lambda: b0.healthy)  # half-open: one probe may go through

    try:
        while b0.breaker.trips == 0:
            assert served() == "backend-1"  # the hung one timed out, the request was retried: never lost
        assert b0.breaker.state == "open" and not b0.healthy
        assert {served() for _ in range(3)} == {"backend-1"}  # open: skipped although /health says ok
        end_cooldown()
        for _ in range(2):  # round-robin reaches the half-open backend within two requests
            assert served() == "backend-1"  # ... whose probe fails and is retried on the other one
        assert b0.breaker.trips == 2 and b0.breaker.cooldown_s == 200.0  # backed off: twice the cooldown
        assert not loop_thread.call(lambda: b0.healthy)
        hung.hang = False  # the engine recovers
        end_cooldown()
        assert "backend-0" in {served(), served()}  # the probe succeeded
        assert b0.breaker.state == "closed"
        assert sorted(served() for _ in range(4)) == ["backend-0", "backend-0", "backend-1", "backend-1"]
        assert 'kvmesh_gateway_breaker_trips_total{backend="backend-0"} 2.0' in httpx.get(f"{gw.url}/metrics").text
    finally:
        for e in (hung, good):
            loop_thread.run(e.stop())


def test_reload_applies_config_without_dropping_streams(make_gateway, loop_thread: LoopThread,  # type: ignore[no-untyped-def]
                                                        tmp_path) -> None:
    engines = [loop_thread.call(lambda i=i: ScriptedEngine(f"s{i}")) for i in range(3)]
    for e in engines:
        loop_thread.run(e.start())
    conf = tmp_path / "kvmesh.toml"

    def write(backends: list[str], policy: str, per_backend: int) -> None:
        urls = ", ".join(f'{{url = "{e.url}", name = "b{i}"}}' for i, e in enumerate(engines) if f"b{i}" in backends)
        conf.write_text(f"[gateway]\nport = 0\npolicy = \"{policy}\"\nbackends = [{urls}]\n"
                        f"max_in_flight_per_backend = {per_backend}\nttft_timeout_s = 60\n")

    write(["b0", "b1"], "round-robin", 4)
    from kvmesh.config import load_stack_config

    gw = make_gateway(**load_stack_config(conf).gateway.model_dump(exclude={"port"}))
    gw.config_path = conf
    body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 3, "stream": True}
    try:
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=30) as held:
            lines = held.iter_lines()
            assert next(x for x in lines if x.startswith("data: "))  # a stream is open across the reload
            write(["b1", "b2"], "least-request", 8)
            r = httpx.post(f"{gw.url}/admin/reload", timeout=10)
            assert r.status_code == 200, r.text
            rep = r.json()
            assert rep["backends_added"] == ["b2"] and rep["backends_removed"] == ["b0"]
            assert rep["needs_restart"] == ["policy"] and "max_in_flight_per_backend" in rep["changed"]
            assert gw.cfg.max_in_flight_per_backend == 8 and gw.policy.name == "round-robin"
            loop_thread.call(lambda: [g.set() for e in engines for g in e.gates])
            assert [x for x in lines if x.startswith("data: ")][-1] == "data: [DONE]"  # finished normally
        names = {served(gw.url) for _ in range(4)}
        assert names == {"b1", "b2"}
        conf.write_text("[gateway]\nmax_queue = 'lots'\n")
        bad = httpx.post(f"{gw.url}/admin/reload", timeout=10)
        assert bad.status_code == 400 and "max_queue" in bad.json()["error"]["message"]
        assert gw.cfg.max_in_flight_per_backend == 8  # nothing applied
    finally:
        for e in engines:
            loop_thread.run(e.stop())


def served(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": "kvmesh-demo", "prompt": "x", "max_tokens": 1},
                   timeout=10)
    assert r.status_code == 200
    return r.headers["x-kvmesh-backend"]


def _post_then_hang_up(url: str, body: dict[str, object], arrived: Callable[[], bool]) -> None:
    """A client that sends a request and goes away once ``arrived()`` (the engine has it), before any answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        wait_until(arrived, 30, "the request to reach the engine", interval=0.01)


def test_a_half_open_probe_the_client_abandons_gives_its_slot_back(make_gateway, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    hung = loop_thread.call(lambda: ScriptedEngine("hung", hang=True))
    loop_thread.run(hung.start())
    # a long first-token timeout: the client's hang-up, not the gateway's timeout, ends the probe
    gw = make_gateway(backends=(hung.url,), policy="round-robin", ttft_timeout_s=600.0, health_interval_s=0.1)
    b0 = gw.pool.backends[0]
    body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 1, "stream": True}

    def half_open() -> None:
        b0.breaker.failed(time.monotonic())
        b0.breaker.opened_at -= b0.breaker.cooldown_s

    try:
        wait_until(lambda: loop_thread.call(lambda: b0.healthy), 30, "the engine to be up")
        loop_thread.call(half_open)
        _post_then_hang_up(gw.url, body, lambda: hung.received == 1)  # the probe, abandoned
        # it neither succeeded nor failed: the breaker stays open, the next request probes
        wait_until(lambda: not loop_thread.call(lambda: b0.breaker.probing), 30, "the probe slot to be given back")
        assert b0.breaker.state == "open" and loop_thread.call(lambda: b0.healthy)
        _post_then_hang_up(gw.url, body, lambda: hung.received == 2)  # routed there again: back in rotation
    finally:
        loop_thread.run(hung.stop())


def test_an_engine_that_dies_after_the_headers_is_bypassed_and_the_request_retried(  # type: ignore[no-untyped-def]
        make_gateway, loop_thread: LoopThread) -> None:
    broken = loop_thread.call(lambda: ScriptedEngine("broken"))
    good = loop_thread.call(lambda: ScriptedEngine("good"))
    broken.break_streams = True
    for e in (broken, good):
        loop_thread.run(e.start())
    gw = make_gateway(backends=(broken.url, good.url), policy="round-robin", ttft_timeout_s=600.0)
    body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 1, "stream": True}
    try:
        for _ in range(2):  # round-robin reaches the broken engine within two requests
            with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == "backend-1"
                assert any(line.startswith("data: {") for line in r.iter_lines())
        assert broken.received == 1 and gw.pool.backends[0].breaker.state == "open"
        assert 'kvmesh_gateway_errors_total{kind="upstream_broken"} 1.0' in httpx.get(f"{gw.url}/metrics").text
    finally:
        for e in (broken, good):
            loop_thread.run(e.stop())


def test_a_connect_timeout_is_retried_on_another_backend(make_gateway, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    gone = loop_thread.call(lambda: ScriptedEngine("gone"))
    good = loop_thread.call(lambda: ScriptedEngine("good"))
    for e in (gone, good):
        loop_thread.run(e.start())
    gw = make_gateway(backends=(gone.url, good.url), policy="round-robin", connect_timeout_s=0.5,
                      health_interval_s=600.0)  # one health check each, both up; none after
    b0 = gw.pool.backends[0]
    wait_until(lambda: loop_thread.call(lambda: all(b.healthy for b in gw.pool.backends)), 30, "both up")
    # the first engine's address now drops connection attempts (a node gone: SYNs unanswered): a listener
    # whose accept queue is full and never accepts
    loop_thread.run(gone.stop())
    host, port = gone.url.removeprefix("http://").split(":")
    blackhole = socket.socket()
    blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blackhole.bind((host, int(port)))
    blackhole.listen(0)
    filler = [socket.create_connection((host, int(port)), timeout=5)]  # fills the queue (backlog 0: one)
    body = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 1}
    try:
        for _ in range(2):  # round-robin reaches the silent address within two requests: retried, not 504
            r = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == "backend-1", r.text
        # its breaker opened (tried again after the cooldown); it is not marked down: a host that dropped SYNs
        # may be merely overloaded, and its index entries stay
        assert b0.breaker.trips == 1 and b0.up
        assert 'kvmesh_gateway_errors_total{kind="upstream_unreachable"} 1.0' in httpx.get(f"{gw.url}/metrics").text
    finally:
        for s in (*filler, blackhole):
            s.close()
        loop_thread.run(good.stop())
