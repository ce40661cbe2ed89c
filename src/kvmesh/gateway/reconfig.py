"""Live reconfiguration of a running gateway (``POST /admin/reload``, SIGHUP under ``kvmesh up``).

What can change without a restart is applied in place, on the gateway's event loop, without touching open
connections: limits and timeouts read per request, the admission queue's bounds, the health-check
interval, the tenants file, and the static backend list (new backends join the pool; removed ones take no
new requests, and requests already on them finish).  Fields that shape long-lived objects (listen address,
routing policy and its tokenizer and index, the upstream connection pool's timeouts, the discovery source
and its EndpointSlice selection) are reported as
needing a restart and keep their running values.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from kvmesh.config import GatewayConfig
from kvmesh.gateway.tenants import Tenants, load_tenants

if TYPE_CHECKING:
    from kvmesh.gateway.app import Gateway

# discovery/kubernetes: the EndpointSlice watch is started once, with the gateway (a static list reloads below)
RESTART_FIELDS = ("host", "port", "policy", "tokenizer", "routing", "debug_endpoints", "connect_timeout_s",
                  "read_timeout_s", "cache_nodes", "discovery", "kubernetes")


def reconfigure(gw: Gateway, new: GatewayConfig) -> dict[str, Any]:
    """Apply ``new`` to ``gw``; returns what changed and what needs a restart.  Raises ``ValueError`` (and
    changes nothing) when the new tenants file is invalid."""
    old = gw.cfg
    # values the stack derives when the file leaves them unset (the model's tokenizer, its cache node)
    derived = {f: getattr(old, f) for f in ("tokenizer", "cache_nodes") if not getattr(new, f)}
    new = new.model_copy(update=derived)
    needs_restart = [f for f in RESTART_FIELDS if getattr(new, f) != getattr(old, f)]
    if old.port == 0 and "port" in needs_restart:  # an ephemeral port (tests) is not a change
        needs_restart.remove("port")
    merged = new.model_copy(update={f: getattr(old, f) for f in needs_restart} | {"port": old.port})
    changed = [f for f in GatewayConfig.model_fields if getattr(merged, f) != getattr(old, f)]
    if "tenants_file" in changed:
        path = pathlib.Path(merged.tenants_file) if merged.tenants_file else None
        gw.tenants = Tenants(load_tenants(path)).keep_live_state(gw.tenants)  # ValueError: before anything applies
    gw.cfg = merged
    adm = gw.admission
    adm.max_queue, adm.queue_timeout_s = merged.max_queue, merged.queue_timeout_s
    adm.retry_after_s, adm.reserve = merged.retry_after_s, merged.admission_reserve
    gw.pool.interval_s = merged.health_interval_s
    added, removed = _sync_backends(gw, merged)
    adm.pump()  # a larger capacity admits waiters now
    return {"changed": changed, "needs_restart": needs_restart, "backends_added": added,
            "backends_removed": removed}


def _sync_backends(gw: Gateway, cfg: GatewayConfig) -> tuple[list[str], list[str]]:
    want = {(s.name or f"backend-{i}"): s for i, s in enumerate(cfg.backends)}
    have = {b.name: b for b in gw.pool.backends}
    if not cfg.backends:  # backends come from the supervisor (kvmesh up): not the config's to change
        return [], []
    added = [n for n in want if n not in have]
    removed = [n for n in have if n not in want]
    for n in removed:
        gw.pool.backends.remove(have[n])  # in-flight requests keep their Backend object and finish
        gw.metrics.forget_backend(n, gw.policy.name)
    for n in added:
        s = want[n]
        gw.subscribe(gw.pool.add(n, s.url, s.kv_events, s.replay, s.role))
    return added, removed
