"""Prefill/decode disaggregation through the gateway: vLLM's ``kv_transfer_params`` handshake, the decode-first
decision, every failure falling back to a local prefill, and a 1P+1D stack of simulated engines.

Engines here are :class:`PdEngine` (records each body it receives; answers, hangs, fails or drops on
command) or kvmesh's simulated engine, whose metrics tell a loaded prompt from a computed one.  Nothing
sleeps for correctness: a hung engine never answers, so a timeout is certain; waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from kvmesh.config import (
    CacheNodeConfig,
    GatewayConfig,
    PdSettings,
    SimEngineConfig,
    StackConfig,
    SupervisorConfig,
)
from kvmesh.gateway.pd import PREFILL_PARAMS
from kvmesh.routing.disagg import EngineLoad, PdConfig, plan_prefill
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block, wait_until

MODEL = "kvmesh-demo"
LONG = "lorem ipsum " * 200   # ~600 estimated tokens: above the 256-token threshold
HANDOFF = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "p0",
           "remote_block_ids": [1, 2, 3], "remote_host": "10.0.0.1", "remote_port": 5600}


class PdEngine:
    """An OpenAI-compatible engine for P/D tests.  ``mode``: ok | hang (accepts, never answers) | error (500)
    | no_params (answers without kv_transfer_params) | drop (closes the connection on generation requests)
    | busy (answers once ``gate`` is set; its ``/metrics`` token counter moves on every scrape meanwhile, as
    a loaded vLLM's does).  ``gate``: streams stop after their first event until it is set."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.bodies: list[dict[str, Any]] = []
        self.cancelled = 0
        self.gate = asyncio.Event()
        self.scrapes = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    @staticmethod
    async def _health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    @staticmethod
    async def _models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL}]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def _metrics(self, _: web.Request) -> web.Response:
        if self.mode != "busy":
            return web.Response(status=404)
        self.scrapes += 1  # tokens computed for the other requests it is busy with
        return web.Response(text=f'vllm:prompt_tokens_total{{model_name="{MODEL}"}} {self.scrapes * 100}\n')

    async def stop(self) -> None:
        self.gate.set()
        if self.runner:
            await self.runner.cleanup()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        try:
            return await self._answer(request, body)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "busy":
            await self.gate.wait()
        if self.mode == "error":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "drop" and request.transport is not None:
            request.transport.close()
            return web.Response()
        kv = body.get("kv_transfer_params") or {}
        chat = "messages" in body
        if not body.get("stream"):
            choice = {"message": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"}
            out: dict[str, Any] = {"choices": [choice], "usage": {"total_tokens": 3}}
            if kv.get("do_remote_decode") and self.mode != "no_params":
                out["kv_transfer_params"] = HANDOFF
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(2):
            if i:
                await self.gate.wait()
            delta = {"delta": {"content": f"t{i}"}} if chat else {"text": f"t{i}"}
            await resp.write(f"data: {json.dumps({'choices': [delta]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
def engines(loop_thread: LoopThread) -> Iterator[Any]:
    made: list[PdEngine] = []

    def make(*modes: str) -> list[PdEngine]:
        for m in modes:
            e = loop_thread.call(functools.partial(PdEngine, m))
            loop_thread.run(e.start())
            made.append(e)
        return made[-len(modes):]

    yield make
    for e in made:
        loop_thread.run(e.stop())


def pd_gateway(make_gateway: Any, prefill: list[PdEngine], decode: list[PdEngine], **kw: Any) -> Any:
    """A gateway whose P/D stage takes every long prompt remote (``decision = "threshold"``): these tests are
    about the handshake and its failures, not about when a hop pays (the cost rule's tests are below)."""
    kw["pd"] = {"decision": "threshold", **kw.get("pd", {})}
    backends = [{"url": e.url, "role": "prefill"} for e in prefill] + [{"url": e.url, "role": "decode"}
                                                                          for e in decode]
    return make_gateway(backends=tuple(backends), **{"policy": "round-robin", "health_interval_s": 300, **kw})


def metric(gw: Any, line: str) -> float:
    for x in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if x.startswith(line + " "):
            return float(x.rsplit(" ", 1)[1])
    return 0.0


def post(gw: Any, endpoint: str, body: dict[str, Any]) -> httpx.Response:
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    return httpx.post(f"{gw.url}{path}", json=body, timeout=30)


def request_body(endpoint: str, stream: bool, prompt: str = LONG) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 5, "stream": stream, "temperature": 0}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


# -- the decision -----------------------------------------------------------------------------------------
TPS = 10_000.0  # tokens/s everywhere below: 1,000 uncached tokens are 0.1 s of prefill


def dec(uncached: int = 1000, running: int = 8, queued: int = 0, step_s: float = 0.02) -> EngineLoad:
    return EngineLoad("d0", uncached, queued, TPS, running, step_s)


def pre(name: str = "p0", queued: int = 0, running: int = 0, uncached: int = 1000) -> EngineLoad:
    return EngineLoad(name, uncached, queued, TPS, running)


def test_cost_plan_pays_a_hop_only_to_spare_stalled_streams_or_a_long_local_queue() -> None:
    """Remote when the local prefill (0.1 s) would stall running streams past the 50 ms TPOT budget at a TTFT
    cost within the margin, or when the decode engine's own queue makes local slower by more than the margin;
    short prompts, idle decode engines and stalls that fit the budget stay local."""
    cfg = PdConfig(min_remote_prefill_tokens=256, max_prefill_queue_s=1.0, ttft_margin_s=0.5)
    assert plan_prefill(dec(), [pre(queued=2000)], cfg).engine == "p0"       # 0.2 s queue: within the margin
    assert plan_prefill(dec(255), [pre()], cfg).reason == "short_prompt"
    assert plan_prefill(dec(), [], cfg).reason == "no_prefill_engine"
    assert plan_prefill(dec(running=0), [pre()], cfg).reason == "no_stall"    # idle: nothing to protect
    assert plan_prefill(dec(300, step_s=0.001), [pre()], cfg).reason == "no_stall"  # 30 + 1 + 8 ms: fits
    assert plan_prefill(dec(), [pre(queued=20_000)], cfg).reason == "prefill_saturated"
    assert plan_prefill(dec(), [pre("p0", 20_000), pre("p1", 100)], cfg).engine == "p1"
    assert plan_prefill(dec(running=0, queued=8000), [pre()], cfg).engine == "p0"  # local queue 0.8 s
    assert plan_prefill(dec(queued=100), [pre(running=8)], cfg).reason == "no_gain"  # as many streams stalled
    # dynamic P/D (a candidate with streams): the stall only moves, so the hop must not cost TTFT as well
    assert plan_prefill(dec(), [pre(running=2)], cfg).reason == "remote_slower"  # the transfer: 6 ms slower
    assert plan_prefill(dec(queued=100), [pre(running=2)], cfg).engine == "p0"    # 10 ms queued here: not slower
    assert plan_prefill(dec(), [pre()], PdConfig(enabled=False)).reason == "disabled"


def test_stall_counts_the_step_overhead_and_the_prefills_queued_before() -> None:
    """A prompt judged alone fits the budget, but the decode step's fixed cost or the prompt tokens already
    waiting to prefill on the decode engine push the step past it: remote.  The same prompt on a decode engine
    with nothing queued and no overhead stays local."""
    cfg = PdConfig(min_remote_prefill_tokens=256, max_prefill_queue_s=1.0)
    bare = PdConfig(min_remote_prefill_tokens=256, max_prefill_queue_s=1.0, step_overhead_s=0.0)
    assert plan_prefill(dec(420, step_s=0.001), [pre()], bare).reason == "no_stall"  # 42 + 1 ms
    assert plan_prefill(dec(420, step_s=0.001), [pre()], cfg).engine == "p0"         # + 8 ms overhead: 51 ms
    assert plan_prefill(dec(300, step_s=0.001), [pre()], cfg).reason == "no_stall"   # 30 + 1 + 8 ms
    assert plan_prefill(dec(300, queued=200, step_s=0.001), [pre()], cfg).engine == "p0"  # + 20 ms queued


def test_ttft_margin_grows_with_the_stall_on_a_prefill_engine_without_streams() -> None:
    """A 0.9 s queue on the prefill engine costs ~0.9 s of TTFT: worth it to spare a stall of 2.6 TPOT budgets
    (128 ms; margin 1.28 s), not one of 1.2 budgets (59 ms; margin 0.59 s); and on a candidate with streams
    of its own (where the stall only moves) the margin stays 0.5 s."""
    cfg = PdConfig(min_remote_prefill_tokens=256, max_prefill_queue_s=1.0, ttft_margin_s=0.5)
    assert plan_prefill(dec(), [pre(queued=9000)], cfg).engine == "p0"
    assert plan_prefill(dec(500, step_s=0.001), [pre(queued=9000)], cfg).reason == "remote_slower"
    assert plan_prefill(dec(), [pre(queued=9000, running=1)], cfg).reason == "remote_slower"


def test_threshold_plan_takes_every_long_prompt_to_an_unsaturated_engine() -> None:
    cfg = PdConfig(max_prefill_queue_s=1.0, decision="threshold")
    assert plan_prefill(dec(running=0), [pre()], cfg).engine == "p0"
    assert plan_prefill(dec(running=0), [pre("p0", 20_000), pre("p1", 5000)], cfg).engine == "p1"
    assert plan_prefill(dec(), [pre(queued=20_000)], cfg).reason == "prefill_saturated"
    assert plan_prefill(dec(100), [pre()], cfg).reason == "short_prompt"


# -- the handshake ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_handshake_bodies(endpoint: str, stream: bool, engines: Any, make_gateway: Any,
                          loop_thread: LoopThread) -> None:
    p, d = engines("ok", "ok")
    loop_thread.call(d.gate.set)
    gw = pd_gateway(make_gateway, [p], [d])
    sent = request_body(endpoint, stream)
    r = post(gw, endpoint, sent)
    assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == "backend-1"
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]") and "t1" in r.text
    [pre], [dec] = p.bodies, d.bodies
    want_pre = {k: v for k, v in sent.items() if k != "stream_options"}
    want_pre.update(max_tokens=1, stream=False, kv_transfer_params=PREFILL_PARAMS)
    if endpoint == "chat":
        want_pre["max_completion_tokens"] = 1
    assert pre == want_pre
    assert dec == {**sent, "kv_transfer_params": HANDOFF}
    assert metric(gw, "kvmesh_pd_remote_prefills_total") == 1
    assert metric(gw, "kvmesh_pd_transfer_blocks_total") == 3


