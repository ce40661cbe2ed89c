"""The one object a client request is, from arrival to the last relayed byte.

Every stage of the request path (:mod:`kvmesh.gateway.path`) reads it and fills in its own part, in
order: the tenant (auth), the validated body (parse), the admission charge (admit), the routing view with
token ids and block keys (tokenise), the decision (route), and the timings and token usage (forward,
relay).  Nothing about a request lives anywhere else, so a stage added later — prefill on another engine
before the decode engine is sent the request — reads what it needs here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kvmesh.gateway.tenants import Tenant
from kvmesh.routing import Decision, RequestContext

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True)
class ProxyRequest:
    """One proxied request.  Times are ``time.perf_counter()`` seconds."""

    http: web.Request                    # the client's request (headers, connection)
    endpoint: str                        # "completions" | "chat"
    t_arrival: float
    payload: dict[str, Any] = field(default_factory=dict)  # the validated JSON body
    body: bytes = b""                    # what is sent upstream (re-encoded when the gateway adds fields)
    tenant: Tenant | None = None         # None: the gateway runs without tenants
    charged: int = 0                     # tokens charged against the tenant's limits on admission
    cost: int = 0                        # tokens the fair queue charges the tenant up front
    ctx: RequestContext | None = None    # what the routing policy may know (set by the parse stage)
    decision: Decision | None = None     # the latest routing decision (one per attempt)
    t_forward: float = 0.0               # when the request was sent upstream (last attempt)
    t_first: float = 0.0                 # first byte relayed to the client
    chunks: int = 0                      # SSE events relayed
    used_tokens: int | None = None       # prompt + completion tokens, as the engine reported or we counted
    answered: bool = False               # an answer (of any status) was relayed; False: an error of the gateway's
    priority: int | None = None          # the engine priority kvmesh.gateway.order gave it (None: none)
    on_first: Callable[[], None] | None = None  # called once when the backend's first byte arrives
    rest_keys: Callable[[], Sequence[int] | None] | None = None  # tokenised lazily: computes the whole key chain

    @property
    def stream(self) -> bool:
        return bool(self.payload.get("stream"))

    @property
    def tenant_name(self) -> str:
        return self.tenant.name if self.tenant is not None else "default"

    @property
    def path(self) -> str:
        """The engine's URL path for this endpoint."""
        return PATHS[self.endpoint]

    @property
    def route(self) -> RequestContext:
        """The routing view; the parse stage sets it before any stage that routes."""
        if self.ctx is None:
            raise RuntimeError("request not parsed yet")  # a bug in the path's order, not bad input
        return self.ctx
