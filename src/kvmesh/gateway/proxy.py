"""Forwarding one request to a backend and relaying the answer.

Streams are relayed chunk by chunk as they arrive (never buffered).  A connect failure before anything
reached the client is retried on another backend; once the client has received bytes, an upstream failure
ends the stream with an SSE error event.  If the client goes away, the upstream request is closed, which
makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
from aiohttp import web

from kvmesh.api.errors import ApiError
from kvmesh.gateway.backends import Backend
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.request import ProxyRequest

log = logging.getLogger(__name__)

# Errors that mean the request never reached a live engine: safe to send elsewhere.
# ConnectionTimeoutError: no TCP connection within connect_timeout_s (an address that blackholes SYNs: a
# node gone) — a TimeoutError too, which read as a slow answer (504, no retry).  ClientConnectionResetError:
# the request could not be written (a pooled keep-alive connection the engine had closed).
CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                  aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectionResetError)
_PASS_HEADERS = ("authorization", "x-request-id")


async def open_upstream(http: aiohttp.ClientSession, b: Backend, req: ProxyRequest) -> aiohttp.ClientResponse:
    """Send the request and return once response headers arrived; raises one of ``CONNECT_ERRORS``."""
    headers = {"content-type": "application/json"}
    for h in _PASS_HEADERS:
        if h in req.http.headers:
            headers[h] = req.http.headers[h]
    return await http.post(f"{b.url}{req.path}", data=req.body, headers=headers)


def _response_headers(b: Backend, upstream: aiohttp.ClientResponse,
                      req: ProxyRequest | None = None) -> dict[str, str]:
    h = {"x-kvmesh-backend": b.name, "Content-Type": upstream.headers.get("Content-Type", "application/json")}
    if req is not None and req.priority is not None:
        h["x-kvmesh-priority"] = str(req.priority)  # what kvmesh.gateway.order ranked it: debuggable
    return h


_usage = msgspec.json.Decoder(dict)


async def relay_whole(upstream: aiohttp.ClientResponse, b: Backend, req: ProxyRequest | None = None) -> web.Response:
    body = await upstream.read()
    if upstream.status >= 400 and not upstream.headers.get("Content-Type", "").startswith("application/json"):
        # keep the engine's status, but in the OpenAI error shape clients parse
        text = body[:300].decode("utf-8", "replace").strip()
        return ApiError(upstream.status, f"backend {b.name} answered {upstream.status}: {text}",
                        kind="upstream_error").response()
    if req is not None and upstream.status == 200:
        try:
            req.used_tokens = int(_usage.decode(body).get("usage", {}).get("total_tokens"))
        except (msgspec.DecodeError, TypeError, ValueError, AttributeError):
            pass
    return web.Response(status=upstream.status, body=body, headers=_response_headers(b, upstream, req))


async def _chunks(first: bytes, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in upstream.content.iter_any():
        yield chunk


async def relay_stream(req: ProxyRequest, upstream: aiohttp.ClientResponse, b: Backend,
                       metrics: GatewayMetrics, first: bytes = b"") -> web.StreamResponse:
    """Relay an SSE stream whose ``first`` chunk was already read; returns the (finished) response.  Raises
    CancelledError on client disconnect after closing the upstream connection."""
    headers = _response_headers(b, upstream, req)
    headers["Cache-Control"] = "no-cache"
    resp = web.StreamResponse(status=upstream.status, headers=headers)
    await resp.prepare(req.http)
    try:
        async for chunk in _chunks(first, upstream):
            if not req.chunks:
                req.t_first = time.perf_counter()
                metrics.ttft.labels(req.endpoint).observe(req.t_first - req.t_arrival)
                if req.on_first is not None:
                    req.on_first()
            req.chunks += chunk.count(b"data: ")
            b.progressed()  # busy, not hung: other streams' first-token waits read this
            await resp.write(chunk)
    except (ConnectionResetError, asyncio.CancelledError):
        # The client went away: dropping the upstream connection makes the engine abort the request.
        upstream.close()
        metrics.errors.labels("client_cancel").inc()
        raise asyncio.CancelledError from None
    except (aiohttp.ClientError, TimeoutError) as e:
        upstream.close()
        metrics.errors.labels("upstream_midstream").inc()
        log.warning("stream from %s broke after %d events: %s", b.name, req.chunks, e)
        err = ApiError(502, f"upstream {b.name} failed mid-stream: {type(e).__name__}")
        try:
            await resp.write(err.sse())
        except ConnectionResetError:
            pass
    if req.chunks > 2:
        # minus the final "[DONE]" event; one event per token is vLLM's streaming granularity
        metrics.tpot.labels(req.endpoint).observe((time.perf_counter() - req.t_first) / (req.chunks - 2))
    await resp.write_eof()
    return resp
