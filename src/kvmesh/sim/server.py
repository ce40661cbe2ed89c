"""A vLLM-compatible simulated engine in real (optionally scaled) time.

Speaks what kvmesh and its clients use of vLLM: ``/v1/completions`` and ``/v1/chat/completions`` (stream
and non-stream, ``usage`` with ``prompt_tokens_details.cached_tokens``), ``/v1/models``, ``/health``,
``/tokenize``, ``/reset_prefix_cache``, ``/metrics`` with vLLM's metric names, and KV events on a ZMQ PUB
socket in vLLM's wire format (topic, 8-byte sequence, msgpack batch).  It takes part in vLLM's P/D handshake
(``kv_transfer_params``): asked to ``do_remote_decode``, it answers where the prompt's blocks are (its engine
id, the blocks' keys, its host and port); asked to ``do_remote_prefill``, it counts the prompt as received
from the prefill engine — loaded, not computed — in ``vllm:external_prefix_cache_hits`` and in the usage's
``cached_tokens``.  Inside: the same
:class:`EngineCore` the virtual-time simulator uses, stepped by an asyncio task that sleeps each step's
modelled duration × ``time_scale``.  Many servers can share one process and event loop.

Stopping (SIGTERM through ``kvmesh engine``, a supervisor's stop) drains, as vLLM with ``--shutdown-timeout``
does: new generation requests get 503 while the requests already in flight run to their end, for at most
``DRAIN_S`` seconds; then the engine loop is cancelled.  ``stop(crash=True)`` still cuts everything at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvmesh.api.validation import parse_json, validate
from kvmesh.index.events import EventBatch, encode_batch
from kvmesh.index.hashing import block_keys, root_seed, salted_seed
from kvmesh.sim.core import EngineCore, SimRequest
from kvmesh.sim.profiles import TimingProfile
from kvmesh.tokenize import PromptTokenizer

log = logging.getLogger(__name__)
DRAIN_S = 30.0  # stop(): how long in-flight requests may run on; below an engine pod's grace period less preStop


@dataclass(slots=True)
class _Live:
    req: SimRequest
    queue: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    sent: int = 0
    first_at: float = -1.0


class SimMetrics:
    def __init__(self, model: str) -> None:
        r = self.registry = CollectorRegistry()
        lab = ["model_name", "engine"]
        self.labels = (model, "0")
        self.running = Gauge("vllm:num_requests_running", "Running requests", lab, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Waiting requests", lab, registry=r)
        self.usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (0-1)", lab, registry=r)
        self.queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up", lab, registry=r)
        self.hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found cached", lab, registry=r)
        self.ext_queries = Counter("vllm:external_prefix_cache_queries", "Prompt tokens looked up through the "
                                   "KV connector (remote prefill)", lab, registry=r)
        self.ext_hits = Counter("vllm:external_prefix_cache_hits", "Prompt tokens whose KV the KV connector "
                                "loaded (remote prefill)", lab, registry=r)
        self.gen = Counter("vllm:generation_tokens", "Generated tokens", lab, registry=r)
        self.prompt = Counter("vllm:prompt_tokens", "Prompt tokens", lab, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT", lab, registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.itl = Histogram("vllm:inter_token_latency_seconds", "ITL", lab, registry=r,
                             buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


class SimServer:
    def __init__(self, model_dir: str, served_name: str, profile: TimingProfile, host: str = "127.0.0.1",
                 port: int = 0, block_size: int = 16, time_scale: float = 1.0,
                 kv_events_endpoint: str | None = None, token_scale: float = 1.0,
                 max_model_len: int | None = None) -> None:
        self.tok = PromptTokenizer(model_dir)
        self.max_model_len = max_model_len or _max_len(model_dir)
        self.model = served_name
        self.core = EngineCore("sim", profile, block_size, token_scale)
        self.host, self.port = host, port
        self.time_scale = time_scale
        self.kv_events_endpoint = kv_events_endpoint
        self.seed = root_seed("kvmesh")
        self.engine_id = uuid.uuid4().hex  # P/D: how a decode engine names this one as the blocks' owner
        self.metrics = SimMetrics(served_name)
        self.live: dict[int, _Live] = {}
        self._rid = 0
        self._seq = 0
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._open: dict[int, web.Request] = {}  # requests being served, by id (Request is unhashable)
        self._draining = False
        self._drained = asyncio.Event()  # set when draining and the last open request has ended

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/reset_prefix_cache", self._reset)
        app.router.add_post("/v1/completions", lambda r: self._generate(r, "completions"))
        app.router.add_post("/v1/chat/completions", lambda r: self._generate(r, "chat"))
        if self.kv_events_endpoint:
            if self.kv_events_endpoint.startswith("ipc://"):
                pathlib.Path(self.kv_events_endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
            self._pub = zmq.asyncio.Context.instance().socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(self.kv_events_endpoint)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and isinstance(server, asyncio.base_events.Server) and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        self._task = asyncio.create_task(self._loop(), name="sim-engine")

    async def stop(self, crash: bool = False, drain_s: float = DRAIN_S) -> None:
        """Stop serving: refuse new requests (503), let open ones finish for up to ``drain_s`` seconds, then
        stop.  ``crash``: drop every open connection at once, as a dying process would."""
        self._draining = True
        if crash:
            for req in list(self._open.values()):
                if req.transport is not None:
                    req.transport.close()
        elif self._open:
            log.info("draining %d open requests (up to %.0fs)", len(self._open), drain_s)
            try:
                await asyncio.wait_for(self._drained.wait(), drain_s)
            except TimeoutError:
                log.warning("drain time (%.0fs) over: cutting %d open requests", drain_s, len(self._open))
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._runner:
            await self._runner.cleanup()
        if self._pub is not None:
            self._pub.close(0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- the engine loop -------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.core.has_work():
                self._wake.clear()
                await self._wake.wait()
            now = time.monotonic()
            res = self.core.step(now, horizon=now)  # horizon=now: one iteration at a time
            await asyncio.sleep(res.duration * self.time_scale)
            self._deliver()
            await self._publish()

    def _deliver(self) -> None:
        now = time.monotonic()
        for rid, lv in list(self.live.items()):
            r = lv.req
            if lv.sent == 0 and r.generated:
                lv.first_at = now
            if lv.sent < r.generated:
                self.metrics.gen.labels(*self.metrics.labels).inc(r.generated - lv.sent)
            while lv.sent < r.generated:
                lv.queue.put_nowait(_token_id(r.keys[-1] if r.keys else len(r.tokens), r.tokens[-1], lv.sent))
                lv.sent += 1
            if r.done_at >= 0:
                lv.queue.put_nowait(None)
                del self.live[rid]
        m, lab = self.metrics, self.metrics.labels
        m.running.labels(*lab).set(len(self.core.running))
        m.waiting.labels(*lab).set(len(self.core.waiting))
        pool = self.core.pool
        m.usage.labels(*lab).set((pool.num_blocks - pool.free_blocks()) / max(pool.num_blocks, 1))

    async def _publish(self) -> None:
        events = self.core.pool.take_events()
        if not events or self._pub is None:
            return
        payload = encode_batch(EventBatch(time.time(), events))
        await self._pub.send_multipart((b"kv-events", self._seq.to_bytes(8, "big"), payload))
        self._seq += 1

    # ---- HTTP ------------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": "kvmesh-sim", "max_model_len": self.max_model_len}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def _reset(self, request: web.Request) -> web.Response:
        ok = self.core.reset_prefix_cache()
        await self._publish()
        return web.json_response({"success": ok}, status=200 if ok else 400)

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = parse_json(await request.read())
        ids = self.tok.encode_chat(body["messages"]) if "messages" in body else self.tok.encode_prompt(body["prompt"])
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len})

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        if self._draining:  # as vLLM's admission control answers: load balancers retry elsewhere
            return web.json_response({"error": {"message": "The engine is shutting down.",
                                                "type": "ServiceUnavailableError", "code": 503}}, status=503)
        self._open[id(request)] = request
        try:
            return await self._generate_inner(request, endpoint)
        finally:
            self._open.pop(id(request), None)
            if self._draining and not self._open:
                self._drained.set()

    async def _generate_inner(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        try:
            body = parse_json(await request.read())
            validate(endpoint, body)
        except Exception as e:  # the gateway validates first; direct callers get vLLM-style 400s
            return web.json_response({"error": {"message": str(e), "type": "BadRequestError", "code": 400}},
                                     status=400)
        if body["model"] != self.model:
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        ids = self._prompt_ids(endpoint, body)
        if len(ids) + int(body.get("max_tokens") or 0) > self.max_model_len:
            msg = (f"This model's maximum context length is {self.max_model_len} tokens. However, your request "
                   f"has {len(ids)} input tokens.")
            return web.json_response({"error": {"message": msg, "type": "BadRequestError", "code": 400}}, status=400)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        self._rid += 1
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        seed = salted_seed(self.seed, salt)
        kv = body.get("kv_transfer_params")
        kv = kv if isinstance(kv, dict) else {}
        req = SimRequest(self._rid, ids, list(block_keys(ids, self.core.block_size, seed)), max_tokens,
                         time.monotonic(), salt=salt, remote_kv=bool(kv.get("do_remote_prefill")))
        lv = _Live(req)
        self.live[req.rid] = lv
        self.core.add(req)
        self._wake.set()
        self.metrics.prompt.labels(*self.metrics.labels).inc(len(ids))
        try:
            if body.get("stream"):
                return await self._stream(request, endpoint, body, lv)
            return await self._whole(endpoint, lv, bool(kv.get("do_remote_decode")))
        except ConnectionResetError:  # the client went away mid-stream: abort below, as vLLM does
            return web.Response(status=499)
        finally:
            if req.done_at < 0:  # client went away: abort like vLLM does
                self.core.abort(req)
                self.live.pop(req.rid, None)

    def _prompt_ids(self, endpoint: str, body: dict[str, Any]) -> list[int]:
        if endpoint == "chat":
            return self.tok.encode_chat(body["messages"])
        p = body["prompt"]
        if isinstance(p, list) and p and isinstance(p[0], int):
            return list(p)
        if isinstance(p, list):
            p = p[0] if isinstance(p[0], str) else ""
            if not isinstance(p, str):
                return list(body["prompt"][0])
        return self.tok.encode_prompt(p)

    async def _collect(self, lv: _Live) -> list[int]:
        out = []
        while (t := await lv.queue.get()) is not None:
            out.append(t)
        return out

    def _record(self, lv: _Live) -> None:
        r, m = lv.req, self.metrics
        m.queries.labels(*m.labels).inc(len(r.tokens))
        m.hits.labels(*m.labels).inc(r.cached)
        if r.remote_kv:
            m.ext_queries.labels(*m.labels).inc(len(r.tokens) - r.cached)
            m.ext_hits.labels(*m.labels).inc(r.transferred)
        m.ttft.labels(*m.labels).observe(max(0.0, lv.first_at - r.arrival))

    def _usage(self, lv: _Live) -> dict[str, Any]:
        r = lv.req
        return {"prompt_tokens": len(r.tokens), "completion_tokens": r.generated,
                "total_tokens": len(r.tokens) + r.generated,
                "prompt_tokens_details": {"cached_tokens": r.cached + r.transferred}}

    def _handoff(self, lv: _Live) -> dict[str, Any]:
        """The ``kv_transfer_params`` a prefill answer carries: where a decode engine finds the prompt's KV."""
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_block_ids": list(lv.req.keys), "remote_host": self.host, "remote_port": self.port}

    async def _whole(self, endpoint: str, lv: _Live, handoff: bool = False) -> web.Response:
        toks = await self._collect(lv)
        self._record(lv)
        text = self.tok.tok.decode(toks)
        choice: dict[str, Any] = ({"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
                                  if endpoint == "completions" else
                                  {"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": "length"})
        obj = "text_completion" if endpoint == "completions" else "chat.completion"
        out = {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": obj, "created": int(time.time()),
               "model": self.model, "choices": [choice], "usage": self._usage(lv)}
        if handoff:
            out["kv_transfer_params"] = self._handoff(lv)
        return web.json_response(out)

    async def _stream(self, request: web.Request, endpoint: str, body: dict[str, Any],
                      lv: _Live) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cid, obj = f"cmpl-{uuid.uuid4().hex[:16]}", ("text_completion" if endpoint == "completions"
                                                    else "chat.completion.chunk")
        n = 0
        while (t := await lv.queue.get()) is not None:
            n += 1
            last = n >= lv.req.max_tokens
            text = self.tok.tok.decode([t])
            choice: dict[str, Any] = ({"index": 0, "text": text, "finish_reason": "length" if last else None}
                                      if endpoint == "completions" else
                                      {"index": 0, "delta": {"content": text},
                                       "finish_reason": "length" if last else None})
            await resp.write(_sse({"id": cid, "object": obj, "model": self.model, "choices": [choice]}))
        self._record(lv)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(_sse({"id": cid, "object": obj, "model": self.model, "choices": [],
                                   "usage": self._usage(lv)}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _max_len(model_dir: str) -> int:
    try:
        cfg = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        return int(cfg.get("max_position_embeddings", 4096))
    except (OSError, ValueError):
        return 4096


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _token_id(prefix_key: int, last: int, i: int) -> int:
    # deterministic in the prompt, so the same request gives the same "greedy" text on every replica
    return ((prefix_key ^ (last * 2654435761) ^ (i * 40503)) >> 7) % 8000 + 100