def test_short_prompt_pays_no_hop(engines: Any, make_gateway: Any) -> None:
    p, d = engines("ok", "ok")
    gw = pd_gateway(make_gateway, [p], [d])
    assert post(gw, "completions", request_body("completions", False, "hi")).status_code == 200
    assert not p.bodies and "kv_transfer_params" not in d.bodies[0]
    assert metric(gw, 'kvmesh_pd_local_prefills_total{reason="short_prompt"}') == 1


# -- failures: the decode engine prefills itself ----------------------------------------------------------
@pytest.mark.parametrize(("mode", "reason"), [("error", "prefill_status"), ("no_params", "prefill_no_params"),
                                              ("hang", "prefill_timeout"), ("drop", "prefill_connect")])
def test_prefill_failure_falls_back_to_local_prefill(mode: str, reason: str, engines: Any,
                                                     make_gateway: Any) -> None:
    p, d = engines(mode, "ok")
    gw = pd_gateway(make_gateway, [p], [d], pd={"prefill_timeout_s": 0.5})
    r = post(gw, "completions", request_body("completions", False))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    assert len(p.bodies) == 1 and "kv_transfer_params" not in d.bodies[0]
    assert metric(gw, f'kvmesh_pd_fallbacks_total{{reason="{reason}"}}') == 1
    assert metric(gw, "kvmesh_pd_remote_prefills_total") == 0


