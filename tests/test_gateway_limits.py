"""Tenant limits hold over a 30 s window (±5 %), against simulated engines (the limit is the gateway's)."""

from __future__ import annotations

import concurrent.futures
import pathlib
import time

import httpx

from kvmesh.engines import SimEngine
from kvmesh.gateway.tenants import hash_key
from kvmesh.stack import DEMO_MODEL_NAME
from tests.helpers import LoopThread, free_port_block

WINDOW_S = 30.0
RPM = 240


def test_requests_per_minute_over_a_30s_window(tmp_path: pathlib.Path, make_gateway, loop_thread: LoopThread,  # type: ignore[no-untyped-def]
                                               tiny_model: pathlib.Path) -> None:
    base = free_port_block(2)
    engines = [loop_thread.call(lambda i=i: SimEngine(f"s{i}", str(tiny_model), DEMO_MODEL_NAME, base + i,
                                                      time_scale=0.1)) for i in range(2)]
    for e in engines:
        loop_thread.run(e.start())
    tenants = tmp_path / "t.toml"
    tenants.write_text(f'[[tenants]]\nname = "metered"\nkey_sha256 = ["{hash_key("sk-m")}"]\n'
                       f"requests_per_min = {RPM}\nburst_s = 1\n")
    gw = make_gateway(backends=tuple(e.url for e in engines), tenants_file=str(tenants))
    body = {"model": DEMO_MODEL_NAME, "prompt": "metered", "max_tokens": 1}
    deadline = time.monotonic() + WINDOW_S

    def hammer() -> tuple[int, int]:
        ok = limited = 0
        with httpx.Client(timeout=30, headers={"Authorization": "Bearer sk-m"}) as http:
            while time.monotonic() < deadline:
                r = http.post(f"{gw.url}/v1/completions", json=body)
                if r.status_code == 200:
                    ok += 1
                else:
                    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                    limited += 1
                    time.sleep(0.02)
        return ok, limited

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: hammer(), range(4)))
    finally:
        for e in engines:
            loop_thread.run(e.stop())
    ok = sum(r[0] for r in results)
    expected = RPM / 60 * WINDOW_S + RPM / 60  # the window's rate + the 1-second burst the bucket starts with
    assert abs(ok - expected) <= 0.05 * expected, (ok, expected)
    assert sum(r[1] for r in results) > 0  # the clients really did push past the limit
