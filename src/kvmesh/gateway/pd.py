"""The request path's P/D stage: prefill a prompt on a prefill-role engine, then decode it elsewhere.

It runs once per request, after the decode engine was routed (decode-first; see
:mod:`kvmesh.routing.disagg` for the decision) and before the request is forwarded to it.  It speaks vLLM's
disaggregation handshake, the one AIBrix, llm-d and production-stack use with vLLM's ``NixlConnector`` (and
kvmesh's own ``KvmeshConnector``):

1. the **prefill leg**: the client's request, with ``max_tokens = 1`` (and ``max_completion_tokens = 1`` for
   chat), ``stream = false``, no ``stream_options``, and ``kv_transfer_params`` = :data:`PREFILL_PARAMS`
   (``do_remote_decode``: keep the KV for a decode engine to pull), goes to the prefill engine; its JSON
   answer carries ``kv_transfer_params`` saying where the blocks are;
2. the **decode leg**: the original request (stream or not) with those ``kv_transfer_params`` goes to the
   decode engine, which loads the prompt's KV instead of computing it; the answer is relayed as usual.

Failures never reach the client: a prefill engine that refuses the connection, stays silent and makes no
progress for ``[gateway.pd] prefill_timeout_s`` (a busy one is waited on, see :func:`_post`), answers an
error status or no ``kv_transfer_params`` leaves the request as it was, so the decode engine prefills
itself (``kvmesh_pd_fallbacks_total{reason}``).  A decode engine that fails before its first byte is
replaced by another one with the same parameters (the blocks stay where the prefill engine put them).  A
client that hangs up cancels the handler, which closes whichever leg is open (vLLM aborts a request whose
connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from kvmesh.gateway.backends import Backend, EngineBusy, FirstByteTimeout, wait_progressing
from kvmesh.gateway.proxy import CONNECT_ERRORS
from kvmesh.gateway.request import ProxyRequest
from kvmesh.routing import Decision
from kvmesh.routing.disagg import PdConfig, PrefillPlan, decide, is_disaggregated

if TYPE_CHECKING:
    from kvmesh.config import PdSettings
    from kvmesh.gateway.app import Gateway

log = logging.getLogger(__name__)

# What a prefill engine is told: compute the prompt, keep its KV for a remote decode; the rest is unknown yet.
PREFILL_PARAMS: dict[str, Any] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                  "remote_block_ids": None, "remote_host": None, "remote_port": None}

_json = msgspec.json.Encoder()
_answer = msgspec.json.Decoder(dict)


class PrefillFailed(Exception):
    """The prefill leg gave no usable ``kv_transfer_params``; ``reason`` labels the fallback."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def plan_config(s: PdSettings) -> PdConfig:
    return PdConfig(**s.model_dump())


