"""The OpenAI-compatible gateway (aiohttp): lifecycle, endpoints and the components a request goes through.

The request path itself — auth → parse → admit → tokenise → route → forward → relay — is
:class:`kvmesh.gateway.path.RequestPath`; this module builds the components it reads (policy, backend pool,
tenants, admission queue, tokenise stage, KV event feed) and serves the other endpoints.

Lifecycle: ``await gw.start()`` binds the socket and starts health checks (and, when the policy reads a KV
index, the engines' KV event subscriptions); ``await gw.stop()`` drains and closes them.  Everything runs on
one event loop; handlers never block it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from kvmesh.api.errors import ApiError
from kvmesh.config import ConfigError, GatewayConfig, load_stack_config
from kvmesh.discovery.kubernetes import GatewayDiscovery
from kvmesh.gateway.admission import Admission
from kvmesh.gateway.backends import Backend, BackendPool
from kvmesh.gateway.metrics import GatewayMetrics, StateCollector
from kvmesh.gateway.openapi import openapi_spec
from kvmesh.gateway.path import RequestPath
from kvmesh.gateway.pressure import Pressure
from kvmesh.gateway.reconfig import reconfigure
from kvmesh.gateway.tenants import Tenants, changed_tenants, load_tenants
from kvmesh.gateway.tokens import TokenStage
from kvmesh.index.index import KvIndex
from kvmesh.index.subscriber import IndexFeed, NodeSubscriber
from kvmesh.routing import Policy, make_policy

log = logging.getLogger(__name__)
# checked against each engine's /tokenize before it is sent token ids for text: words, digits, punctuation,
# accents, CJK, whitespace runs (where tokenizers disagree first)
TOKENS_PROBE = "kvmesh tokenizer probe: Grüße, naïve café 東京 2026-12-02 3.14 ≠ x_y\n\tend  of   probe."
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ENGINE_EXITED = "engine process exited"
_MAX_REQUEST_LINE = 1 << 20
_MAX_URL_QUERY = 8190  # aiohttp's own request-line limit, and what proxies commonly accept


class Gateway:
    log = log

    def __init__(self, cfg: GatewayConfig, policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        self.policy = policy or make_policy(cfg.policy, cfg=cfg.routing, registry=self.metrics.registry)
        self.tokens = TokenStage(cfg.tokenizer, self.metrics) if self.policy.needs_tokens else None
        # every policy: the engines' counters tell busy from hung (a first-token wait on an engine whose
        # other work the gateway does not relay), and the autoscaler reads their queues
        self.pool = BackendPool(cfg.health_interval_s, on_health=self._health_changed, scrape_metrics=True)
        for i, spec in enumerate(cfg.backends):
            self.pool.add(spec.name or f"backend-{i}", spec.url, spec.kv_events, spec.replay, spec.role)
        if cfg.forward_token_ids and self.tokens is not None and self.tokens.tokenizer is not None:
            self.pool.tokens_probe = (TOKENS_PROBE, list(self.tokens.tokenizer.encode(TOKENS_PROBE, True).ids))
        self.feed: IndexFeed | None = None
        self.tenants = Tenants(load_tenants(pathlib.Path(cfg.tenants_file) if cfg.tenants_file else None))
        self.draining = False
        self.admission = Admission(self._capacity, cfg.max_queue, cfg.queue_timeout_s, cfg.retry_after_s,
                                   reserve=cfg.admission_reserve, max_expected_wait_s=cfg.max_expected_wait_s,
                                   ready_fn=lambda: any(b.healthy for b in self.pool.backends),
                                   hold_s=cfg.cold_start_hold_s)
        # overload is not failure: queued prefill / learned throughput → shed early (gateway/pressure.py)
        self.pressure = self.admission.pressure = Pressure(lambda: self.pool.backends, self.admission.queued_prefill)
        self.metrics.watch_pressure(self.pressure)
        self.metrics.queue_depth.set_function(self.admission.queued)
        self.metrics.registry.register(StateCollector(lambda: self.pool.backends,
                                                      lambda: self.tenants.tenants.values()))
        self.path = RequestPath(self)
        self.port = cfg.port
        self.config_path: pathlib.Path | None = None  # set by `kvmesh up --config`: reloads re-read it
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._health_http: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.discovery: GatewayDiscovery | None = None  # backends from Kubernetes EndpointSlices
        self.backend_info: dict[str, dict[str, object]] = {}  # shown per backend in /health (e.g. its GPUs)
        self.observers: list[Callable[[Any], None]] = []  # called with each served ProxyRequest (autoscaler)
        self.autoscale_state: Callable[[], dict[str, Any]] | None = None  # GET /debug/autoscale

    @property
    def index(self) -> KvIndex | None:
        """The KV index the policy reads and the engines' events feed (None when the policy reads none)."""
        return self.policy.event_index

    @property
    def http(self) -> aiohttp.ClientSession:
        """The upstream connection pool (exists between start and stop)."""
        if self._http is None:
            raise RuntimeError("gateway not started")
        return self._http

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
            app.router.add_get("/debug/autoscale", self._debug_autoscale)
        app.router.add_post("/admin/reload", self._reload)
        app.router.add_get("/openapi.json", self._openapi)
        return app

    async def start(self) -> None:
        # No connection limit (the engines apply back-pressure); keep-alive reuse saves a connect per call.
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        # per phase: connect, then (streams) first token in RequestPath.open, then the gap between chunks
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.read_timeout_s)
        self._http = aiohttp.ClientSession(connector=conn, timeout=timeout, auto_decompress=False)
        self._health_http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        if self.index is not None:  # feed the index only when the policy reads it
            self.feed = IndexFeed(self.index, self.metrics.registry)
            for b in self.pool.backends:
                self.subscribe(b)
            for n in self.cfg.cache_nodes:
                self.feed.add_node(n.name, n.kv_events, list(n.engines) or [b.name for b in self.pool.backends],
                                   n.replay, serves_new=not n.engines)
        if self.cfg.discovery == "kubernetes":
            self.discovery = GatewayDiscovery(self, self.cfg.kubernetes)
            self.discovery.start()
        await self.pool.check_all(self._health_http)
        self._health_task = asyncio.create_task(self.pool.run(self._health_http), name="health")
        # handler_cancellation: a client disconnect cancels its handler, which closes the upstream request.
        # a request line up to 1 MiB reaches the handlers, so a long GET /debug/route gets a JSON 414 (not
        # aiohttp's plain-text 400 and a logged traceback)
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                     max_line_size=_MAX_REQUEST_LINE)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and isinstance(server, asyncio.base_events.Server) and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("gateway listening on http://%s:%d (policy %s)", self.cfg.host, self.port, self.policy.name)

    def subscribe(self, b: Backend) -> None:
        """Start following ``b``'s KV events (no-op without an endpoint or a policy that reads an index)."""
        if self.feed is None:
            return
        for sub in self.feed.subs.values():  # a node serving every backend serves this one too
            if isinstance(sub, NodeSubscriber) and sub.serves_new:
                sub.serve([b.name])
        if b.kv_events and b.name not in self.feed.subs:
            self.feed.add(b.name, b.kv_events, b.replay)

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking requests (readiness goes false) and wait for in-flight ones, at most ``timeout_s``;
        returns how many were still running when it gave up."""
        self.draining = True
        if self.path.active:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.path.idle.wait(),
                                       self.cfg.drain_timeout_s if timeout_s is None else timeout_s)
        return self.path.active

    def reload_tenants(self) -> list[str]:
        """Re-read the tenants file (keys, limits); raises ``ValueError`` and keeps the old set on error.
        Returns what changed (``tenants.<name>``)."""
        new = Tenants(load_tenants(pathlib.Path(self.cfg.tenants_file) if self.cfg.tenants_file else None))
        changed, self.tenants = changed_tenants(self.tenants, new), new.keep_live_state(self.tenants)
        return changed

    async def stop(self) -> None:
        if self._runner is not None and not self.draining:
            left = await self.drain()
            if left:
                log.warning("stopping with %d requests still in flight after %.0fs", left, self.cfg.drain_timeout_s)
        if self.discovery is not None:
            await self.discovery.stop()
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
        if b.healthy:
            self.admission.pump()  # more capacity: admit waiters
        if not b.healthy and self.index is not None and (reason.startswith("connect") or reason == ENGINE_EXITED):
            # The engine process is gone, and its cache with it (not its cache node's, indexed under the
            # node's own name: those blocks stay loadable).  A mere timeout keeps the entries.
            n = self.index.clear_engine(b.name)
            if n:
                log.info("dropped %d indexed blocks of %s (%s)", n, b.name, reason)

    # ---- what the request path asks of the gateway -----------------------------------------------
    async def read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.cfg.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.cfg.max_body_bytes,
                                                actual_size=request.content_length)
        return await request.read()

    def check_model(self, model: str) -> None:
        known = self.pool.known_models()
        if known and model not in known:
            raise ApiError(404, f"model {model!r} not found; available: {', '.join(sorted(known))}",
                           param="model", kind="unknown_model")

    # ---- endpoints -------------------------------------------------------------------------------
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

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self.path.handle(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self.path.handle(request, "chat")

    async def _models(self, request: web.Request) -> web.Response:
        # With API keys on, the model list is for callers (as OpenAI's is): a tenant's key or an admin's.
        key = request.headers.get("authorization")
        if self.tenants.enabled and not self.tenants.is_admin(key):
            self.tenants.authenticate(key)  # raises the 401
        # An empty 200 list while replicas start reads as "this gateway serves no model"; answer what /ready
        # answers instead: 503 until a replica is healthy, whether backends are known yet or not.
        if not any(b.healthy for b in self.pool.backends):
            why = ("no replica is ready yet" if self.pool.backends else
                   "no backend is configured or discovered yet")
            raise ApiError(503, f"{why}; wait on /ready", kind="not_ready", retry_after=self.cfg.retry_after_s)
        return web.json_response({"object": "list", "data": self.pool.model_list()})

    async def _health(self, request: web.Request) -> web.Response:
        # Probes (Kubernetes, load balancers) carry no key and need only the 200.  With API keys on, the
        # backends' URLs and state are for admins: they map the cluster's internal network.
        if self.tenants.enabled and not self.tenants.is_admin(request.headers.get("authorization")):
            return web.json_response({"status": "ok", "policy": self.policy.name,
                                      "healthy_backends": sum(b.healthy for b in self.pool.backends)})
        backends = {b.name: {"url": b.url, "role": b.role, "healthy": b.healthy, "in_flight": b.in_flight,
                             "breaker": b.breaker.state, "breaker_trips": b.breaker.trips,
                             **self.backend_info.get(b.name, {})}
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
            return {"changed": self.reload_tenants()}
        new = load_stack_config(self.config_path).gateway
        report = reconfigure(self, new)
        if "tenants_file" not in report["changed"]:
            report["changed"] = [*report["changed"], *self.reload_tenants()]  # the file's contents may have changed
        return report

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_spec())

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _debug_autoscale(self, request: web.Request) -> web.Response:
        """The autoscaler's decisions, reasons and inputs, and the overload pressure (``kvmesh up --autoscale``)."""
        self._require_admin(request)
        state = self.autoscale_state() if self.autoscale_state is not None else {"enabled": False}
        return web.json_response({**state, "pressure": self.pressure.snapshot()})

    async def _debug_route(self, request: web.Request) -> web.Response:
        """``GET /debug/route?prompt=...&model=...`` (or ``POST`` a completions/chat body): what the policy would
        do, without sending anything."""
        self._require_admin(request)
        if request.method == "GET" and len(request.query_string) > _MAX_URL_QUERY:
            raise ApiError(414, f"the query is {len(request.query_string)} bytes, too long for a URL: POST "
                           "/debug/route with a completions or chat body instead", kind="uri_too_long")
        out = await self.path.explain(request)
        out["roles"] = {b.name: b.role for b in self.pool.backends}  # P/D: prefill engines never decode
        return web.json_response(out)
