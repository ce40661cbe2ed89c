"""kvmesh's Prometheus alert rules, generated from code.

Contract: :func:`rule_groups` is a Prometheus rule file's ``groups`` list; ``deploy/prometheus/kvmesh-rules.yml``
holds :func:`rules_yaml` of it and the Helm chart wraps the same groups in a ``PrometheusRule``
(``kvmesh.k8s.install``).  ``for_override`` replaces every ``for:`` (tests use ``0s`` so an alert fires on
the first evaluation that sees its condition); nothing else differs between the file and what is tested.

Rules select scrape jobs by the names in ``kvmesh.observability.dashboards.JOBS`` only where they must (a
cache node being down is ``up == 0`` of its job); everything else selects by metric name.

TTFT SLO burn follows the multi-window, multi-burn-rate recipe: the SLO is that ``TTFT_SLO_TARGET`` of
requests see their first byte within ``TTFT_SLO_S`` (a bucket bound of ``kvmesh_gateway_ttft_seconds``); a
fast burn (14.4× the budget over 1 h, confirmed over 5 m) pages, a slow burn (6× over 6 h, confirmed over
30 m) opens a ticket.
"""

from __future__ import annotations

from typing import Any

from kvmesh.observability.dashboards import JOBS

Obj = dict[str, Any]

TTFT_SLO_S = "2.5"       # must be one of the gateway's TTFT histogram bucket bounds
TTFT_SLO_TARGET = 0.99   # of requests within TTFT_SLO_S
ERROR_RATIO = 0.05       # 5xx share of gateway requests that alerts
LAG_S = 1.0              # p99 KV-event lag (event timestamp → applied in the index) that alerts
THROTTLED_RATIO = 0.5    # share of a tenant's requests answered 429 that alerts


def _ttft_bad_ratio(window: str) -> str:
    """Share of requests over ``window`` whose TTFT exceeded the SLO, per gateway instance."""
    m = "kvmesh_gateway_ttft_seconds"
    return (f'(1 - sum by (instance) (rate({m}_bucket{{le="{TTFT_SLO_S}"}}[{window}])) / '
            f"sum by (instance) (rate({m}_count[{window}])))")


def _burn(long: str, short: str, factor: float) -> str:
    budget = 1 - TTFT_SLO_TARGET
    return (f"{_ttft_bad_ratio(long)} > ({factor} * {budget:g})\nand\n"
            f"{_ttft_bad_ratio(short)} > ({factor} * {budget:g})")