def prefill_payload(endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg's body: the client's request cut to one token, whole (not streamed), keeping its KV."""
    body = {k: v for k, v in payload.items() if k != "stream_options"}
    body["max_tokens"] = 1
    if endpoint == "chat":
        body["max_completion_tokens"] = 1
    body["stream"] = False
    body["kv_transfer_params"] = dict(PREFILL_PARAMS)
    return body


async def prefill_stage(gw: Gateway, req: ProxyRequest, d: Decision) -> bool:
    """Prefill ``req`` remotely for its decode engine ``d.backend`` when that pays; True when it did (then
    ``req.body`` carries the ``kv_transfer_params`` the decode engine loads with).  Never raises for a
    failed prefill: the request then goes to the decode engine unchanged."""
    cfg = plan_config(gw.cfg.pd)
    if not is_disaggregated(gw.pool.backends, cfg.dynamic):
        return False
    plan = plan_for(gw, req, d, cfg)
    if not plan.remote or plan.engine is None:
        gw.metrics.pd_local.labels(plan.reason).inc()
        return False
    b = gw.pool.get(plan.engine)
    if b is None:  # removed by a reload between the plan and now
        gw.metrics.pd_local.labels("no_prefill_engine").inc()
        return False
    try:
        params = await prefill_leg(gw, req, b, cfg.prefill_timeout_s)
    except PrefillFailed as e:
        gw.metrics.pd_fallbacks.labels(e.reason).inc()
        log.warning("remote prefill on %s failed (%s): %s; %s prefills itself", b.name, e.reason, e,
                    d.backend.name)
        return False
    gw.metrics.pd_remote.inc()
    req.body = _json.encode({**req.payload, "kv_transfer_params": params})
    d.prefill_tokens = 0  # the decode engine loads the prompt: nothing to prefill in its queue
    return True


def decode_retry(gw: Gateway, d: Decision) -> None:
    """Another decode engine takes a remotely prefilled request (same parameters: it loads the same blocks)."""
    gw.metrics.pd_fallbacks.labels("decode_retry").inc()
    d.prefill_tokens = 0


def plan_for(gw: Gateway, req: ProxyRequest, d: Decision, cfg: PdConfig) -> PrefillPlan:
    """The decision over the live pool: :func:`kvmesh.routing.disagg.decide`, the ranking and cost rule the
    simulator uses too (the engines' running counts come from their scraped metrics)."""
    return decide(gw.policy, req.route, d, gw.pool.backends, cfg, gw.cfg.routing.prefill_tps)


async def prefill_leg(gw: Gateway, req: ProxyRequest, b: Backend, timeout_s: float) -> dict[str, Any]:
    """Send the prefill leg to ``b`` and return the ``kv_transfer_params`` it answered (PrefillFailed else).
    Counted as ``b``'s load while it runs; its breaker learns from it like any request's."""
    ctx = dataclasses.replace(req.route, session_id=None)  # the session's turns live on its decode engine
    d = Decision(b, policy=gw.policy.name, prefill_tokens=ctx.prompt_tokens_estimate, block_keys=ctx.block_keys)
    gw.policy.on_routed(ctx, d)  # the prefill engine will hold the prompt's blocks (kv-aware index)
    queued = b.pending_prefill_tokens
    b.pending_prefill_tokens += ctx.prompt_tokens_estimate
    b.in_flight += 1
    probe = b.breaker.routed()
    t0 = time.perf_counter()
    try:
        status, raw = await _post(gw, req, b, timeout_s)
    except BaseException:
        b.breaker.probe_ended(probe)  # a busy or cancelled leg neither closes nor reopens it
        raise
    finally:
        b.pending_prefill_tokens -= ctx.prompt_tokens_estimate
        b.in_flight -= 1
        gw.policy.on_finished(ctx, d, 0.0, 0)
    elapsed = time.perf_counter() - t0
    if status >= 500:
        gw.path.bypass(b, "pd_prefill_status", f"prefill leg answered {status}", poke=False)
    else:
        b.breaker.succeeded()
    if status != 200:
        raise PrefillFailed("prefill_status", f"status {status}: {raw[:200]!r}")
    try:
        params = _answer.decode(raw).get("kv_transfer_params")
    except msgspec.DecodeError:
        params = None
    if not isinstance(params, dict):
        raise PrefillFailed("prefill_no_params", "the answer carries no kv_transfer_params")
    gw.policy.on_first_token(ctx, d, elapsed, queued)
    gw.metrics.pd_transfer.observe(elapsed)
    blocks = params.get("remote_block_ids")
    if isinstance(blocks, list):
        gw.metrics.pd_transfer_blocks.inc(len(blocks))
    return params


async def _post(gw: Gateway, req: ProxyRequest, b: Backend, timeout_s: float) -> tuple[int, bytes]:
    """(status, body) of the prefill leg; PrefillFailed on connect errors, a broken answer or silence.

    The leg waits in windows of ``timeout_s``, as a stream waits for its first token (the same
    :func:`~kvmesh.gateway.backends.wait_progressing`): a window in which the prefill engine made no progress at all
    (its token counters and queue still) means it is hung → its breaker opens, ``prefill_timeout``; one in which it
    made progress means busy → wait on, up to the gateway's ``busy_timeout_s`` in all, then ``prefill_busy`` without
    a breaker trip. Giving up on a busy engine throws its work away and hands the same prompt to an engine that is
    no less loaded — the amplification that turned an overloaded 1P+1D fleet's prefill engine idle while its decode
    engine drowned."""
    headers = {"content-type": "application/json", "x-request-id": f"{req.route.request_id}-prefill"}
    if "authorization" in req.http.headers:
        headers["authorization"] = req.http.headers["authorization"]
    body = _json.encode(prefill_payload(req.endpoint, req.payload))

    async def leg() -> tuple[int, bytes]:
        async with gw.http.post(f"{b.url}{req.path}", data=body, headers=headers) as r:
            return r.status, await r.read()

    task = asyncio.ensure_future(leg())
    try:
        return await wait_progressing(task, b, timeout_s, gw.cfg.busy_timeout_s, gw.metrics.busy_waits.inc)
    except FirstByteTimeout:
        # a hung prefill engine: its breaker opens, so the next long prompts go elsewhere or stay local
        gw.path.bypass(b, "pd_prefill_timeout", f"prefill leg: no answer within {timeout_s:g}s and no "
                       "progress on the engine", poke=False)
        raise PrefillFailed("prefill_timeout", f"no answer within {timeout_s:g}s, no progress") from None
    except EngineBusy:
        raise PrefillFailed("prefill_busy", f"busy: no answer within {gw.cfg.busy_timeout_s:g}s") from None
    except aiohttp.ClientConnectionResetError:  # a stale pooled connection: nothing wrong with the engine
        raise PrefillFailed("prefill_connect", "connection reset before the request was sent") from None
    except aiohttp.ConnectionTimeoutError:  # no connection in time: its breaker opens, not marked down
        gw.path.bypass(b, "upstream_unreachable", "prefill leg: no connection in time")
        raise PrefillFailed("prefill_connect", "ConnectionTimeoutError") from None
    except CONNECT_ERRORS as e:
        gw.path.bypass(b, "upstream_connect", f"prefill leg: connect failed: {type(e).__name__}")
        raise PrefillFailed("prefill_connect", type(e).__name__) from None
    except aiohttp.ClientError as e:
        gw.path.bypass(b, "pd_prefill_broken", f"prefill leg broke: {type(e).__name__}")
        raise PrefillFailed("prefill_broken", type(e).__name__) from None
    finally:
        if not task.done():
            task.cancel()  # the connection closes: vLLM aborts the prefill
            with contextlib.suppress(asyncio.CancelledError):
                await task
