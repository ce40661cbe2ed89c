"""Dashboards and alert rules proven against a real Prometheus scraping a live fleet, and ``kvmesh top``.

One module-scoped fleet: ``kvmesh up --engine-kind sim`` (two simulated engines behind a KV-aware gateway with
two tenants), a ``kvmesh cache-node`` process, and Debian's ``prometheus`` scraping all four every second with
the generated rules (``for: 0s``) evaluated every second.  A short load, cache writes (DRAM → SSD) and reads,
a throttled tenant; then two faults — a chunk corrupted in the node's shared memory (the reader's checksum
fails and it reports it) and an engine killed (SIGKILL; the supervisor restarts it after a backoff).  Every
dashboard query must return a series and every rule must evaluate; the checksum and backend-down alerts must
fire.  Waits poll with deadlines; nothing sleeps for correctness.

``KVMESH_RENDER_OVERVIEW=docs/observability-overview.png`` also renders the overview dashboard from this
Prometheus (``scripts/render_dashboard.py``); ``KVMESH_TOP_CAPTURE=PATH`` saves the ``kvmesh top`` frame.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvmesh.observability import alerts, dashboards, generate
from tests.helpers import free_port_block, wait_until

KVMESH = [sys.executable, "-m", "kvmesh"]
ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = {"alice": "alice-key", "bob": "bob-key"}
ADMIN_KEY = "admin-key"  # kvmesh top passes it: with API keys on, /health lists backends only for an admin


def test_checked_in_files_are_the_generator_output() -> None:
    stale = [p for p, text in generate.files().items() if (ROOT / p).read_text() != text]
    assert not stale, f"regenerate with python -m kvmesh.observability.generate: {stale}"


def test_dashboards_have_variables_and_unique_panel_ids() -> None:
    for d in dashboards.dashboards().values():
        names = {v["name"] for v in d["templating"]["list"]}
        assert {"model", "backend", "tenant", "node", "datasource"} <= names
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and list(dashboards.queries(d))


def test_top_quantile_is_prometheus_histogram_quantile() -> None:
    from kvmesh.observability.top import quantile

    now = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, float("inf"): 40.0}
    assert quantile(0.25, now) == pytest.approx(0.1)           # the 10th of 40 observations: top of bucket 1
    assert quantile(0.5, now) == pytest.approx(0.1 + 0.4 * 0.5)  # halfway through the (0.1, 0.5] bucket
    # minus an earlier scrape: 30 new observations, 20 of them in (0.1, 0.5]; the 15th is 3/4 through it
    assert quantile(0.5, now, {0.1: 10.0, 0.5: 10.0, 1.0: 10.0, float("inf"): 10.0}) == pytest.approx(0.4)
    assert quantile(0.5, now, now) is None                       # nothing observed in the window


@dataclasses.dataclass
class Fleet:
    gateway: str
    prometheus: str
    cache_http: str
    cache_socket: pathlib.Path
    engine_cmd: list[str]  # the third engine, a process of its own (the one the test kills)
    engine: subprocess.Popen[str]
    tmp: pathlib.Path

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_cmd[self.engine_cmd.index('--port') + 1]}"

    def start_engine(self) -> None:
        self.engine = _start(self.engine_cmd, self.tmp / "engine-2.log")

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = r.json()
        assert body.get("status") == "success", (expr, body)
        return body


def _start(cmd: list[str], log: pathlib.Path, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, **kw)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _write_configs(tmp: pathlib.Path, model: pathlib.Path, gw: int, eng: int, cache: int) -> pathlib.Path:
    """Tenants, ``kvmesh up``'s config (engines eng, eng+1; a third, separate engine on eng+2 as a static
    backend publishing KV events on eng+3) and Prometheus' config with the generated rules."""
    lines = [f'[[tenants]]\nname = "{t}"\nkey_sha256 = ["{hashlib.sha256(k.encode()).hexdigest()}"]\n'
             for t, k in KEYS.items()]
    lines[0] += "requests_per_min = 100000\nmax_concurrent = 64\n"
    lines[1] += "requests_per_min = 1\n"  # one request, then 429s: the tenant is throttled
    admin = f'admin_key_sha256 = ["{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"]\n'
    (tmp / "tenants.toml").write_text(admin + "".join(lines))
    (tmp / "k.toml").write_text(
        f'model_size = "tiny"\nmodels_dir = "{model.parent}"\nengine_kind = "sim"\n'
        f'[supervisor]\nreplicas = 2\nbase_port = {eng}\nrun_dir = "{tmp / "run"}"\n'
        f'[gateway]\nport = {gw}\npolicy = "kv-aware"\ntenants_file = "{tmp / "tenants.toml"}"\n'
        f"health_interval_s = 0.5\n"
        f'backends = [{{url = "http://127.0.0.1:{eng + 2}", name = "engine-2", '
        f'kv_events = "tcp://127.0.0.1:{eng + 3}"}}]\n')
    rules = tmp / "rules.yml"
    rules.write_text(alerts.rules_yaml(for_override="0s"))
    jobs = dashboards.JOBS
    engines = [f"127.0.0.1:{eng + i}" for i in range(3)]
    (tmp / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{rules}']\nscrape_configs:\n"
        f"  - job_name: {jobs['gateway']}\n    static_configs: [{{targets: ['127.0.0.1:{gw}']}}]\n"
        f"  - job_name: {jobs['engine']}\n    static_configs: [{{targets: {engines}}}]\n"
        f"  - job_name: {jobs['cache']}\n    static_configs: [{{targets: ['127.0.0.1:{cache}']}}]\n")
    return tmp / "k.toml"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: pathlib.Path) -> Iterator[Fleet]:
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is missing (make services installs Debian's prometheus package)")
    tmp = tmp_path_factory.mktemp("obs")
    gw, eng, cache, prom = free_port_block(1), free_port_block(4), free_port_block(1), free_port_block(1)
    conf = _write_configs(tmp, tiny_model, gw, eng, cache)
    sock = tmp / "node.sock"
    procs = [_start([*KVMESH, "up", "--config", str(conf)], tmp / "up.log", cwd=tmp),
             _start([*KVMESH, "cache-node", "--socket", str(sock), "--run-dir", str(tmp), "--dram-mib", "2",
                     "--ssd-dir", str(tmp / "ssd"), "--ssd-mib", "16", "--http-port", str(cache)], tmp / "cache.log"),
             _start(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{prom}"], tmp / "prometheus.log")]
    engine_cmd = [*KVMESH, "engine", "--kind", "sim", "--model", str(tiny_model), "--served-model-name",
                  "kvmesh-demo", "--port", str(eng + 2), "--kv-events", f"tcp://127.0.0.1:{eng + 3}",
                  "--run-dir", str(tmp / "run-2")]
    f = Fleet(f"http://127.0.0.1:{gw}", f"http://127.0.0.1:{prom}", f"http://127.0.0.1:{cache}", sock, engine_cmd,
              _start(engine_cmd, tmp / "engine-2.log"), tmp)
    try:
        wait_until(lambda: _ok(f"{f.gateway}/ready"), 120, "the stack to be ready")
        wait_until(lambda: _ok(f"{f.cache_http}/status"), 60, "the cache node")
        wait_until(lambda: _ok(f"{f.prometheus}/-/ready"), 60, "prometheus")
        yield f
    finally:
        for p in [*procs, f.engine]:
            p.send_signal(signal.SIGTERM)
        for p in [*procs, f.engine]:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _load(f: Fleet, n: int) -> None:
    """``n`` chat requests from alice (shared prefixes, some streamed) and three from bob (throttled)."""
    def one(i: int) -> int:
        body = {"model": "kvmesh-demo", "max_tokens": 4, "stream": i % 2 == 0,
                "messages": [{"role": "user", "content": f"group {i % 3}: " + "the same long context " * 40 + str(i)}]}
        r = httpx.post(f"{f.gateway}/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEYS['alice'] if i >= 0 else KEYS['bob']}"})
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        codes = list(ex.map(one, [*range(n), -1, -2, -3]))
    assert codes[:n] == [200] * n and 429 in codes[n:], codes


def _exercise_cache(f: Fleet) -> None:
    """Fill the 2 MiB DRAM tier past capacity (demotions to SSD), then read from both tiers and miss once."""
    from kvmesh.cache.chunk import checksum
    from kvmesh.cache.client import NodeClient
    from kvmesh.cache.protocol import CommitItem

    c = NodeClient(f.cache_socket)
    keys = [b"obs-%012d" % i for i in range(8)]
    for k in keys:
        data = os.urandom(512 << 10)
        [v] = c.reserve([(k, len(data))])
        assert v is not None
        v[:] = data
        v.release()
        assert c.commit([CommitItem(k, checksum(data), None, [], 16)])
    wait_until(lambda: _status(f)["ssd"]["objects"] > 0, 30, "DRAM demotions to the SSD tier")
    c.release(c.get(keys[:1]))   # oldest: from SSD
    c.release(c.get(keys[-1:]))  # newest: from DRAM
    assert c.get([b"obs-missing-key!"]) == []
    c.close()


def _corrupt_a_chunk(f: Fleet) -> None:
    """A reader finds a DRAM chunk whose bytes no longer match its checksum and reports it."""
    from kvmesh.cache.client import NodeClient

    c = NodeClient(f.cache_socket)
    k = b"obs-%012d" % 7
    [le] = c.get([k])
    le.view[0] ^= 0xFF  # something scribbled on the shared memory
    assert not le.verify()
    c.release([le], corrupt=[k])
    c.close()


def _status(f: Fleet) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{f.cache_http}/status", timeout=5).json()
    return body


def _direct_request(f: Fleet) -> None:
    body = {"model": "kvmesh-demo", "max_tokens": 2, "prompt": "straight to engine-2 " * 20}
    assert httpx.post(f"{f.engine_url}/v1/completions", json=body, timeout=60).status_code == 200


def _gateway_metric(f: Fleet, name: str) -> str:
    text = httpx.get(f"{f.gateway}/metrics", timeout=5).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def _fired(f: Fleet) -> set[str]:
    res = f.query('max_over_time(ALERTS{alertstate="firing"}[10m])')["data"]["result"]
    return {r["metric"]["alertname"] for r in res}


def _empty_panels(f: Fleet) -> list[str]:
    return [f"{d['uid']}: {title}: {expr}" for d in dashboards.dashboards().values()
            for title, expr in dashboards.queries(d) if not f.query(dashboards.expand(expr))["data"]["result"]]


def test_dashboards_and_alerts_against_prometheus(fleet: Fleet) -> None:
    f = fleet
    _load(f, 24)
    _exercise_cache(f)
    # the failure counter must be scraped at 0 first, or increase() cannot see its first step
    wait_until(lambda: bool(f.query('kvmesh_cache_checksum_failures_total{tier="dram"} == 0')["data"]["result"]), 30,
               "prometheus to scrape the cache node")
    _corrupt_a_chunk(f)
    _direct_request(f)  # engine-2 publishes KV events (whatever the router chose), so its restart is a gap
    wait_until(lambda: 'engine="engine-2"' in _gateway_metric(f, "kvmesh_index_event_batches_total"), 30,
               "engine-2's KV events in the gateway's index")
    f.engine.kill()  # SIGKILL
    f.engine.wait(30)
    wait_until(lambda: {"KvmeshBackendDown", "KvmeshCacheChecksumFailures"} <= _fired(f), 60,
               "the backend-down and checksum alerts to fire", interval=0.5)
    # restarted, the engine is back in rotation and load reaches it again (its KV events restart: an index gap)
    f.start_engine()
    wait_until(lambda: httpx.get(f"{f.gateway}/ready", timeout=5).json()["healthy_backends"] == 3, 60,
               "the killed engine to be back")
    _direct_request(f)
    _load(f, 12)
    for g in alerts.rule_groups():
        for r in g["rules"]:
            f.query(r["expr"])  # parses and evaluates (asserted in query)
    empty: list[list[str]] = [[]]

    def all_have_series() -> bool:
        empty[0] = _empty_panels(f)
        return not empty[0]

    with contextlib.suppress(AssertionError):  # the assertion below names the panels still empty
        wait_until(all_have_series, 30, "every panel query to return a series", interval=1.0)
    assert not empty[0], empty[0]
    rules = httpx.get(f"{f.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError", "")) for g in rules for r in g["rules"]}
    assert set(health) == set(alerts.alert_names()) and all(h == "ok" for h, _ in health.values()), health
    _maybe_render(f)


