"""The request path: every OpenAI request the gateway proxies goes through :meth:`RequestPath.handle`.

Read it top to bottom; each stage is one method below, in this order, over one :class:`ProxyRequest`:

1. **authenticate** — the API key names the tenant (401 without one when tenants are configured);
2. **parse** — body → validated JSON; the model must be served (404); the tenant's cache salt is added;
3. **admit** — the tenant's token/rate limits (429), then the fair queue across tenants (VTC);
4. **tokenise** — token ids and block keys, only when the policy reads them (:attr:`Policy.needs_tokens`);
5. **route** — the policy picks a backend from the healthy ones not tried yet;
5b. **prefill** — in a P/D fleet (some engine has role ``prefill``), a long uncached prompt is first prefilled
   on a prefill engine and its KV handed to the decode engine chosen in 5 (:mod:`kvmesh.gateway.pd`);
6. **forward** — send it upstream; a connect failure or a hung engine (no first token in time, and no
   progress on any of its streams) before the client saw a byte bypasses that backend and goes back to 5;
   a busy engine (making progress) is waited on, up to ``busy_timeout_s``, then 503 — overload is not failure;
7. **relay** — stream (or copy) the answer to the client; charge what was used.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
import msgspec
from aiohttp import web

from kvmesh.api.errors import ApiError
from kvmesh.api.validation import parse_json, prompt_size_estimate, validate
from kvmesh.gateway import order, pd
from kvmesh.gateway.backends import Backend, EngineBusy, FirstByteTimeout, wait_progressing
from kvmesh.gateway.proxy import CONNECT_ERRORS, open_upstream, relay_stream, relay_whole
from kvmesh.gateway.request import ProxyRequest
from kvmesh.routing import Decision, NoCandidate, RequestContext
from kvmesh.routing.disagg import decode_side

if TYPE_CHECKING:
    from kvmesh.gateway.app import Gateway

_json = msgspec.json.Encoder()


def _used(req: ProxyRequest) -> int | None:
    """Tokens to charge a request that ended: what it used; 0 when nothing was served (refused, shed, timed
    out, no backend, busy, or the client left before any answer: else a tenant's own 503s under overload
    drain its token budget into 429s); None (keep the up-front charge) for an answer with no usage."""
    if req.used_tokens is None and not req.answered and not req.chunks:
        return 0
    return req.used_tokens


def admission_cost(endpoint: str, payload: dict[str, object]) -> int:
    """Tokens a request is charged on admission: prompt estimate + requested output."""
    out = payload.get("max_tokens") or payload.get("max_completion_tokens") or 16
    return prompt_size_estimate(endpoint, payload) + int(out)  # type: ignore[call-overload,no-any-return]


class RequestPath:
    """The stages of one proxied request.  Reads the gateway's current config, tenants, policy, pool and
    admission queue (a reload swaps some of them; each request sees them as they are when it gets there)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.active = 0                # requests being forwarded or relayed
        self.idle = asyncio.Event()    # set whenever ``active`` drops to 0 (drain waits for it)
        self.idle.set()
        self._background: set[asyncio.Task[None]] = set()

    async def handle(self, http: web.Request, endpoint: str) -> web.StreamResponse:
        req = ProxyRequest(http, endpoint, time.perf_counter())
        status = "499"  # the client went away before an answer
        try:
            self.authenticate(req)
            await self.parse(req)
            async with self.admitted(req):
                await self.tokenise(req)
                resp = await self.dispatch(req)
                req.answered = True
            status = str(resp.status)
            return resp
        except ApiError as e:
            status = str(e.status)
            raise
        finally:
            self.gw.metrics.requests.labels(endpoint, status).inc()
            self.gw.metrics.tenant_requests.labels(req.tenant.name if req.tenant else "default", status).inc()

    # 1 ------------------------------------------------------------------------------------------------
    def authenticate(self, req: ProxyRequest) -> None:
        gw = self.gw
        if gw.draining:
            raise ApiError(503, "the gateway is shutting down", kind="draining", retry_after=gw.cfg.retry_after_s)
        req.tenant = gw.tenants.authenticate(req.http.headers.get("authorization"))

    # 2 ------------------------------------------------------------------------------------------------
    async def parse(self, req: ProxyRequest) -> None:
        req.body = await self.gw.read_body(req.http)
        req.payload = parse_json(req.body)
        validate(req.endpoint, req.payload)
        self.gw.check_model(req.payload["model"])
        # P/D's handshake is the gateway's alone: a client's kv_transfer_params would make an engine pull
        # KV from a host the client names, or answer where its blocks are
        dropped = req.payload.pop("kv_transfer_params", None) is not None
        if req.tenant is not None:
            req.payload["cache_salt"] = req.tenant.salt  # engines and caches never share KV across tenants
        if dropped or req.tenant is not None:
            req.body = _json.encode(req.payload)
        req.ctx = self.context(req)

    def context(self, req: ProxyRequest) -> RequestContext:
        p, h = req.payload, req.http.headers
        return RequestContext(
            request_id=h.get("x-request-id") or uuid.uuid4().hex, model=p["model"], endpoint=req.endpoint,
            prompt_tokens_estimate=prompt_size_estimate(req.endpoint, p),
            max_tokens=p.get("max_tokens") or p.get("max_completion_tokens"),
            session_id=h.get(self.gw.cfg.session_header), tenant=req.tenant.name if req.tenant else None)

    # 3 ------------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def admitted(self, req: ProxyRequest) -> AsyncIterator[None]:
        """Hold the tenant's limits and a fair-queue slot while the request runs; on the way out, settle
        both with the tokens actually used (known once relayed)."""
        gw, t = self.gw, req.tenant
        req.cost = admission_cost(req.endpoint, req.payload)
        if t is not None:
            req.charged = req.cost
            gw.tenants.admit(t, req.charged)  # raises 429 before anything is queued
        try:
            await gw.admission.acquire(req.tenant_name, t.cfg.priority if t else 0, req.cost,
                                       req.route.prompt_tokens_estimate)
            try:
                yield
            finally:
                used = _used(req)
                gw.admission.release(req.tenant_name, (used - req.cost) if used is not None else 0)
        finally:
            if t is not None:
                gw.tenants.release(t, req.charged, _used(req))

    # 4 ------------------------------------------------------------------------------------------------
    async def tokenise(self, req: ProxyRequest) -> None:
        gw, ctx = self.gw, req.route
        if gw.tokens is None:  # the policy does not read tokens
            return
        salt = req.payload.get("cache_salt")  # the tenant's (parse set it), or the client's own without tenants
        spec = gw.policy.key_spec(salt if isinstance(salt, str) else None)
        bs, seed = spec if spec is not None else (None, 0)
        # tokenise once: a text completion goes to the engine as the ids computed here (whole, not lazily)
        p = req.payload
        ids_out = (gw.cfg.forward_token_ids and req.endpoint == "completions" and isinstance(p.get("prompt"), str)
                   and not p.get("echo") and gw.pool.token_ids_ok())
        held = gw.policy.holds if gw.cfg.lazy_tokenize and not ids_out else None
        t = await gw.tokens.tokens(req.endpoint, p, bs, seed, held)
        ctx.token_ids, ctx.block_keys, req.rest_keys = t.ids, t.keys, t.rest
        if t.total is not None:
            ctx.prompt_tokens_estimate = t.total
        if ids_out and t.ids and t.rest is None:
            p["prompt"] = t.ids
            req.body = _json.encode(p)

    # 5-7 ----------------------------------------------------------------------------------------------
    async def dispatch(self, req: ProxyRequest) -> web.StreamResponse:
        """Route and forward until one backend answers; each backend is tried at most once.  The first
        decode engine chosen may get the prompt prefilled elsewhere (5b); a retry keeps those KV parameters."""
        tried: set[str] = set()
        remote: bool | None = None  # not planned yet / prefilled remotely or not
        while True:
            d = self.route(req, tried)
            tried.add(d.backend.name)
            if remote is None:
                order.prioritise(self.gw, req, d)  # before P/D: both legs carry the engine priority
                try:
                    remote = await pd.prefill_stage(self.gw, req, d)
                except BaseException:  # e.g. the client left during the prefill leg: routed, never forwarded
                    self.gw.policy.on_finished(req.route, d, 0.0, 0)  # once per on_routed (the policy's ledger)
                    raise
            elif remote:
                pd.decode_retry(self.gw, d)
            resp = await self.forward(req, d)
            if resp is not None:
                return resp
            if len(tried) > self.gw.cfg.max_connect_retries:
                raise ApiError(502, f"could not reach backend(s) {', '.join(sorted(tried))}",
                               kind="upstream_connect")
            self.gw.metrics.retries.inc()

    # 5 ------------------------------------------------------------------------------------------------
    def route(self, req: ProxyRequest, tried: set[str]) -> Decision:
        gw, ctx = self.gw, req.route
        t0 = time.perf_counter()
        try:
            d = gw.policy.choose(ctx, decode_side(gw.pool.backends), frozenset(tried))  # P/D: never a prefill one
        except NoCandidate as e:
            if tried:
                raise ApiError(502, f"could not reach any backend for model {ctx.model!r} "
                                    f"(tried {', '.join(sorted(tried))})", kind="upstream_connect") from None
            raise ApiError(503, str(e), kind="no_backend", retry_after=gw.cfg.retry_after_s) from None
        gw.metrics.decision.observe(time.perf_counter() - t0)
        gw.metrics.routed.labels(d.backend.name, gw.policy.name).inc()
        gw.policy.on_routed(ctx, d)
        if ctx.token_ids and d.prefill_tokens is not None:
            gw.metrics.matched.observe((len(ctx.token_ids) - d.prefill_tokens) / len(ctx.token_ids))
        req.decision = d
        return d

    # 6 ------------------------------------------------------------------------------------------------
    async def forward(self, req: ProxyRequest, d: Decision) -> web.StreamResponse | None:
        """Send to the chosen backend and relay; None when it failed before the client saw anything
        (retryable).  Counts the prompt tokens it must prefill as pending until its first byte."""
        b = d.backend
        if not isinstance(b, Backend):  # the pool only holds Backends; keeps mypy honest
            raise TypeError(type(b))
        gw = self.gw
        prefill = d.prefill_tokens if d.prefill_tokens is not None else req.route.prompt_tokens_estimate
        done_before = b.prefilled_tokens
        b.pending_prefill_tokens += prefill
        probe = self._enter(b)

        def first_byte() -> None:
            nonlocal prefill
            b.breaker.succeeded()
            if prefill >= 0:
                # What b prefilled between this send and its first token, in whatever order the engine ran
                # it (an engine priority lets later short prompts overtake): the throughput sample's work.
                ahead, ttft = b.prefilled_tokens - done_before, time.perf_counter() - req.t_forward
                b.pending_prefill_tokens -= prefill
                b.prefilled_tokens += prefill
                if req.stream:
                    gw.pressure.observe(b.name, ahead + prefill, ttft)
                prefill = -1
                gw.policy.on_first_token(req.route, d, ttft, ahead)

        req.on_first = first_byte
        if req.rest_keys is not None:  # tokenised lazily: the whole key chain, off the request's path
            task = asyncio.create_task(self._more_keys(req, d, req.rest_keys), name="more-keys")
            self._background.add(task)  # a reference, until done: the loop keeps only weak ones
            task.add_done_callback(self._background.discard)
            req.rest_keys = None
        try:
            req.t_forward = time.perf_counter()
            gw.metrics.overhead.observe(req.t_forward - req.t_arrival)
            return await self.relay(req, b)
        finally:
            if prefill >= 0:
                b.pending_prefill_tokens -= prefill
            self._leave(b, probe)
            # decode time and tokens of a stream (SSE events less [DONE]); 0 tokens: nothing to learn from
            gw.policy.on_finished(req.route, d, time.perf_counter() - req.t_first if req.chunks else 0.0,
                                  max(req.chunks - 1, 0))

    async def _more_keys(self, req: ProxyRequest, d: Decision, rest: Callable[[], Sequence[int] | None]) -> None:
        gw = self.gw
        if gw.tokens is not None and (keys := await gw.tokens.complete(rest)) is not None:
            gw.policy.on_more_keys(req.route, d, keys)

    # 7 ------------------------------------------------------------------------------------------------
    async def relay(self, req: ProxyRequest, b: Backend) -> web.StreamResponse | None:
        gw = self.gw
        try:
            upstream, first = await self.open(req, b)
        except aiohttp.ClientConnectionResetError:
            # the request could not be written (a pooled keep-alive connection the engine had closed): the
            # engine is fine and never saw it — retry, and mark nothing (no breaker, not down, index kept)
            gw.metrics.errors.labels("upstream_reset").inc()
            return None
        except aiohttp.ConnectionTimeoutError:
            # no TCP connection in connect_timeout_s (a node gone, or SYNs dropped by an overloaded host):
            # retried; its breaker opens, but it is not marked down and its index entries stay
            self.bypass(b, "upstream_unreachable", f"no connection within {gw.cfg.connect_timeout_s:g}s")
            return None
        except CONNECT_ERRORS as e:
            self.bypass(b, "upstream_connect", f"connect failed: {type(e).__name__}")
            return None
        except FirstByteTimeout:
            # Nothing reached the client yet and the engine did nothing for a whole window: hung.  Bypass
            # it and retry.  (no early health check: a hung engine often still answers /health)
            self.bypass(b, "upstream_ttft_timeout", f"no first token within {gw.cfg.ttft_timeout_s:g}s and no "
                        "progress on any of its streams", poke=False)
            return None
        except EngineBusy:
            # Busy, not broken: no breaker, no retry (the other engines are as busy; a retry only adds load).
            gw.metrics.errors.labels("upstream_busy").inc()
            gw.pressure.shed["busy_timeout"] += 1
            raise ApiError(503, f"backend {b.name} is busy: no first token within {gw.cfg.busy_timeout_s:g}s "
                           "although it is making progress; retry later", kind="upstream_busy",
                           retry_after=gw.admission.retry_after()) from None
        except TimeoutError:
            gw.metrics.errors.labels("upstream_timeout").inc()
            raise ApiError(504, f"backend {b.name} did not answer in time") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            # Headers came, then the engine died before its first chunk: the client has seen nothing, retry.
            self.bypass(b, "upstream_broken", f"broken before the first chunk: {type(e).__name__}")
            return None
        b.progressed()
        async with upstream:
            if req.stream and upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                try:
                    resp = await relay_stream(req, upstream, b, gw.metrics, first)
                finally:  # also when the client hangs up mid-stream: what the engine did for it so far
                    req.used_tokens = req.route.prompt_tokens_estimate + max(req.chunks - 1, 0)
            else:
                try:
                    resp = await relay_whole(upstream, b, req)
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                    # The engine died while answering; the client has received nothing: retry.
                    self.bypass(b, "upstream_broken", f"connect failed mid-response: {type(e).__name__}")
                    return None
                b.progressed()
                if req.on_first is not None:
                    req.on_first()
        gw.metrics.e2e.labels(req.endpoint).observe(time.perf_counter() - req.t_arrival)
        for fn in gw.observers:  # the autoscaler's signals and hot prefixes
            fn(req)
        return resp

    async def open(self, req: ProxyRequest, b: Backend) -> tuple[aiohttp.ClientResponse, bytes]:
        """Response headers (and, for streams, the first chunk).  A stream waits in windows of
        ``ttft_timeout_s``: a window in which the engine made no progress at all (no chunk on any stream,
        no answer, no token counted) means it is hung → :class:`FirstByteTimeout`; one in which it made
        progress means busy → wait on, up to ``busy_timeout_s`` in all → :class:`EngineBusy`.  Either way
        the upstream request is closed first."""
        if not req.stream:
            return await open_upstream(self.gw.http, b, req), b""
        cfg = self.gw.cfg
        task = asyncio.ensure_future(self._first_chunk(req, b))
        try:
            return await wait_progressing(task, b, cfg.ttft_timeout_s, cfg.busy_timeout_s,
                                          self.gw.metrics.busy_waits.inc)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _first_chunk(self, req: ProxyRequest, b: Backend) -> tuple[aiohttp.ClientResponse, bytes]:
        upstream: aiohttp.ClientResponse | None = None
        try:
            upstream = await open_upstream(self.gw.http, b, req)
            first = b""
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                first = await upstream.content.readany()
            return upstream, first
        except BaseException:
            if upstream is not None:
                upstream.close()  # gave up on it (or it broke): vLLM aborts the request
            raise

    def bypass(self, b: Backend, kind: str, reason: str, poke: bool = True) -> None:
        """Take ``b`` out of rotation after a failure the client never saw (its breaker opens; a refused
        connection also marks it down until a health check passes); the caller retries elsewhere."""
        gw = self.gw
        gw.metrics.errors.labels(kind).inc()
        trips = b.breaker.trips
        b.breaker.failed(time.monotonic())
        if b.breaker.trips > trips:
            gw.metrics.breaker_trips.labels(b.name).inc()
        gw.log.warning("backend %s: %s; circuit open for %.1fs", b.name, reason, b.breaker.cooldown_s)
        if kind == "upstream_connect":
            gw.pool.set_health(b, False, reason)
        if poke:
            gw.pool.poke()

    def _enter(self, b: Backend) -> int:
        b.in_flight += 1
        self.active += 1
        self.idle.clear()
        return b.breaker.routed()

    def _leave(self, b: Backend, probe: int) -> None:
        b.breaker.probe_ended(probe)
        b.in_flight -= 1
        self.active -= 1
        if not self.active:
            self.idle.set()

    # /debug/route ------------------------------------------------------------------------------------
    async def explain(self, http: web.Request) -> dict[str, object]:
        """What the policy would do with a request (``GET ?prompt=&model=`` or a POSTed body), without
        sending anything: stages 2, 4 and 5 with the scorers' breakdown."""
        gw = self.gw
        models = sorted(gw.pool.known_models())
        req = ProxyRequest(http, "completions", time.perf_counter())
        if http.method == "POST":
            req.payload = parse_json(await gw.read_body(http))
            req.payload.setdefault("model", models[0] if models else "")
            req.endpoint = "chat" if "messages" in req.payload else "completions"
        else:
            q = http.query
            req.payload = {"model": q.get("model") or (models[0] if models else ""), "prompt": q.get("prompt", "")}
        validate(req.endpoint, req.payload)
        req.ctx = self.context(req)
        await self.tokenise(req)
        try:
            d = gw.policy.choose(req.route, decode_side(gw.pool.backends), explain=True)
        except NoCandidate as e:
            raise ApiError(503, str(e), kind="no_backend", retry_after=gw.cfg.retry_after_s) from None
        spec = gw.policy.key_spec(None)
        return {"policy": gw.policy.name, "chosen": d.backend.name,
                "prompt_tokens": req.route.prompt_tokens_estimate if req.route.token_ids is not None else None,
                "block_size": spec[0] if spec else None, "blocks": len(d.block_keys or []),
                "candidates": d.explain or [{"backend": b.name, "healthy": b.healthy, "in_flight": b.in_flight}
                                            for b in gw.pool.backends]}
