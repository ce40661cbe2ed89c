"""Prometheus metrics of the gateway.  Each gateway owns its registry, so tests can run several."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvmesh_gateway_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("kvmesh_gateway_errors", "Errors by kind", ["kind"], registry=r)
        self.retries = Counter("kvmesh_gateway_retries", "Requests re-sent to another backend", registry=r)
        self.ttft = Histogram("kvmesh_gateway_ttft_seconds", "Time to first streamed byte, as the client "
                              "sees it from the gateway", ["endpoint"], buckets=_LAT, registry=r)
        self.tpot = Histogram("kvmesh_gateway_tpot_seconds", "Mean time between streamed chunks after the "
                              "first (per request)", ["endpoint"], buckets=_LAT, registry=r)
        self.e2e = Histogram("kvmesh_gateway_e2e_seconds", "Request latency, arrival to last byte",
                             ["endpoint"], buckets=_LAT, registry=r)
        self.overhead = Histogram("kvmesh_gateway_overhead_seconds", "Latency the gateway adds before "
                                  "forwarding: read, parse, validate, route", buckets=_OVERHEAD, registry=r)
        # in flight and healthy per backend are read from the pool at scrape time (StateCollector): a backend
        # gone for good (scaled in, its pod deleted) then leaves no series behind
        self.breaker_trips = Counter("kvmesh_gateway_breaker_trips", "Circuit-breaker openings per backend",
                                     ["backend"], registry=r)
        self.routed = Counter("kvmesh_gateway_routed", "Requests routed per backend and policy",
                              ["backend", "policy"], registry=r)

        self.tokenize = Histogram("kvmesh_gateway_tokenize_seconds", "Prompt tokenisation time (KV-aware "
                                  "policies)", buckets=_OVERHEAD, registry=r)
        self.matched = Histogram("kvmesh_routing_cached_fraction", "Fraction of the prompt the chosen backend "
                                 "holds (KV-aware policies)", buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1),
                                 registry=r)
        self.decision = Histogram("kvmesh_routing_decision_seconds", "Time to choose a backend",
                                  buckets=_OVERHEAD, registry=r)

        self.queue_depth = Gauge("kvmesh_gateway_queue_depth", "Requests waiting for a free replica", registry=r)
        self.tenant_requests = Counter("kvmesh_gateway_tenant_requests", "Requests by tenant (\"default\" when "
                                       "auth is off) and HTTP status", ["tenant", "status"], registry=r)

        # prefill/decode disaggregation (kvmesh.gateway.pd)
        self.pd_remote = Counter("kvmesh_pd_remote_prefills", "Prompts prefilled on a prefill-role engine and "
                                 "decoded elsewhere", registry=r)
        self.pd_local = Counter("kvmesh_pd_local_prefills", "Requests in a P/D fleet the decode engine prefilled "
                                "itself, by the decision's reason (short_prompt, no_prefill_engine, "
                                "prefill_saturated, disabled)", ["reason"], registry=r)
        self.pd_fallbacks = Counter("kvmesh_pd_fallbacks", "Remote prefills that failed (the decode engine "
                                    "prefilled instead) or whose decode engine was replaced, by reason",
                                    ["reason"], registry=r)
        self.pd_transfer = Histogram("kvmesh_pd_transfer_seconds", "The remote prefill leg: request sent to the "
                                     "prefill engine until its KV transfer parameters came back", buckets=_LAT,
                                     registry=r)
        self.pd_transfer_blocks = Counter("kvmesh_pd_transfer_blocks", "KV blocks prefill engines announced for "
                                          "decode engines to load (remote_block_ids)", registry=r)

        # overload (gateway/pressure.py): what the autoscaler reads
        self.busy_waits = Counter("kvmesh_gateway_busy_waits", "First-token windows that expired on an engine "
                                  "still making progress (busy, not hung: waited on, not retried)", registry=r)
        self.queued_prefill = Gauge("kvmesh_gateway_queued_prefill_tokens", "Prompt tokens sent or queued but "
                                    "not yet prefilled", registry=r)
        self.expected_wait = Gauge("kvmesh_gateway_expected_wait_seconds", "Expected wait before a new "
                                   "request's prefill starts (queued prefill / learned throughput; -1: unknown)",
                                   registry=r)
        self.shed = Gauge("kvmesh_gateway_shed", "Requests shed by reason (expected_wait, busy_timeout, "
                          "cold_start), since start", ["reason"], registry=r)

    def watch_pressure(self, p: Any) -> None:
        """Read the pressure's figures at scrape time (no bookkeeping on the request path)."""
        self.queued_prefill.set_function(p.queued_prefill_tokens)
        self.expected_wait.set_function(lambda: w if (w := p.expected_wait_s()) is not None else -1.0)
        def shed(reason: str) -> Callable[[], float]:
            return lambda: float(p.shed[reason])

        for reason in ("expected_wait", "busy_timeout", "cold_start"):
            self.shed.labels(reason).set_function(shed(reason))

    def forget_backend(self, name: str, policy: str) -> None:
        """A backend gone for good: drop its counters' series (one per backend name ever seen would grow
        without bound as pods come and go; the gauges come from the live pool and need nothing)."""
        for metric, labels in ((self.breaker_trips, (name,)), (self.routed, (name, policy))):
            with contextlib.suppress(KeyError):  # never incremented
                metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Breaker state per backend and tenants' in-flight requests and limits, read at scrape time from the
    gateway's live objects (callables, so a tenants reload is seen) — no bookkeeping on the request path."""

    def __init__(self, backends: Callable[[], Iterable[Any]], tenants: Callable[[], Iterable[Any]]) -> None:
        self.backends = backends
        self.tenants = tenants

    def collect(self) -> Iterator[Metric]:
        breaker = GaugeMetricFamily("kvmesh_gateway_breaker_open", "1 while the backend's circuit breaker is "
                                    "open (or half-open)", labels=["backend"])
        in_flight = GaugeMetricFamily("kvmesh_gateway_backend_in_flight", "Requests in flight per backend",
                                      labels=["backend"])
        healthy = GaugeMetricFamily("kvmesh_gateway_backend_healthy", "1 when the backend is in rotation",
                                    labels=["backend"])
        for b in self.backends():
            breaker.add_metric([b.name], 1.0 if b.breaker.state != "closed" else 0.0)
            in_flight.add_metric([b.name], float(b.in_flight))
            healthy.add_metric([b.name], 1.0 if b.healthy else 0.0)
        yield breaker
        yield in_flight
        yield healthy
        by_role: dict[str, int] = {"prefill": 0, "decode": 0, "both": 0}
        for b in self.backends():
            role = getattr(b, "role", "both")
            by_role[role] = by_role.get(role, 0) + b.in_flight
        role_load = GaugeMetricFamily("kvmesh_gateway_role_in_flight", "Requests in flight on engines of each "
                                      "P/D role (prefill legs count on prefill engines)", labels=["role"])
        for role, n in by_role.items():
            role_load.add_metric([role], float(n))
        yield role_load
        in_flight = GaugeMetricFamily("kvmesh_gateway_tenant_in_flight", "Requests in flight per tenant",
                                      labels=["tenant"])
        limit = GaugeMetricFamily("kvmesh_gateway_tenant_limit", "A tenant's configured limits "
                                  "(requests_per_min, tokens_per_min, max_concurrent)", labels=["tenant", "limit"])
        for t in self.tenants():
            in_flight.add_metric([t.name], t.in_flight)
            for kind in ("requests_per_min", "tokens_per_min", "max_concurrent"):
                value = getattr(t.cfg, kind)
                if value is not None:
                    limit.add_metric([t.name, kind], float(value))
        yield in_flight
        yield limit
