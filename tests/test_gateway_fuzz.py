"""Property-based fuzzing of the running gateway from its own OpenAPI schema (schemathesis): no 5xx, ever.

Backends are kvmesh's simulated engines (fast); the same gateway code fronts real vLLM in the other tests.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from kvmesh.config import GatewayConfig
from kvmesh.engines import SimEngine
from kvmesh.gateway import Gateway
from kvmesh.gateway.openapi import openapi_spec
from kvmesh.stack import DEMO_MODEL_NAME
from tests.helpers import LoopThread, free_port_block


def fuzz_spec() -> dict[str, object]:
    spec = copy.deepcopy(openapi_spec())
    for path in ("/v1/completions", "/v1/chat/completions"):
        props = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        props["model"] = {"type": "string", "enum": [DEMO_MODEL_NAME, "unknown-model"]}
    return spec


schema = schemathesis.openapi.from_dict(fuzz_spec())


@pytest.fixture(scope="module")
def fuzz_gateway(loop_thread: LoopThread, tiny_model) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    base = free_port_block(2)
    engines = [loop_thread.call(lambda i=i: SimEngine(f"s{i}", str(tiny_model), DEMO_MODEL_NAME, base + i))
               for i in range(2)]
    for e in engines:
        loop_thread.run(e.start())
    gw = loop_thread.call(lambda: Gateway(GatewayConfig(port=0, backends=tuple(e.url for e in engines),
                                                        max_body_bytes=64 * 1024)))
    loop_thread.run(gw.start())
    yield gw
    loop_thread.run(gw.stop())
    for e in engines:
        loop_thread.run(e.stop())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_gateway: Gateway) -> None:  # type: ignore[no-untyped-def]
    resp = case.call(base_url=fuzz_gateway.url, timeout=30)
    assert resp.status_code < 500, (case.body, resp.text[:500])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert err["code"] == resp.status_code and err["message"]