def test_top_once_shows_backends_and_cache_tiers(fleet: Fleet) -> None:
    body = {"model": "kvmesh-demo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{fleet.gateway}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 200
    top = [*KVMESH, "top", "--once", "--url", fleet.gateway, "--cache", fleet.cache_http]
    env = {**os.environ, "COLUMNS": "140"}
    hidden = subprocess.run(top, capture_output=True, text=True, timeout=60, env=env)
    assert hidden.returncode == 0, hidden.stderr
    assert "engine-0" not in hidden.stdout and "--api-key" in hidden.stdout  # no key: the backends are hidden
    r = subprocess.run(top, capture_output=True, text=True, timeout=60, env={**env, "KVMESH_API_KEY": ADMIN_KEY})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    node = _status(fleet)["node_id"]
    for needle in ("engine-0", "engine-1", "dram", "ssd", node, "kv-aware", "alice"):
        assert needle in out, (needle, out)
    if path := os.environ.get("KVMESH_TOP_CAPTURE"):
        pathlib.Path(path).write_text(out)


def _maybe_render(f: Fleet) -> None:
    out = os.environ.get("KVMESH_RENDER_OVERVIEW")
    if not out:
        return
    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "scripts" / "render_dashboard.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.render(f.prometheus, dashboards.overview(), pathlib.Path(out))