def test_busy_prefill_engine_is_waited_on_not_abandoned(engines: Any, make_gateway: Any,
                                                         loop_thread: LoopThread) -> None:
    """Overload is not failure: a prefill engine still computing (its counters move between scrapes) outlives
    ``prefill_timeout_s`` windows; giving up would throw its work away and load the decode engine with it."""
    p, d = engines("busy", "ok")
    gw = pd_gateway(make_gateway, [p], [d], pd={"prefill_timeout_s": 5.0}, health_interval_s=0.05)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gw, "completions", request_body("completions", False))
        wait_until(lambda: metric(gw, "kvmesh_gateway_busy_waits_total") >= 1, 60, "a busy window")
        loop_thread.call(p.gate.set)
        r = answer.result(timeout=60)
    assert r.status_code == 200 and d.bodies[0]["kv_transfer_params"] == HANDOFF
    assert metric(gw, "kvmesh_pd_remote_prefills_total") == 1 and p.cancelled == 0
    assert all(b.breaker.trips == 0 for b in gw.pool.backends)


def test_prefill_engine_busy_past_the_limit_falls_back_without_a_breaker_trip(engines: Any,
                                                                              make_gateway: Any) -> None:
    p, d = engines("busy", "ok")
    gw = pd_gateway(make_gateway, [p], [d], pd={"prefill_timeout_s": 5.0}, health_interval_s=0.05,
                    busy_timeout_s=10.0)
    r = post(gw, "completions", request_body("completions", False))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    assert "kv_transfer_params" not in d.bodies[0]
    assert metric(gw, 'kvmesh_pd_fallbacks_total{reason="prefill_busy"}') == 1
    assert all(b.breaker.trips == 0 for b in gw.pool.backends)
    wait_until(lambda: p.cancelled == 1, 30, "the leg's cancellation")  # closed: vLLM aborts it


