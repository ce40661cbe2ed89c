"""kvmesh's Grafana dashboards, generated from code: fleet overview, routing and cache, tenants, engines.

Contract: :func:`dashboards` returns each dashboard as a plain dict (Grafana's JSON model, schemaVersion 39);
``deploy/grafana/*.json`` and the Helm chart's ``dashboards/`` hold exactly :func:`render` of them
(``tests/test_observability.py`` checks both, and evaluates every panel query against a real Prometheus
scraping a live stack).  Regenerate with ``python -m kvmesh.observability.generate``.

Plain dicts rather than ``grafanalib`` or ``grafana-foundation-sdk``: four dashboards of time series need
a dozen lines of builder here, the JSON is what Grafana imports and what the test reads the queries back
from, and kvmesh gains no dependency pinned to one Grafana release.

Queries name metrics only (no kvmesh import): the names are the exporters' (``kvmesh.gateway.metrics``,
``kvmesh.index.subscriber``, ``kvmesh.cache.metrics``, ``kvmesh.routing.kv_aware``) and vLLM's own.  Scrape
jobs are expected to be named as in ``deploy/prometheus/prometheus.yml`` (``JOBS``); dashboards select by
metric name and template variable, not by job, so any job naming works for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

Obj = dict[str, Any]

JOBS = {"gateway": "kvmesh-gateway", "engine": "kvmesh-engine", "cache": "kvmesh-cache"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_W, _H = 8, 8  # panel size on Grafana's 24-column grid: three per row

# selectors the queries share (template variables; "All" is ".*")
B = 'backend=~"$backend"'
T = 'tenant=~"$tenant"'
N = 'instance=~"$node"'
M = 'model_name=~"$model"'
RI = "$__rate_interval"


def _quantiles(metric: str, sel: str = "", by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend = f"p{{q}}{' {{' + by + '}}' if by else ''}"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
             legend.format(q=int(q * 100))) for q in (0.5, 0.9, 0.99)]


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          description: str = "") -> Obj:
    """One panel; ``targets`` are (PromQL, legend) pairs.  Grid position is set by :func:`dashboard`."""
    p: Obj = {"type": kind, "title": title, "datasource": DATASOURCE,
              "targets": [{"refId": chr(ord("A") + i), "expr": e, "legendFormat": leg, "datasource": DATASOURCE}
                          for i, (e, leg) in enumerate(targets)],
              "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}
    if description:
        p["description"] = description
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"}
    return p


def row(title: str) -> Obj:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def variable(name: str, query: str, label: str) -> Obj:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
            "allValue": ".*", "multi": True, "current": {"text": "All", "value": "$__all"}, "sort": 1}


VARIABLES = [
    {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
    variable("model", "label_values(vllm:num_requests_running, model_name)", "model"),
    variable("backend", "label_values(kvmesh_gateway_backend_healthy, backend)", "backend"),
    variable("tenant", "label_values(kvmesh_gateway_tenant_requests_total, tenant)", "tenant"),
    variable("node", "label_values(kvmesh_cache_objects, instance)", "cache node"),
]


def dashboard(uid: str, title: str, items: list[Obj], description: str) -> Obj:
    """Lay ``items`` (rows and panels) out three panels to a row, top to bottom."""
    panels, x, y = [], 0, 0
    for i, it in enumerate(items):
        if it["type"] == "row":
            y += _H if x else 0
            x = 0
            panels.append({**it, "id": i + 1, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}})
            y += 1
            continue
        panels.append({**it, "id": i + 1, "gridPos": {"x": x, "y": y, "w": _W, "h": _H}})
        x = (x + _W) % 24
        y += _H if x == 0 else 0
    return {"uid": uid, "title": title, "description": description, "tags": ["kvmesh"], "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "timezone": "browser",
            "time": {"from": "now-1h", "to": "now"}, "templating": {"list": VARIABLES},
            "annotations": {"list": []}, "links": [{"type": "dashboards", "tags": ["kvmesh"], "asDropdown": True,
                                                     "title": "kvmesh"}],
            "panels": panels}


def overview() -> Obj:
    req = "kvmesh_gateway_requests_total"
    return dashboard("kvmesh-overview", "kvmesh / Fleet overview", [
        row("Traffic"),
        panel("Requests / s by status", [(f"sum by (status) (rate({req}[{RI}]))", "{{status}}")], "reqps"),
        panel("Error ratio (5xx)", [(f'(sum(rate({req}{{status=~"5.."}}[{RI}])) or vector(0)) / '
                                     f"clamp_min(sum(rate({req}[{RI}])), 1e-9)", "5xx / all")], "percentunit"),
        panel("Errors / s by kind", [(f"sum by (kind) (rate(kvmesh_gateway_errors_total[{RI}]))", "{{kind}}")],
              "reqps"),
        row("Latency (as clients see it through the gateway)"),
        panel("TTFT", _quantiles("kvmesh_gateway_ttft_seconds"), "s"),
        panel("TPOT", _quantiles("kvmesh_gateway_tpot_seconds"), "s"),
        panel("End to end", _quantiles("kvmesh_gateway_e2e_seconds"), "s"),
        panel("Gateway overhead (before forwarding)", _quantiles("kvmesh_gateway_overhead_seconds"), "s",
              description="read, parse, validate, tokenise, route: what kvmesh adds to TTFT"),
        panel("Routing decision time", _quantiles("kvmesh_routing_decision_seconds"), "s"),
        panel("Retries / s", [(f"sum(rate(kvmesh_gateway_retries_total[{RI}]))", "re-sent")], "reqps"),
        row("Queue, admission and backends"),
        panel("Admission queue depth", [("sum by (instance) (kvmesh_gateway_queue_depth)", "{{instance}}")]),
        panel("In flight per backend", [(f"sum by (backend) (kvmesh_gateway_backend_in_flight{{{B}}})",
                                         "{{backend}}")]),
        panel("Routed / s per backend", [(f"sum by (backend) (rate(kvmesh_gateway_routed_total{{{B}}}[{RI}]))",
                                          "{{backend}}")], "reqps"),
        panel("Backend healthy (in rotation)", [(f"min by (backend) (kvmesh_gateway_backend_healthy{{{B}}})",
                                                 "{{backend}}")], kind="stat"),
        panel("Breaker open", [(f"max by (backend) (kvmesh_gateway_breaker_open{{{B}}})", "{{backend}}")],
              kind="stat", description="1 while the circuit breaker keeps the backend out of rotation"),
        panel("Engine KV-cache usage", [(f"max by (instance) (vllm:kv_cache_usage_perc{{{M}}})", "{{instance}}")],
              "percentunit"),
    ], "Requests, latency percentiles, gateway overhead, queue and per-backend load and health.")


def routing_cache() -> Obj:
    hits = "kvmesh_cache_hits_total"
    return dashboard("kvmesh-routing-cache", "kvmesh / Routing and cache", [
        row("Routing"),
        panel("Prompt fraction cached on the chosen backend", _quantiles("kvmesh_routing_cached_fraction"),
              "percentunit"),
        panel("Mean cached fraction", [("sum(rate(kvmesh_routing_cached_fraction_sum[$__rate_interval])) / "
                                        "clamp_min(sum(rate(kvmesh_routing_cached_fraction_count"
                                        "[$__rate_interval])), 1e-9)", "mean")], "percentunit"),
        panel("Tokenise time", _quantiles("kvmesh_gateway_tokenize_seconds"), "s"),
        row("KV index"),
        panel("Index blocks per engine and tier", [("sum by (engine, medium) (kvmesh_index_blocks)",
                                                    "{{engine}} {{medium}}")]),
        panel("Index keys / pending", [("sum(kvmesh_index_keys)", "keys"),
                                       ("sum(kvmesh_index_pending_blocks)", "pending")]),
        panel("Event lag", _quantiles("kvmesh_index_event_lag_seconds"), "s"),
        panel("Event batches / s per engine", [(f"sum by (engine) (rate(kvmesh_index_event_batches_total[{RI}]))",
                                                "{{engine}}")], "ops"),
        panel("Sequence gaps and restarts", [("sum by (engine, action) (increase(kvmesh_index_gaps_total[1h]))",
                                              "{{engine}} {{action}}")],
              description="dropped / replay_failed mean the index lost events; restart: the engine restarted"),
        row("Cache nodes"),
        panel("Hit rate by tier", [(f"sum by (tier) (rate({hits}{{{N}}}[{RI}])) / ignoring(tier) group_left "
                                    f"clamp_min(sum(rate({hits}{{{N}}}[{RI}])) + sum(rate(kvmesh_cache_misses_total"
                                    f"{{{N}}}[{RI}])), 1e-9)", "{{tier}}")], "percentunit"),
        panel("Tier usage", [(f"sum by (instance, tier) (kvmesh_cache_used_bytes{{{N}}}) / sum by (instance, tier) "
                              f"(kvmesh_cache_capacity_bytes{{{N}}} > 0)", "{{instance}} {{tier}}")],
              "percentunit"),
        panel("Objects by tier", [(f"sum by (instance, tier) (kvmesh_cache_objects{{{N}}})",
                                   "{{instance}} {{tier}}")]),
        panel("Evictions / s by tier", [(f"sum by (tier) (rate(kvmesh_cache_evictions_total{{{N}}}[{RI}]))",
                                         "{{tier}}")], "ops"),
        panel("Checksum failures", [(f"sum by (instance, tier) (increase(kvmesh_cache_checksum_failures_total"
                                     f"{{{N}}}[1h]))", "{{instance}} {{tier}}")],
              description="objects dropped because their bytes did not match their checksum"),
        panel("Pool reads", [(f"sum(rate(kvmesh_cache_pool_direct_reads_total{{{N}}}[{RI}]))", "direct (engine)"),
                             (f"sum(rate(kvmesh_cache_pool_misses_total{{{N}}}[{RI}]))", "no owner had it")], "ops"),
        panel("Chunk read time", _quantiles("kvmesh_cache_get_seconds", N, "tier"), "s"),
    ], "KV-aware routing, the KV index fed by engine events, and the cache nodes' tiers.")


def tenants() -> Obj:
    tr = "kvmesh_gateway_tenant_requests_total"
    return dashboard("kvmesh-tenants", "kvmesh / Tenants", [
        row("Tenants"),
        panel("Requests / min by tenant vs limit", [
            (f"sum by (tenant) (rate({tr}{{{T}}}[{RI}])) * 60", "{{tenant}}"),
            (f'max by (tenant) (kvmesh_gateway_tenant_limit{{{T}, limit="requests_per_min"}})', "{{tenant}} limit")],
              "reqpm"),
        panel("Throttled (429) / s by tenant", [(f'sum by (tenant) (rate({tr}{{{T}, status="429"}}[{RI}]))',
                                                 "{{tenant}}")], "reqps"),
        panel("In flight vs max concurrent", [
            (f"sum by (tenant) (kvmesh_gateway_tenant_in_flight{{{T}}})", "{{tenant}}"),
            (f'max by (tenant) (kvmesh_gateway_tenant_limit{{{T}, limit="max_concurrent"}})', "{{tenant}} limit")]),
        panel("Status mix by tenant", [(f"sum by (tenant, status) (rate({tr}{{{T}}}[{RI}]))",
                                        "{{tenant}} {{status}}")], "reqps"),
    ], "Per-tenant traffic, throttling and limits (tenants come from the gateway's tenants file).")


def engines() -> Obj:
    def by_engine(metric: str) -> list[tuple[str, str]]:
        return [(f"sum by (instance) ({metric}{{{M}}})", "{{instance}}")]

    return dashboard("kvmesh-engines", "kvmesh / Engines (vLLM)", [
        row("Scheduler"),
        panel("Running requests", by_engine("vllm:num_requests_running")),
        panel("Waiting requests", by_engine("vllm:num_requests_waiting")),
        panel("KV-cache usage", by_engine("vllm:kv_cache_usage_perc"), "percentunit"),
        row("Prefix cache and tokens"),
        panel("Prefix-cache hit rate", [(f"sum by (instance) (rate(vllm:prefix_cache_hits_total{{{M}}}[{RI}])) / "
                                         f"clamp_min(sum by (instance) (rate(vllm:prefix_cache_queries_total{{{M}}}"
                                         f"[{RI}])), 1e-9)", "{{instance}}")], "percentunit"),
        panel("Prompt tokens / s", [(f"sum by (instance) (rate(vllm:prompt_tokens_total{{{M}}}[{RI}]))",
                                     "{{instance}}")]),
        panel("Generation tokens / s", [(f"sum by (instance) (rate(vllm:generation_tokens_total{{{M}}}[{RI}]))",
                                         "{{instance}}")]),
        row("Engine latency"),
        panel("Engine TTFT", _quantiles("vllm:time_to_first_token_seconds", M), "s"),
        panel("TTFT p99: engine vs through the gateway", [
            (f"histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{M}}}[{RI}])))",
             "engine"),
            (f"histogram_quantile(0.99, sum by (le) (rate(kvmesh_gateway_ttft_seconds_bucket[{RI}])))", "gateway")],
              "s", description="the gap is queueing, routing and relay outside the engine"),
    ], "vLLM's own metrics, scraped from each engine (simulated engines export the same names).")


def dashboards() -> dict[str, Obj]:
    """File name → dashboard."""
    return {"kvmesh-overview.json": overview(), "kvmesh-routing-cache.json": routing_cache(),
            "kvmesh-tenants.json": tenants(), "kvmesh-engines.json": engines()}


def render(d: Obj) -> str:
    return json.dumps(d, indent=2) + "\n"


def queries(d: Obj) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query target of a dashboard."""
    for p in d["panels"]:
        for t in p.get("targets", ()):
            yield p["title"], t["expr"]


def expand(expr: str, rate_interval: str = "1m") -> str:
    """A panel query as Grafana sends it with every variable at "All": what Prometheus evaluates."""
    return re.sub(r'=~"\$\w+"', '=~".*"', expr).replace("$__rate_interval", rate_interval)
