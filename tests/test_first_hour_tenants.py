"""Issue 18 item 11: tenants as a new user meets them — a small per-minute limit, a key pasted where its hash
belongs, hashing a key, what a reload reports, the start banner's curl with the key."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from kvmesh.api.errors import ApiError
from kvmesh.config import GatewayConfig
from kvmesh.gateway import Gateway
from kvmesh.gateway import tenants as tenants_module
from kvmesh.gateway.tenants import Tenants, TenantsFile, hash_key, load_tenants
from tests.helpers import LoopThread, VirtualClock

KVMESH = [sys.executable, "-m", "kvmesh"]


def test_three_per_minute_admits_three_in_a_fresh_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = VirtualClock()  # stands still: nothing refills between the requests
    clock.install(monkeypatch, tenants_module)
    t = Tenants(TenantsFile.model_validate({"tenants": [{"name": "a", "key_sha256": [hash_key("k")],
                                                         "requests_per_min": 3}]}))
    ten = t.tenants["a"]
    clock.now += 60  # a fresh minute: the bucket is full (it was stamped with the real clock)
    for _ in range(3):
        t.admit(ten, 1)
        t.release(ten, 1, 1)
    with pytest.raises(ApiError) as e:
        t.admit(ten, 1)
    assert e.value.status == 429 and "limit (3) reached" in e.value.message
    clock.now += 20  # a third of a minute: one request's worth
    t.admit(ten, 1)


def test_key_instead_of_its_hash_is_refused(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text('[[tenants]]\nname = "a"\nkey_sha256 = ["sk-my-secret-key"]\n')
    with pytest.raises(ValueError) as e:
        load_tenants(f)
    msg = str(e.value)
    assert "not a SHA-256 digest" in msg and "kvmesh tenants hash-key" in msg and "sk-my-secret-key" not in msg
    assert "Value error" not in msg and "\n" not in msg
    f.write_text('admin_key_sha256 = ["admin"]\n')
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        load_tenants(f)


def test_hash_key_command() -> None:
    r = subprocess.run([*KVMESH, "tenants", "hash-key", "sk-1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f'key_sha256 = ["{hash_key("sk-1")}"]'
    r = subprocess.run([*KVMESH, "tenants", "hash-key"], input="sk-1\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and hash_key("sk-1") in r.stdout


def test_reload_reports_a_changed_tenant_limit(tmp_path: pathlib.Path, loop_thread: LoopThread) -> None:
    f = tmp_path / "t.toml"
    f.write_text(f'[[tenants]]\nname = "a"\nkey_sha256 = ["{hash_key("k")}"]\nrequests_per_min = 3\n'
                 f'[[tenants]]\nname = "b"\nkey_sha256 = ["{hash_key("j")}"]\n')
    gw = loop_thread.call(lambda: Gateway(GatewayConfig(port=0, tenants_file=str(f))))
    f.write_text(f.read_text().replace("requests_per_min = 3", "requests_per_min = 30"))
    assert gw.reload() == {"changed": ["tenants.a"]}
    assert gw.reload() == {"changed": []}
    assert gw.tenants.tenants["a"].cfg.requests_per_min == 30