def rule(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> Obj:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def gateway_rules() -> list[Obj]:
    req = "kvmesh_gateway_requests_total"
    tr = "kvmesh_gateway_tenant_requests_total"
    return [
        rule("KvmeshNoHealthyBackend", "max by (instance) (kvmesh_gateway_backend_healthy) == 0", "1m", "critical",
             "Gateway {{ $labels.instance }} has no healthy backend",
             "Every backend is down or its breaker is open: every request fails with 503."),
        rule("KvmeshBackendDown", "kvmesh_gateway_backend_healthy == 0", "2m", "warning",
             "Backend {{ $labels.backend }} is out of rotation",
             "The gateway {{ $labels.instance }} does not route to {{ $labels.backend }} (health checks fail, "
             "its process exited, or its breaker is open)."),
        rule("KvmeshBreakerOpen", "kvmesh_gateway_breaker_open == 1", "1m", "warning",
             "Circuit breaker open for {{ $labels.backend }}",
             "Requests to {{ $labels.backend }} failed (refused, no first token in time, broken response); "
             "the gateway keeps it out of rotation and probes it with one request at a time."),
        rule("KvmeshHighErrorRate",
             f'sum by (instance) (rate({req}{{status=~"5.."}}[5m])) / sum by (instance) (rate({req}[5m])) '
             f"> {ERROR_RATIO}", "5m", "critical",
             "Gateway {{ $labels.instance }}: {{ $value | humanizePercentage }} of requests fail (5xx)",
             "More than 5% of requests answered 5xx over 5 minutes."),
        rule("KvmeshTTFTBudgetBurnFast", _burn("1h", "5m", 14.4), "2m", "critical",
             "TTFT SLO budget burning fast on {{ $labels.instance }}",
             f"More than 14.4x the error budget of the TTFT SLO ({TTFT_SLO_TARGET:.0%} within {TTFT_SLO_S} s) "
             "over the last hour and 5 minutes: at this rate a 30-day budget is gone in 2 days."),
        rule("KvmeshTTFTBudgetBurnSlow", _burn("6h", "30m", 6), "15m", "warning",
             "TTFT SLO budget burning on {{ $labels.instance }}",
             f"More than 6x the error budget of the TTFT SLO ({TTFT_SLO_TARGET:.0%} within {TTFT_SLO_S} s) "
             "over the last 6 hours and 30 minutes."),
        rule("KvmeshTenantThrottled",
             f'sum by (instance, tenant) (rate({tr}{{status="429"}}[10m])) / sum by (instance, tenant) '
             f"(rate({tr}[10m])) > {THROTTLED_RATIO}", "15m", "info",
             "Tenant {{ $labels.tenant }} is throttled",
             "More than half of the tenant's requests have been answered 429 for 15 minutes: its limits "
             "(tenants file) are below what it sends."),
    ]


def index_rules() -> list[Obj]:
    return [
        rule("KvmeshIndexLagging",
             "histogram_quantile(0.99, sum by (instance, le) (rate(kvmesh_index_event_lag_seconds_bucket[5m]))) "
             f"> {LAG_S}", "5m", "warning",
             "KV index on {{ $labels.instance }} lags engine events",
             "The p99 time from a KV event to the gateway's index exceeds 1 s: KV-aware routing works from "
             "stale data."),
        rule("KvmeshIndexGaps",
             'sum by (instance, engine) (increase(kvmesh_index_gaps_total{action=~"dropped|replay_failed"}[10m]))'
             " > 0 or sum by (instance, engine) (increase(kvmesh_index_decode_errors_total[10m])) > 0",
             "0m", "warning", "KV index lost events from {{ $labels.engine }}",
             "The gateway missed KV events it could not replay (or could not decode them) and dropped the "
             "engine's entries; routing is cache-blind to it until new events arrive."),
    ]


def cache_rules() -> list[Obj]:
    return [
        rule("KvmeshCacheChecksumFailures",
             "sum by (instance, tier) (increase(kvmesh_cache_checksum_failures_total[10m])) > 0", "0m", "warning",
             "Cache node {{ $labels.instance }}: corrupted chunks in {{ $labels.tier }}",
             "Chunks whose bytes did not match their checksum were dropped (never served); repeated failures "
             "point at failing memory or disk."),
        rule("KvmeshCacheNodeDown", f'up{{job="{JOBS["cache"]}"}} == 0', "1m", "critical",
             "Cache node {{ $labels.instance }} is down",
             "Prometheus cannot scrape the cache node: engines on its machine lose their KV offload and reuse."),
    ]


def rule_groups(for_override: str | None = None) -> list[Obj]:
    groups: list[Obj] = [{"name": "kvmesh-gateway", "rules": gateway_rules()},
              {"name": "kvmesh-index", "rules": index_rules()},
              {"name": "kvmesh-cache", "rules": cache_rules()}]
    if for_override is not None:
        for g in groups:
            for r in g["rules"]:
                r["for"] = for_override
    return groups


def rules_yaml(for_override: str | None = None) -> str:
    import yaml  # imported here: the dashboards and `kvmesh top` need no YAML

    head = "# Generated by `python -m kvmesh.observability.generate` from kvmesh/observability/alerts.py.\n"
    body: str = yaml.safe_dump({"groups": rule_groups(for_override)}, sort_keys=False, width=120)
    return head + body


def alert_names() -> list[str]:
    return [r["alert"] for g in rule_groups() for r in g["rules"]]
