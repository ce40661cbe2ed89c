"""Tenants, API keys, limits, cache-salt isolation, admin endpoints and draining (both engine kinds)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket

import httpx
import pytest

from kvmesh.gateway import tenants as tenants_module
from kvmesh.gateway.tenants import hash_key
from kvmesh.observability.top import scrape
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, VirtualClock, wait_until
from tests.scripted_engine import ScriptedEngine

MODEL = DEMO_MODEL_NAME
KEYS = {"alpha": "sk-alpha-secret", "beta": "sk-beta-secret", "slow": "sk-slow", "solo": "sk-solo"}
ADMIN = "sk-admin"


@pytest.fixture
def tenants_file(tmp_path: pathlib.Path) -> pathlib.Path:
    p = tmp_path / "tenants.toml"
    p.write_text(f'''admin_key_sha256 = ["{hash_key(ADMIN)}"]
[[tenants]]
name = "alpha"
key_sha256 = ["{hash_key(KEYS['alpha'])}"]
[[tenants]]
name = "beta"
key_sha256 = ["{hash_key(KEYS['beta'])}"]
[[tenants]]
name = "slow"
key_sha256 = ["{hash_key(KEYS['slow'])}"]
requests_per_min = 3
burst_s = 60
[[tenants]]
name = "solo"
key_sha256 = ["{hash_key(KEYS['solo'])}"]
max_concurrent = 1
''')
    return p


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def complete(url: str, tenant: str | None, prompt: str = "hi", **kw: object) -> httpx.Response:
    headers = auth(tenant) if tenant else {}
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, **kw},
                      headers=headers, timeout=60)


@pytest.fixture
def gw(stack: Stack, make_gateway, tenants_file: pathlib.Path):  # type: ignore[no-untyped-def]
    return make_gateway(backends=tuple(e.url for e in stack.engines), tenants_file=str(tenants_file))


def test_api_keys(gw) -> None:  # type: ignore[no-untyped-def]
    r = complete(gw.url, None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "x"},
                   headers={"Authorization": "Bearer sk-wrong"})
    assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"]
    assert complete(gw.url, "alpha").status_code == 200
    # the model list is for callers too (as OpenAI's): a tenant's or an admin's key, else 401
    r = httpx.get(f"{gw.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{gw.url}/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
    for headers in (auth("alpha"), {"Authorization": f"Bearer {ADMIN}"}):
        r = httpx.get(f"{gw.url}/v1/models", headers=headers)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert all(k not in metrics for k in KEYS.values())
    # /health answers probes without a key, but the backends' URLs and state only to an admin
    for headers in ({}, auth("alpha")):
        r = httpx.get(f"{gw.url}/health", headers=headers)
        assert r.status_code == 200 and "backends" not in r.json() and r.json()["healthy_backends"] >= 1
    with httpx.Client() as client:
        full, hidden = scrape(client, gw.url, [], ADMIN).health, scrape(client, gw.url, []).health
        assert full is not None and full["backends"]  # kvmesh top --api-key
        assert hidden is not None and "backends" not in hidden and hidden["healthy_backends"] >= 1


def test_requests_per_minute_limit(gw, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # The limiter's clock stands still: no request is refilled mid-test, however slow the machine.
    clock = VirtualClock()
    clock.now += 60  # the buckets are full
    clock.install(monkeypatch, tenants_module)
    codes = [complete(gw.url, "slow").status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    r = complete(gw.url, "slow")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "requests per minute" in r.json()["error"]["message"]
    assert complete(gw.url, "alpha").status_code == 200  # other tenants are unaffected


def test_max_concurrent(make_gateway, tenants_file: pathlib.Path, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    # The limit is the gateway's: a scripted upstream holds the first stream open (after its first event)
    # until the test releases it, so the second request certainly arrives while the first holds its slot.
    eng = loop_thread.call(lambda: ScriptedEngine("s0", model=MODEL))
    loop_thread.run(eng.start())
    gw = make_gateway(backends=(eng.url,), tenants_file=str(tenants_file))
    body = {"model": MODEL, "prompt": "go", "max_tokens": 2, "stream": True}
    try:
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, headers=auth("solo"), timeout=60) as held:
            lines = held.iter_lines()
            assert next(lines).startswith("data: ")  # in flight, and held there
            r = complete(gw.url, "solo")
            assert r.status_code == 429 and "concurrent" in r.json()["error"]["message"]
            # a reload keeps what is running: the limit still holds (it restarted from 0 in-flight)
            reload = httpx.post(f"{gw.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
            assert reload.status_code == 200
            assert complete(gw.url, "solo").status_code == 429
            loop_thread.call(lambda: eng.gates[0].set())  # release the held stream
            assert [x for x in lines if x.startswith("data: ")][-1] == "data: [DONE]"
        assert complete(gw.url, "solo").status_code == 200  # the slot was released
    finally:
        loop_thread.run(eng.stop())


def test_cache_salt_isolates_tenants(stack: Stack, make_gateway, tenants_file: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    one = make_gateway(backends=(stack.engines[0].url,), tenants_file=str(tenants_file))  # same replica for all
    doc = " ".join(f"tenant isolation paragraph {i} with some words" for i in range(60))

    def cached(tenant: str) -> int:
        r = complete(one.url, tenant, doc)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    cached("alpha")
    assert cached("alpha") > 0   # the same tenant reuses its prefix ...
    assert cached("beta") == 0   # ... another tenant never does, on any replica


def test_admin_endpoints_need_the_admin_key(gw, tenants_file: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(f"{gw.url}/debug/route", params={"prompt": "x"}, headers=auth("alpha")).status_code == 401
    ok = httpx.get(f"{gw.url}/debug/route", params={"prompt": "x"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200
    gamma = hash_key("sk-gamma")
    tenants_file.write_text(tenants_file.read_text() + f'[[tenants]]\nname = "gamma"\nkey_sha256 = ["{gamma}"]\n')
    r = httpx.post(f"{gw.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and "gamma" in r.json()["tenants"]
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                   headers={"Authorization": "Bearer sk-gamma"})
    assert r.status_code == 200


def test_drain_finishes_in_flight_and_refuses_new(stack: Stack, make_gateway, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=tuple(e.url for e in stack.engines))
    body = {"model": MODEL, "prompt": "go", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with contextlib.ExitStack() as held:
        r = held.enter_context(httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60))
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        fut = asyncio.run_coroutine_threadsafe(gw.drain(60), loop_thread.loop)
        wait_until(lambda: httpx.get(f"{gw.url}/ready").status_code == 503, 10, "readiness to go false")
        refused = complete(gw.url, None)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # the in-flight stream was not cut
    assert fut.result(30) == 0


def test_a_request_served_nothing_is_charged_nothing(make_gateway, tmp_path: pathlib.Path,  # type: ignore[no-untyped-def]
                                                     loop_thread: LoopThread) -> None:
    # a 60-token-per-minute budget (a minute's burst) and a request that costs 101 up front; no engine is up
    conf = tmp_path / "tenants.toml"
    conf.write_text(f'[[tenants]]\nname = "metered"\nkey_sha256 = ["{hash_key("sk-metered")}"]\n'
                    'tokens_per_min = 60\nburst_s = 60\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed: nothing listens there
    gw = make_gateway(backends=(dead,), tenants_file=str(conf))
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 100},
                   headers={"Authorization": "Bearer sk-metered"}, timeout=60)
    assert r.status_code == 503, r.text
    level = loop_thread.call(lambda: gw.tenants.tenants["metered"].tokens.level)
    assert level >= 59, f"the 503 kept its charge: {level:.0f} of 60 tokens left (refills 1/s)"
