"""The OpenAI-compatible gateway (aiohttp): parse → validate → route → forward → relay.

Lifecycle: ``await gw.start()`` binds the socket and starts health checks; ``await gw.stop()`` closes
both.  Everything runs on one event loop; handlers never block it (the only CPU work per request is JSON
parsing of the request body and the policy's arithmetic).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from kvmesh.config import ConfigError, GatewayConfig, load_stack_config
from kvmesh.gateway.admission import Admission
from kvmesh.gateway.backends import Backend, BackendPool
from kvmesh.api.errors import ApiError
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.openapi import openapi_spec
from kvmesh.gateway.proxy import CONNECT_ERRORS, Exchange, open_upstream, relay_stream, relay_whole
from kvmesh.gateway.reconfig import reconfigure
from kvmesh.gateway.tenants import Tenants, load_tenants
from kvmesh.gateway.tokens import TokenStage
from kvmesh.api.validation import parse_json, prompt_size_estimate, validate
from kvmesh.index import IndexFeed, KvIndex
from kvmesh.routing import NoCandidate, Policy, RequestContext, make_policy
from kvmesh.routing.kv_aware import KvAwarePolicy

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ENGINE_EXITED = "engine process exited"
_json = msgspec.json.Encoder()


def ex_cost(endpoint: str, req: dict[str, Any]) -> int:
    """Tokens a request is charged on admission: prompt estimate + requested output."""
    return prompt_size_estimate(endpoint, req) + int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)


class FirstByteTimeout(Exception):
    """A streaming backend sent no first token within ``ttft_timeout_s``."""


class Gateway:
    def __init__(self, cfg: GatewayConfig, policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        r = cfg.routing
        self.index = KvIndex("kvmesh", r.max_index_blocks, r.speculative_ttl_s)
        self.policy = policy or make_policy(cfg.policy, index=self.index, cfg=r, registry=self.metrics.registry)
        self.tokens = TokenStage(cfg.tokenizer, self.metrics) if self.policy.needs_tokens else None
        self.pool = BackendPool(cfg.health_interval_s, on_health=self._health_changed,
                                scrape_metrics=self.policy.needs_tokens)
        for i, spec in enumerate(cfg.backends):
            self.pool.add(spec.name or f"backend-{i}", spec.url, spec.kv_events, spec.replay)
        self.feed: IndexFeed | None = None
        self.tenants = Tenants(load_tenants(pathlib.Path(cfg.tenants_file) if cfg.tenants_file else None))
        self.draining = False
        self.admission = Admission(self._capacity, cfg.max_queue, cfg.queue_timeout_s, cfg.retry_after_s,
                                   reserve=cfg.admission_reserve)
        self.metrics.queue_depth.set_function(self.admission.queued)
        self._active = 0  # requests being forwarded or relayed
        self._idle = asyncio.Event()
        self.port = cfg.port
        self.config_path: pathlib.Path | None = None  # set by `kvmesh up --config`: reloads re-read it
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._health_http: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        if self.cfg.debug_endpoints:
            app.router.add_get("/debug/route", self._debug_route)
            app.router.add_post("/debug/route", self._debug_route)  # prompts too long for a URL
        app.router.add_post("/admin/reload", self._reload)
        app.router.add_get("/openapi.json", self._openapi)
        return app

    async def start(self) -> None:
        # No connection limit (the engines apply back-pressure); keep-alive reuse saves a connect per call.
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        # per phase: connect, then (streams) first token in _open, then the gap between chunks
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.read_timeout_s)
        self._http = aiohttp.ClientSession(connector=conn, timeout=timeout, auto_decompress=False)
        self._health_http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        if self.policy.needs_tokens:
            self.feed = IndexFeed(self.index, self.metrics.registry)
            for b in self.pool.backends:
                self.subscribe(b)
            for n in self.cfg.cache_nodes:
                self.feed.add_node(n.name, n.kv_events, list(n.engines) or [b.name for b in self.pool.backends],
                                   n.replay)
        await self.pool.check_all(self._health_http)
        self._health_task = asyncio.create_task(self.pool.run(self._health_http), name="health")
        # handler_cancellation: a client disconnect cancels its handler, which closes the upstream request.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and isinstance(server, asyncio.base_events.Server) and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("gateway listening on http://%s:%d (policy %s)", self.cfg.host, self.port, self.policy.name)

    def subscribe(self, b: Backend) -> None:
        """Start following ``b``'s KV events (no-op without an endpoint or a KV-aware policy)."""
        if self.feed is not None and b.kv_events and b.name not in self.feed.subs:
            self.feed.add(b.name, b.kv_events, b.replay)

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking requests (readiness goes false) and wait for in-flight ones, at most ``timeout_s``;
        returns how many were still running when it gave up."""
        self.draining = True
        if self._active:
            try:
                await asyncio.wait_for(self._idle.wait(), self.cfg.drain_timeout_s if timeout_s is None else timeout_s)
            except TimeoutError:
                pass
        return self._active

    def reload_tenants(self) -> None:
        """Re-read the tenants file (keys, limits); raises ``ValueError`` and keeps the old set on error."""
        self.tenants = Tenants(load_tenants(pathlib.Path(self.cfg.tenants_file) if self.cfg.tenants_file else None))

    async def stop(self) -> None:
        if self._runner is not None and not self.draining:
            left = await self.drain()
            if left:
                log.warning("stopping with %d requests still in flight after %.0fs", left, self.cfg.drain_timeout_s)
        if self.feed is not None:
            await self.feed.stop()
        if self.tokens is not None:
            self.tokens.close()
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._runner:
            await self._runner.cleanup()
        for s in (self._http, self._health_http):
            if s:
                await s.close()

    async def refresh_backends(self) -> None:
        """Run one health-check round now (also refreshes each backend's model list)."""
        if self._health_http is not None:
            await self.pool.check_all(self._health_http)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def _capacity(self) -> int | None:
        per = self.cfg.max_in_flight_per_backend
        return None if per is None else per * sum(b.healthy for b in self.pool.backends)

    def _health_changed(self, b: Backend, reason: str) -> None:
        self.metrics.healthy.labels(b.name).set(1 if b.healthy else 0)
        if b.healthy:
            self.admission.pump()  # more capacity: admit waiters
        if not b.healthy and (reason.startswith("connect") or reason == ENGINE_EXITED):
            # The engine process is gone, and its cache with it.  (A mere timeout keeps the entries.)
            n = self.index.clear_engine(b.name)
            if n:
                log.info("dropped %d indexed blocks of %s (%s)", n, b.name, reason)

    # ---- plumbing --------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            self.metrics.errors.labels(e.kind).inc()
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.errors.labels("body_too_large").inc()
            return ApiError(413, f"request body exceeds {self.cfg.max_body_bytes} bytes").response()
        except web.HTTPException as e:
            if e.status >= 400:
                return ApiError(e.status, f"{e.reason}: {request.method} {request.path}").response()
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            # A bug, not the client's fault: say so in the same JSON shape, keep serving.
            log.exception("unhandled error on %s %s", request.method, request.path)
            self.metrics.errors.labels("internal").inc()
            return ApiError(500, "internal gateway error").response()

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.cfg.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.cfg.max_body_bytes,
                                                actual_size=request.content_length)
        return await request.read()

    # ---- endpoints -------------------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._count("completions", self._proxy(request, "completions"))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._count("chat", self._proxy(request, "chat"))

    async def _count(self, endpoint: str, work: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        status = "499"
        try:
            resp = await work
            status = str(resp.status)
            return resp
        except ApiError as e:
            status = str(e.status)
            raise
        finally:
            self.metrics.requests.labels(endpoint, status).inc()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.pool.model_list()})

    async def _health(self, request: web.Request) -> web.Response:
        backends = {b.name: {"url": b.url, "healthy": b.healthy, "in_flight": b.in_flight,
                             "breaker": b.breaker.state, "breaker_trips": b.breaker.trips}
                    for b in self.pool.backends}
        return web.json_response({"status": "ok", "policy": self.policy.name, "backends": backends})

    async def _ready(self, request: web.Request) -> web.Response:
        n = sum(b.healthy for b in self.pool.backends)
        ready = n > 0 and not self.draining
        return web.json_response({"ready": ready, "healthy_backends": n, "draining": self.draining},
                                 status=200 if ready else 503)

    def _require_admin(self, request: web.Request) -> None:
        if not self.tenants.is_admin(request.headers.get("authorization")):
            raise ApiError(401 if self.tenants.enabled else 403, "admin key required", kind="auth_admin")

    async def _reload(self, request: web.Request) -> web.Response:
        """Re-read the tenants file, and the gateway's config file when it has one (``config_path``)."""
        self._require_admin(request)
        try:
            report = self.reload()
        except (ValueError, ConfigError) as e:
            raise ApiError(400, str(e), kind="reload") from None
        return web.json_response({"reloaded": True, "tenants": sorted(self.tenants.tenants), **report})

    def reload(self) -> dict[str, Any]:
        """Apply the config file's ``[gateway]`` table (if any) and re-read the tenants file; see
        :mod:`kvmesh.gateway.reconfig`.  Raises ``ValueError``/``ConfigError`` and changes nothing on bad input."""
        if self.config_path is None:
            self.reload_tenants()
            return {}
        new = load_stack_config(self.config_path).gateway
        report = reconfigure(self, new)
        if "tenants_file" not in report["changed"]:
            self.reload_tenants()  # the file's contents may have changed
        return report

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_spec())

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    # ---- the proxy path --------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        known = self.pool.known_models()
        if known and model not in known:
            raise ApiError(404, f"model {model!r} not found; available: {', '.join(sorted(known))}",
                           param="model", kind="unknown_model")

    def _route(self, ctx: RequestContext, tried: set[str]) -> Backend:
        t0 = time.perf_counter()
        try:
            decision = self.policy.choose(ctx, self.pool.backends, frozenset(tried))
        except NoCandidate as e:
            if tried:
                raise ApiError(502, f"could not reach any backend for model {ctx.model!r} "
                                    f"(tried {', '.join(sorted(tried))})", kind="upstream_connect") from None
            raise ApiError(503, str(e), kind="no_backend", retry_after=self.cfg.retry_after_s) from None
        b = decision.backend
        if not isinstance(b, Backend):  # the pool only holds Backends; keeps mypy honest
            raise TypeError(type(b))
        self.metrics.decision.observe(time.perf_counter() - t0)
        self.metrics.routed.labels(b.name, self.policy.name).inc()
        self.policy.on_routed(ctx, b.name)
        if ctx.token_ids:
            cached = len(ctx.token_ids) - ctx.uncached.get(b.name, len(ctx.token_ids))
            self.metrics.matched.observe(cached / len(ctx.token_ids))
        return b

    async def _context(self, request: web.Request, endpoint: str, req: dict[str, Any],
                       salt: str | None = None) -> RequestContext:
        ctx = RequestContext(
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex, model=req["model"],
            endpoint=endpoint, prompt_tokens_estimate=prompt_size_estimate(endpoint, req),
            max_tokens=req.get("max_tokens") or req.get("max_completion_tokens"),
            session_id=request.headers.get(self.cfg.session_header))
        if self.tokens is not None:
            bs = self.policy.block_size() if isinstance(self.policy, KvAwarePolicy) else None
            seed = self.policy.index.seed_for(salt) if isinstance(self.policy, KvAwarePolicy) else 0
            ctx.token_ids, ctx.block_keys = await self.tokens.tokens(endpoint, req, bs, seed)
            if ctx.token_ids is not None:
                ctx.prompt_tokens_estimate = len(ctx.token_ids)
        return ctx

    async def _proxy(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        ex = Exchange(endpoint, time.perf_counter())
        if self.draining:
            raise ApiError(503, "the gateway is shutting down", kind="draining", retry_after=self.cfg.retry_after_s)
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        body = await self._read_body(request)
        req = parse_json(body)
        validate(endpoint, req)
        self._check_model(req["model"])
        charged = 0
        if tenant is not None:
            charged = ex_cost(endpoint, req)
            self.tenants.admit(tenant, charged)
            req["cache_salt"] = tenant.salt  # engines and caches never share KV across tenants
            body = _json.encode(req)
        name, priority = (tenant.name, tenant.cfg.priority) if tenant else ("default", 0)
        try:
            cost = charged or ex_cost(endpoint, req)
            await self.admission.acquire(name, priority, cost)
            try:
                ctx = await self._context(request, endpoint, req, tenant.salt if tenant else None)
                ctx.tenant = tenant.name if tenant else None
                return await self._dispatch(request, body, ex, ctx, bool(req.get("stream")))
            finally:
                self.admission.release(name, (ex.used_tokens - cost) if ex.used_tokens is not None else 0)
        finally:
            if tenant is not None:
                self.tenants.release(tenant, charged, ex.used_tokens)

    async def _dispatch(self, request: web.Request, body: bytes, ex: Exchange, ctx: RequestContext,
                        stream: bool) -> web.StreamResponse:
        tried: set[str] = set()
        while True:
            b = self._route(ctx, tried)
            tried.add(b.name)
            resp = await self._forward(request, b, body, ex, stream, ctx)
            if resp is not None:
                return resp
            if len(tried) > self.cfg.max_connect_retries:
                raise ApiError(502, f"could not reach backend(s) {', '.join(sorted(tried))}",
                               kind="upstream_connect")
            self.metrics.retries.inc()

    async def _forward(self, request: web.Request, b: Backend, body: bytes, ex: Exchange, stream: bool,
                       ctx: RequestContext) -> web.StreamResponse | None:
        """Send to ``b`` and relay; None when the connection failed before any response (retryable)."""
        self._enter(b)
        # Prompt tokens this backend must prefill, counted until its first byte comes back.
        prefill = ctx.uncached.get(b.name, ctx.prompt_tokens_estimate)
        queued = b.pending_prefill_tokens
        b.pending_prefill_tokens += prefill

        def first_byte() -> None:
            nonlocal prefill
            b.breaker.succeeded()
            if prefill >= 0:
                b.pending_prefill_tokens -= prefill
                prefill = -1
                self.policy.on_first_token(ctx, b.name, time.perf_counter() - ex.t_forward, queued)

        ex.on_first = first_byte
        try:
            ex.t_forward = time.perf_counter()
            self.metrics.overhead.observe(ex.t_forward - ex.t_arrival)
            try:
                upstream, first = await self._open(b, body, request, ex, stream)
            except CONNECT_ERRORS as e:
                self._bypass(b, "upstream_connect", f"connect failed: {type(e).__name__}")
                return None
            except FirstByteTimeout:
                # Nothing reached the client yet: bypass this (hung or overloaded) engine and retry.
                # (no early health check: a hung engine often still answers /health)
                self._bypass(b, "upstream_ttft_timeout", f"no first token within {self.cfg.ttft_timeout_s:g}s",
                             poke=False)
                return None
            except TimeoutError:
                self.metrics.errors.labels("upstream_timeout").inc()
                raise ApiError(504, f"backend {b.name} did not answer in time") from None
            async with upstream:
                is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
                if stream and is_sse:
                    resp = await relay_stream(request, upstream, b, ex, self.metrics, first)
                    ex.used_tokens = ctx.prompt_tokens_estimate + max(ex.chunks - 1, 0)
                else:
                    try:
                        resp = await relay_whole(upstream, b, ex)
                    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                        # The engine died while answering; the client has received nothing: retry.
                        self._bypass(b, "upstream_broken", f"connect failed mid-response: {type(e).__name__}")
                        return None
                    first_byte()
            self.metrics.e2e.labels(ex.endpoint).observe(time.perf_counter() - ex.t_arrival)
            return resp
        finally:
            if prefill >= 0:
                b.pending_prefill_tokens -= prefill
            self._leave(b)

    def _enter(self, b: Backend) -> None:
        b.breaker.routed()
        b.in_flight += 1
        self._active += 1
        self._idle.clear()
        self.metrics.in_flight.labels(b.name).inc()

    def _leave(self, b: Backend) -> None:
        b.in_flight -= 1
        self._active -= 1
        if not self._active:
            self._idle.set()  # drain() waits for this
        self.metrics.in_flight.labels(b.name).dec()

    def _bypass(self, b: Backend, kind: str, reason: str, poke: bool = True) -> None:
        """Take ``b`` out of rotation after a failure the client never saw (its breaker opens; a refused
        connection also marks it down until a health check passes); the caller retries elsewhere."""
        self.metrics.errors.labels(kind).inc()
        trips = b.breaker.trips
        b.breaker.failed(time.monotonic())
        if b.breaker.trips > trips:
            self.metrics.breaker_trips.labels(b.name).inc()
        log.warning("backend %s: %s; circuit open for %.1fs", b.name, reason, b.breaker.cooldown_s)
        if kind == "upstream_connect":
            self.pool.set_health(b, False, reason)
        if poke:
            self.pool.poke()

    async def _open(self, b: Backend, body: bytes, request: web.Request, ex: Exchange,
                    stream: bool) -> tuple[aiohttp.ClientResponse, bytes]:
        """Response headers (and, for streams, the first chunk) within ``ttft_timeout_s``; raises
        :class:`FirstByteTimeout` after closing the upstream request."""
        assert self._http is not None  # set in start(); not input validation
        if not stream:
            return await open_upstream(self._http, b, _PATHS[ex.endpoint], body, request), b""
        upstream: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self.cfg.ttft_timeout_s):
                upstream = await open_upstream(self._http, b, _PATHS[ex.endpoint], body, request)
                first = b""
                if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                    first = await upstream.content.readany()
                return upstream, first
        except TimeoutError:
            if upstream is not None:
                upstream.close()
            raise FirstByteTimeout from None

    async def _debug_route(self, request: web.Request) -> web.Response:
        """``GET /debug/route?prompt=...&model=...`` (or ``POST`` a completions/chat body): what the policy would
        do, without sending anything."""
        self._require_admin(request)
        q = request.query
        models = sorted(self.pool.known_models())
        endpoint = "completions"
        if request.method == "POST":
            req: dict[str, Any] = parse_json(await self._read_body(request))
            req.setdefault("model", models[0] if models else "")
            endpoint = "chat" if "messages" in req else "completions"
        else:
            req = {"model": q.get("model") or (models[0] if models else ""), "prompt": q.get("prompt", "")}
        validate(endpoint, req)
        ctx = await self._context(request, endpoint, req)
        ctx.explain = []  # ask the scorers for their breakdown
        try:
            d = self.policy.choose(ctx, self.pool.backends)
        except NoCandidate as e:
            raise ApiError(503, str(e), kind="no_backend", retry_after=self.cfg.retry_after_s) from None
        return web.json_response({
            "policy": self.policy.name, "chosen": d.backend.name,
            "prompt_tokens": len(ctx.token_ids) if ctx.token_ids is not None else None,
            "block_size": self.index.block_size, "blocks": len(ctx.block_keys or []),
            "candidates": ctx.explain or [{"backend": b.name, "healthy": b.healthy, "in_flight": b.in_flight}
                                          for b in self.pool.backends],
        })
