"""Tenant request limits over a 30 s window, exactly, on a virtual clock.

The limit is the gateway's (a token bucket in kvmesh.gateway.tenants), so a scripted upstream stands in
for the engines, and the tenants module reads a clock the test advances by hand: the window is 30 virtual
seconds however slowly a loaded machine runs, and the count of admitted requests is exact.
"""

from __future__ import annotations

import pathlib

import httpx
import pytest

from kvmesh.gateway import tenants as tenants_module
from kvmesh.gateway.tenants import hash_key
from tests.helpers import LoopThread, VirtualClock
from tests.scripted_engine import ScriptedEngine

WINDOW_S = 30.0
RPM = 240
STEP_S = 0.05  # virtual seconds between two attempts: 5 attempts per refilled request (4 per second)


def test_requests_per_minute_over_a_30s_window(tmp_path: pathlib.Path, make_gateway, loop_thread: LoopThread,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    eng = loop_thread.call(lambda: ScriptedEngine("s0"))
    loop_thread.run(eng.start())
    tenants = tmp_path / "t.toml"
    tenants.write_text(f'[[tenants]]\nname = "metered"\nkey_sha256 = ["{hash_key("sk-m")}"]\n'
                       f"requests_per_min = {RPM}\nburst_s = 1\n")
    gw = make_gateway(backends=(eng.url,), tenants_file=str(tenants))
    clock = VirtualClock()
    start = clock.now + 1.0  # the bucket is full at the first attempt, whatever real time passed before
    clock.install(monkeypatch, tenants_module)
    body = {"model": "kvmesh-demo", "prompt": "metered", "max_tokens": 1}
    ok = limited = 0
    try:
        with httpx.Client(timeout=30, headers={"Authorization": "Bearer sk-m"}) as http:
            for i in range(round(WINDOW_S / STEP_S)):  # attempts at 0, 0.05, ..., 29.95 virtual seconds
                clock.now = start + i * STEP_S
                r = http.post(f"{gw.url}/v1/completions", json=body)
                if r.status_code == 200:
                    ok += 1
                else:
                    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
                    assert "requests per minute" in r.json()["error"]["message"]
                    limited += 1
    finally:
        loop_thread.run(eng.stop())
    # The 1-second burst the bucket starts with, then exactly the rate: one request per 0.25 virtual s, at
    # 0.25, 0.5, ..., 29.75 s (the one due at 30 s is outside the window).
    assert ok == RPM / 60 + RPM / 60 * WINDOW_S - 1, (ok, limited)
    assert limited == round(WINDOW_S / STEP_S) - ok
