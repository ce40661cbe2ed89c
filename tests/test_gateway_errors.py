"""Every error case of the gateway returns its status and an OpenAI-style JSON body (real engines)."""

from __future__ import annotations

import httpx
import openai
import pytest

from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block

pytestmark = pytest.mark.vllm
MODEL = DEMO_MODEL_NAME


def assert_error(r: httpx.Response, status: int, needle: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == status and needle in err["message"], err
    assert isinstance(err["type"], str)
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty"),
        (b'{"prompt": "x"}', "'model' is required"),
        (b'{"model": "%s", "prompt": 7}' % MODEL.encode(), "'prompt' must be"),
        (b'{"model": "%s", "prompt": "x", "max_tokens": "9"}' % MODEL.encode(), "'max_tokens'"),
        (b'{"model": "%s", "prompt": "x", "stream": "yes"}' % MODEL.encode(), "'stream' must be a boolean"),
        (b'{"model": "%s", "prompt": "x", "temperature": "hot"}' % MODEL.encode(), "'temperature'"),
        (b'{"model": "%s", "prompt": "x", "stop": [1]}' % MODEL.encode(), "'stop'"),
    ],
)
def test_bad_completion_requests_are_400(stack: Stack, body: bytes, needle: str) -> None:
    r = httpx.post(f"{stack.gateway.url}/v1/completions", content=body,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, needle)


def test_bad_chat_messages_are_400(stack: Stack) -> None:
    for messages in ([], [{"content": "no role"}], "hi", [{"role": "user", "content": 5}]):
        r = httpx.post(f"{stack.gateway.url}/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert_error(r, 400, "messages")


def test_unknown_model_is_404_with_openai_client(stack: Stack) -> None:
    c = openai.OpenAI(base_url=f"{stack.gateway.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as ei:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert "no-such-model" in str(ei.value) and MODEL in str(ei.value)


def test_unknown_route_is_json_404(stack: Stack) -> None:
    assert_error(httpx.get(f"{stack.gateway.url}/v1/nothing"), 404, "/v1/nothing")


def test_engine_errors_pass_through(stack: Stack) -> None:
    # vLLM rejects a prompt longer than the model's context: its 400 must reach the client unchanged.
    r = httpx.post(f"{stack.gateway.url}/v1/completions",
                   json={"model": MODEL, "prompt": [5] * 5000, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "error" in r.json()


def test_body_over_limit_is_413(stack: Stack, make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(backends=(stack.engines[0].url,), max_body_bytes=1024)
    big = {"model": MODEL, "prompt": "x" * 4096, "max_tokens": 1}
    assert_error(httpx.post(f"{gw.url}/v1/completions", json=big), 413, "1024 bytes")
    # …and the gateway keeps serving
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 1})
    assert r.status_code == 200


def test_no_healthy_backend_is_503_with_retry_after(make_gateway) -> None:  # type: ignore[no-untyped-def]
    base = free_port_block(1)
    gw = make_gateway(backends=(f"http://127.0.0.1:{base}",), retry_after_s=3)
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert_error(r, 503, "no healthy backend")
    assert r.headers["retry-after"] == "3"
    assert httpx.get(f"{gw.url}/ready").status_code == 503


def test_connect_failure_is_retried_on_another_backend(stack: Stack, make_gateway,  # type: ignore[no-untyped-def]
                                                      loop_thread: LoopThread) -> None:
    dead = f"http://127.0.0.1:{free_port_block(1)}"
    gw = make_gateway(backends=(dead, stack.engines[0].url), policy="round-robin", health_interval_s=300)
    # Pretend the dead backend passed its last health check, so the policy picks it first.
    loop_thread.call(lambda: gw.pool.set_health(gw.pool.backends[0], True))
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == "backend-1"
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert "kvmesh_gateway_retries_total 1.0" in metrics
    assert 'kvmesh_gateway_errors_total{kind="upstream_connect"} 1.0' in metrics
    assert not gw.pool.backends[0].healthy  # taken out of rotation by the failure


def test_every_backend_unreachable_is_502(make_gateway, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    base = free_port_block(2)
    gw = make_gateway(backends=(f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"),
                      health_interval_s=300)
    for b in gw.pool.backends:
        loop_thread.call(lambda b=b: gw.pool.set_health(b, True))
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert_error(r, 502, "could not reach")
