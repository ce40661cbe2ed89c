"""Overload is not failure: a busy engine is waited on (no breaker, no retry), a saturated fleet sheds up
front with Retry-After, and a truly hung (SIGSTOPped) engine is still bypassed.

Engines are throttled upstreams (``tests/slow_engine.py``): "steady" streams emit tokens at a fixed pace
(the engine is visibly making progress) while other requests get no first token until the test releases
them.  The first-token window (``TTFT_S``) only has to be longer than the steady stream's pace plus the
machine's scheduling delays; nothing here asserts a duration.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import LoopThread, free_port_block, wait_until
from tests.slow_engine import SlowEngine

TTFT_S = 2.0
MODEL = "kvmesh-demo"


@pytest.fixture
def slow(loop_thread: LoopThread) -> Iterator[list[SlowEngine]]:
    engines = [loop_thread.call(SlowEngine) for _ in range(2)]
    for e in engines:
        loop_thread.run(e.start())
    yield engines
    for e in engines:
        loop_thread.run(e.stop())


def metric(gw_url: str, line: str) -> float:
    for x in httpx.get(f"{gw_url}/metrics").text.splitlines():
        if x.startswith(line + " "):
            return float(x.rsplit(" ", 1)[1])
    return 0.0


def held(url: str, prompt: object) -> tuple[int, str, list[str]]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        return r.status_code, r.headers.get("x-kvmesh-backend", ""), lines


@contextlib.contextmanager
def steady(url: str, http: httpx.Client) -> Iterator[str]:
    """A stream that keeps the engine it lands on busy; yields that backend's name."""
    body = {"model": MODEL, "prompt": "steady", "max_tokens": 100_000, "stream": True}
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(x for x in lines if x.startswith("data: "))
        yield r.headers.get("x-kvmesh-backend", "")  # none when sent to an engine directly


def test_busy_engines_are_waited_on_not_bypassed(slow, make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=tuple(e.url for e in slow), policy="round-robin", ttft_timeout_s=TTFT_S,
                      busy_timeout_s=600, health_interval_s=300)
    with httpx.Client(timeout=120) as http, steady(gw.url, http), steady(gw.url, http), \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(held, gw.url, "x" * 400) for _ in range(2)]
        # both waited through at least one first-token window on an engine making progress
        wait_until(lambda: metric(gw.url, "kvmesh_gateway_busy_waits_total") >= 2, 60, "busy windows")
        loop_thread.call(lambda: [e.release.set() for e in slow])
        results = [f.result() for f in waiting]
    assert sorted(b for _, b, _ in results) == ["backend-0", "backend-1"]
    assert all(s == 200 and lines[-1] == "data: [DONE]" for s, _, lines in results)
    assert [b.breaker.trips for b in gw.pool.backends] == [0, 0] and all(b.healthy for b in gw.pool.backends)
    assert metric(gw.url, "kvmesh_gateway_retries_total") == 0
    assert metric(gw.url, 'kvmesh_gateway_errors_total{kind="upstream_ttft_timeout"}') == 0
    assert sum(e.received for e in slow) == 4  # each request reached exactly one engine, once


@pytest.mark.parametrize("policy", ["round-robin", "kv-aware"])
def test_an_engine_busy_with_work_the_gateway_does_not_relay_is_waited_on(  # type: ignore[no-untyped-def]
        slow, make_gateway, loop_thread, policy: str) -> None:
    # its only sign of life is its token counters (/metrics): the gateway reads them whatever its policy
    gw = make_gateway(backends=(slow[0].url,), policy=policy, ttft_timeout_s=TTFT_S, busy_timeout_s=600,
                      health_interval_s=0.2)
    with httpx.Client(timeout=120) as http, steady(slow[0].url, http), \
            concurrent.futures.ThreadPoolExecutor(1) as pool:  # a client of the engine's own, not the gateway's
        waiting = pool.submit(held, gw.url, "x" * 400)
        wait_until(lambda: metric(gw.url, "kvmesh_gateway_busy_waits_total") >= 1, 60, "a busy window")
        loop_thread.call(slow[0].release.set)
        status, backend, lines = waiting.result()
    assert (status, backend, lines[-1]) == (200, "backend-0", "data: [DONE]")
    assert gw.pool.backends[0].breaker.trips == 0 and metric(gw.url, "kvmesh_gateway_retries_total") == 0


def test_saturated_fleet_sheds_up_front_with_retry_after(slow, make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=tuple(e.url for e in slow), policy="round-robin", ttft_timeout_s=600,
                      max_expected_wait_s=1.0, health_interval_s=300)
    # The fleet's prefill throughput as if learned from earlier TTFTs (set, so the expected wait is exact).
    loop_thread.call(lambda: gw.pressure.learned_tps.update({"backend-0": 100.0, "backend-1": 100.0}))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(held, gw.url, [7] * 1000)  # 1000 prompt tokens queued: ~5 s at 200 tokens/s
        wait_until(lambda: loop_thread.call(gw.pressure.queued_prefill_tokens) == 1000, 30, "the prompt queued")
        expect = loop_thread.call(lambda: gw.pressure.retry_after_s(1.0))
        r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                         "stream": True}, timeout=30)
        assert r.status_code == 503 and "saturated" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) == expect == 4  # 1000 / 200 = 5 s expected, limit 1 s
        assert sum(e.received for e in slow) == 1  # shed before reaching any engine
        loop_thread.call(lambda: [e.release.set() for e in slow])
        status, _, lines = first.result()
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert metric(gw.url, 'kvmesh_gateway_shed{reason="expected_wait"}') == 1
    assert metric(gw.url, "kvmesh_gateway_expected_wait_seconds") == 0  # drained
    assert [b.breaker.trips for b in gw.pool.backends] == [0, 0]


@pytest.fixture
def stoppable() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A throttled engine in its own process, which the test can SIGSTOP."""
    port = free_port_block(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.slow_engine", str(port)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        yield proc, url
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(30)


def test_sigstopped_engine_is_still_bypassed(stoppable, slow, make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    proc, url = stoppable
    loop_thread.call(lambda: slow[0].release.set())  # the in-process engine answers at once
    gw = make_gateway(backends=(url, slow[0].url), policy="round-robin", ttft_timeout_s=TTFT_S,
                      health_interval_s=300)
    with httpx.Client(timeout=120) as http, steady(gw.url, http) as busy:
        assert busy == "backend-0"  # the engine was making progress ...
        proc.send_signal(signal.SIGSTOP)  # ... until it stopped entirely
        assert held(gw.url, "x")[1] == "backend-1"  # round-robin: the next one goes to the other engine
        status, backend, lines = held(gw.url, "x")  # and this one to the stopped engine first
    assert status == 200 and backend == "backend-1" and lines[-1] == "data: [DONE]"
    b0 = gw.pool.backends[0]
    assert b0.breaker.trips == 1 and not b0.healthy
    assert metric(gw.url, 'kvmesh_gateway_errors_total{kind="upstream_ttft_timeout"}') == 1
    assert metric(gw.url, "kvmesh_gateway_retries_total") == 1