def test_prefill_engine_down_falls_back(engines: Any, make_gateway: Any, loop_thread: LoopThread) -> None:
    p, d = engines("ok", "ok")
    gw = pd_gateway(make_gateway, [p], [d])
    loop_thread.run(p.stop())  # refused from now on; the gateway's last health check still says up
    assert post(gw, "completions", request_body("completions", False)).status_code == 200
    assert metric(gw, 'kvmesh_pd_fallbacks_total{reason="prefill_connect"}') == 1
    assert "kv_transfer_params" not in d.bodies[0]


def test_decode_failure_before_first_byte_retries_with_the_same_params(engines: Any, make_gateway: Any) -> None:
    p, bad, good = engines("ok", "drop", "ok")
    gw = pd_gateway(make_gateway, [p], [bad, good])  # round-robin: backend-1 (bad) first
    r = post(gw, "completions", request_body("completions", False))
    assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == "backend-2"
    assert len(p.bodies) == 1  # prefilled once
    assert bad.bodies[0]["kv_transfer_params"] == good.bodies[0]["kv_transfer_params"] == HANDOFF
    assert metric(gw, 'kvmesh_pd_fallbacks_total{reason="decode_retry"}') == 1


# -- client hang-up cancels both legs ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["round-robin", "kv-aware"])
def test_hangup_during_prefill_cancels_it(engines: Any, make_gateway: Any, loop_thread: LoopThread,
                                          policy: str) -> None:
    p, d = engines("hang", "ok")
    gw = pd_gateway(make_gateway, [p], [d], policy=policy)

    async def send_then_hang_up() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            task = asyncio.create_task(c.post(f"{gw.url}/v1/completions", json=request_body("completions", False)))
            await asyncio.to_thread(wait_until, lambda: bool(p.bodies), 10, "the prefill leg sent")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(send_then_hang_up())
    wait_until(lambda: p.cancelled == 1, 10, "the prefill leg cancelled")
    assert not d.bodies
    if policy == "kv-aware":  # the decode engine it was routed to carries nothing of it any more
        ledger = gw.policy.scorer.ledger
        assert loop_thread.call(lambda: (len(ledger.routed), sum(ledger.active.values()))) == (0, 0)


def test_hangup_during_decode_closes_the_decode_leg(engines: Any, make_gateway: Any) -> None:
    p, d = engines("ok", "ok")  # the decode stream stops after its first event (gate never set)
    gw = pd_gateway(make_gateway, [p], [d])
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=request_body("completions", True), timeout=30) as r:
        assert next(r.iter_lines()).startswith("data: ")
    wait_until(lambda: d.cancelled == 1, 10, "the decode leg cancelled")
    assert len(p.bodies) == 1


# -- roles in /health and /debug/route --------------------------------------------------------------------
def test_health_and_debug_route_show_roles(engines: Any, make_gateway: Any) -> None:
    p, d = engines("ok", "ok")
    gw = pd_gateway(make_gateway, [p], [d])
    health = httpx.get(f"{gw.url}/health").json()["backends"]
    assert {n: b["role"] for n, b in health.items()} == {"backend-0": "prefill", "backend-1": "decode"}
    route = httpx.get(f"{gw.url}/debug/route", params={"prompt": LONG, "model": MODEL}).json()
    assert route["roles"] == {"backend-0": "prefill", "backend-1": "decode"}
    assert route["chosen"] == "backend-1"  # a prefill engine never decodes


