"""The engines' queue order under saturation: uncached work first, aged (``[gateway] queue_order``).

Routing decides *where* a request's prefill runs; when the fleet is saturated, *when* it runs matters as
much.  An engine serving its waiting queue first-come-first-served makes a follow-up turn whose prompt is
95 % cached wait behind every 2,000-token first turn that arrived before it, although it needs a few
milliseconds of compute.  Serving the least remaining work first minimises mean waiting time (the
shortest-processing-time rule); SGLang's longest-prefix-match schedule is the engine-local form of the same
idea.  The gateway is where both inputs are known — the uncached tokens of the chosen engine (the router's
own prefix match) and that engine's learned prefill throughput — so it ranks each request and passes the
rank as vLLM's request ``priority`` (lower runs earlier; engines must run with
``--scheduling-policy priority``, which ``kvmesh up`` adds when this is on):

    priority = arrival_ms + aging × expected prefill ms,   expected prefill = uncached tokens / tokens/s

A request can therefore be overtaken only by requests arriving later whose own expected prefill is shorter
by ``(later arrival) / aging``: ``aging = 0`` is FCFS, a large one is shortest-job-first.  The bound is
what keeps long prompts from starving: one of expected prefill ``p`` waits at most for the work that
arrives within ``aging × p`` after it and is shorter.  When nothing queues, the order changes nothing.

The throughput is the replica's, as :class:`~kvmesh.gateway.pressure.Pressure` learned it from first
tokens (the fleet mean for one not measured yet, ``routing.prefill_tps`` before any was); reordering makes
that estimate noisy, which only scales the aging, never the order of equal-arrival requests.
Runs on the gateway's event loop only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from kvmesh.gateway.app import Gateway
    from kvmesh.gateway.request import ProxyRequest
    from kvmesh.routing import Decision

_json = msgspec.json.Encoder()
_EPOCH = time.perf_counter()  # priorities count from here: small ints, monotonic within the process


def rank(arrival_s: float, uncached_tokens: int, tps: float, aging: float) -> int:
    """The engine priority (ms) of a request that arrived at ``arrival_s`` (perf_counter seconds)."""
    return round(((arrival_s - _EPOCH) + aging * uncached_tokens / max(tps, 1e-9)) * 1000.0)


def prioritise(gw: Gateway, req: ProxyRequest, d: Decision) -> None:
    """Give ``req`` its engine priority for backend ``d.backend`` (no-op unless ``queue_order`` is
    ``uncached-first``).  Rewrites the body the engine receives; the client's own ``priority`` is replaced."""
    if gw.cfg.queue_order != "uncached-first":
        return
    uncached = d.prefill_tokens if d.prefill_tokens is not None else req.route.prompt_tokens_estimate
    tps = gw.pressure.replica_tps(d.backend.name) or gw.cfg.routing.prefill_tps  # nothing learned yet: configured
    req.priority = rank(req.t_arrival, uncached, tps, gw.cfg.order_aging)
    req.payload["priority"] = req.priority
    req.body = _json.encode(req.payload)
