"""The simulated engine drains on stop, as vLLM does with ``--shutdown-timeout``: a stream already open runs to
``[DONE]``, a request arriving meanwhile gets 503, and stop returns only once the stream has ended.

Deterministic: the engine loop is held at a gate (an :class:`asyncio.Event`) after the stream's first token,
so the stream is certainly in flight while the engine stops and the new request arrives; nothing waits on
wall-clock time.  The stop task is created before the new request is sent, so (asyncio runs ready tasks in
order) its first step — refusing new work — runs before the request is even connected.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import aiohttp

from kvmesh.sim.profiles import get_profile
from kvmesh.sim.server import SimServer
from kvmesh.stack import DEMO_MODEL_NAME

MAX_TOKENS = 6


def _hold_after_first_token(srv: SimServer, gate: asyncio.Event) -> None:
    """Stall the engine loop (at its per-step publish) once any request has been sent a token."""
    publish = srv._publish

    async def gated() -> None:
        await publish()
        if any(lv.sent for lv in srv.live.values()):
            await gate.wait()

    srv._publish = gated  # type: ignore[method-assign]


async def _drain_scenario(model: pathlib.Path) -> tuple[list[str], int, bool]:
    srv = SimServer(str(model), DEMO_MODEL_NAME, get_profile("cpu-demo-small"), time_scale=0.0)
    gate = asyncio.Event()
    _hold_after_first_token(srv, gate)
    await srv.start()
    body = {"model": DEMO_MODEL_NAME, "prompt": "hello there", "max_tokens": MAX_TOKENS, "stream": True}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        stream = await http.post(f"{srv.url}/v1/completions", json=body)
        assert stream.status == 200
        lines = [(await stream.content.readline()).decode().strip()]  # the first token: the stream is in flight
        stop = asyncio.create_task(srv.stop())
        late = await http.post(f"{srv.url}/v1/completions", json={**body, "stream": False})
        late_status = late.status
        stopped_early = stop.done()
        gate.set()
        lines += [line.decode().strip() async for line in stream.content]
        await stop
    return [x for x in lines if x], late_status, stopped_early


def test_stop_lets_an_open_stream_finish_and_refuses_new_requests(tiny_model: pathlib.Path) -> None:
    lines, late_status, stopped_early = asyncio.run(_drain_scenario(tiny_model))
    assert late_status == 503
    assert not stopped_early  # stop waits for the open stream
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert len(chunks) == MAX_TOKENS and chunks[-1]["choices"][0]["finish_reason"] == "length"