def test_config_roles() -> None:
    assert SupervisorConfig(prefill=1, decode=2).roles() == ["prefill", "decode", "decode"]
    assert SupervisorConfig(replicas=3, prefill=1).roles() == ["prefill", "both", "both"]
    with pytest.raises(ValueError, match="some must decode"):
        SupervisorConfig(prefill=2)
    cfg = GatewayConfig.model_validate({"backends": [{"url": "http://e:1", "role": "decode"}]})
    assert cfg.backends[0].role == "decode"


# -- a 1P+1D stack of simulated engines -------------------------------------------------------------------
def test_sim_stack_one_prefill_one_decode(tmp_path: pathlib.Path, tiny_model: pathlib.Path,
                                          loop_thread: LoopThread) -> None:
    cfg = StackConfig(
        model_size="tiny", models_dir=str(tiny_model.parent),
        engine=SimEngineConfig(kind="sim", model=str(tiny_model), served_model_name=DEMO_MODEL_NAME, block_size=16),
        supervisor=SupervisorConfig(prefill=1, decode=1, base_port=free_port_block(2), run_dir=str(tmp_path)),
        gateway=GatewayConfig(port=0, policy="least-request", health_interval_s=0.5,
                              pd=PdSettings(decision="threshold")),  # an idle decode engine: remote anyway
        cache=CacheNodeConfig(enabled=False))
    st = loop_thread.call(lambda: Stack(cfg))
    loop_thread.run(st.start(wait=True))
    try:
        url = st.gateway.url
        roles = {n: b["role"] for n, b in httpx.get(f"{url}/health").json()["backends"].items()}
        assert roles == {"engine-0": "prefill", "engine-1": "decode"}
        prompt = " ".join(f"w{i}" for i in range(400))
        for stream in (False, True):
            body = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 4, "stream": stream}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.headers["x-kvmesh-backend"] == "engine-1"
        decode_metrics = httpx.get(f"{st.engines[1].url}/metrics").text
        loaded = [x for x in decode_metrics.splitlines() if x.startswith("vllm:external_prefix_cache_hits_total")]
        assert loaded and float(loaded[0].rsplit(" ", 1)[1]) > 0  # the decode engine loaded, not computed
        assert httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=60).json()[
            "usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert metric(st.gateway, "kvmesh_pd_remote_prefills_total") == 3
    finally:
        loop_thread.run(st.stop())


def test_up_flags_make_a_pd_fleet() -> None:
    from kvmesh import cli

    cfg = cli._stack_config(None, {"supervisor.prefill": 1, "supervisor.decode": 1, "engine_kind": "sim"}, None)
    assert cfg.supervisor.replicas == 2 and cfg.supervisor.roles() == ["prefill", "decode"]


def test_a_half_open_prefill_probe_that_fails_backs_off(engines: Any, make_gateway: Any,
                                                        loop_thread: LoopThread) -> None:
    p, d = engines("error", "ok")
    gw = pd_gateway(make_gateway, [p], [d])
    b = gw.pool.backends[0]

    def half_open() -> None:
        b.breaker.failed(time.monotonic())
        b.breaker.opened_at -= b.breaker.cooldown_s

    loop_thread.call(half_open)
    assert post(gw, "completions", request_body("completions", False)).status_code == 200  # prefilled locally
    assert len(p.bodies) == 1  # it was the probe
    assert (b.breaker.state, b.breaker.trips, b.breaker.cooldown_s) == ("open", 2, 2.0)  # failed: twice the wait


def test_an_old_probe_ending_does_not_free_a_newer_probes_slot() -> None:
    from kvmesh.gateway.backends import CircuitBreaker

    br = CircuitBreaker()
    br.failed(0.0)
    a = br.routed()  # A probes ...
    br.succeeded()  # ... and gets its first byte (still streaming)
    br.failed(1.0)  # another request fails: open again
    c = br.routed()  # C is the new probe
    br.probe_ended(a)  # A's stream ends
    assert c and br.probing and not br.admits(100.0)  # C still holds the slot
    br.probe_ended(c)
    assert not br.probing
