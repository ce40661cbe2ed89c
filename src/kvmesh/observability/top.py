"""``kvmesh top``: a live terminal view of one gateway, its backends, its cache nodes and its top tenants.

Contract: everything shown comes from HTTP endpoints a running fleet already serves — the gateway's
``/health`` (backends, breaker state) and ``/metrics``, each backend's own ``/metrics`` (vLLM's names:
queue, KV usage, prefix-cache hits, engine TTFT; the URL is the one ``/health`` reports) and each cache
node's ``/status`` (``kvmesh.cache.stats.NodeStats``; the fields shown are mirrored here).  An endpoint that
does not answer shows as ``-``; ``top`` never fails because a component is down, since that is when an
operator runs it.

Rates and percentiles are over a window: the difference between the newest scrape and the oldest one kept
(at most ``WINDOW_S`` old).  ``--once`` has a single scrape, so it shows totals since each process started
and says so in the title.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table

WINDOW_S = 60.0


# What `top` reads of a cache node's /status (``kvmesh.cache.stats.NodeStats`` as JSON).  Mirrored rather than
# imported so that this package imports nothing of kvmesh (the Kubernetes chart code imports it, and the cache
# imports Kubernetes discovery); no defaults, so a renamed field fails the decode instead of reading 0.
class TierUse(msgspec.Struct):
    objects: int
    used_bytes: int
    capacity_bytes: int


class Reads(msgspec.Struct):
    dram: int
    ssd: int
    pool: int
    remote: int
    misses: int

    @property
    def hit_rate(self) -> float:
        hits = self.dram + self.ssd + self.pool + self.remote
        return hits / (hits + self.misses) if hits + self.misses else 0.0


class NodeStats(msgspec.Struct):
    node_id: str
    dram: TierUse
    ssd: TierUse
    reads: Reads


class Samples:
    """One Prometheus text exposition, indexed by sample name."""

    def __init__(self, text: str = "") -> None:
        self.by_name: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.by_name[s.name].append((dict(s.labels), s.value))

    def select(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for lab, v in self.by_name.get(name, ()) if all(lab.get(k) == x for k, x in match.items())]

    def total(self, name: str, **match: str) -> float | None:
        got = self.select(name, **match)
        return sum(v for _, v in got) if got else None

    def buckets(self, metric: str, **match: str) -> dict[float, float]:
        """Cumulative bucket counts by upper bound, summed over every other label."""
        out: dict[float, float] = collections.defaultdict(float)
        for lab, v in self.select(f"{metric}_bucket", **match):
            out[float(lab["le"])] += v
        return dict(out)


@dataclass(slots=True)
class Scrape:
    at: float
    health: dict[str, Any] | None
    gateway: Samples
    engines: dict[str, Samples | None]  # backend name → its /metrics (None: did not answer)
    caches: dict[str, NodeStats | None] = field(default_factory=dict)  # URL → /status


def _get(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> httpx.Response | None:
    try:
        r = client.get(url, headers=headers)
    except httpx.HTTPError:
        return None
    return r if r.status_code == 200 else None


def scrape(client: httpx.Client, gateway: str, caches: Sequence[str], api_key: str | None = None) -> Scrape:
    """One round of reads (sequential: a handful of small GETs, each bounded by the client's timeout).  With
    API keys on, the gateway's /health lists its backends only for an admin key (sent to the gateway only)."""
    h = _get(client, f"{gateway}/health", {"Authorization": f"Bearer {api_key}"} if api_key else None)
    health = h.json() if h is not None else None
    m = _get(client, f"{gateway}/metrics")
    engines: dict[str, Samples | None] = {}
    backends = health.get("backends", {}) if isinstance(health, dict) else {}
    for name, b in sorted(backends.items()):
        r = _get(client, f"{b['url'].rstrip('/')}/metrics")
        engines[name] = Samples(r.text) if r is not None else None
    stats: dict[str, NodeStats | None] = {}
    for url in caches:
        r = _get(client, f"{url.rstrip('/')}/status")
        stats[url] = msgspec.json.decode(r.content, type=NodeStats) if r is not None else None
    return Scrape(time.monotonic(), health, Samples(m.text if m is not None else ""), engines, stats)


def quantile(q: float, now: dict[float, float], past: dict[float, float] | None = None) -> float | None:
    """``histogram_quantile`` over cumulative buckets (minus ``past`` ones): linear within a bucket."""
    bounds = sorted(now)
    counts = [now[b] - (past or {}).get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, prev_b, prev_c = q * counts[-1], 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if b == float("inf"):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_b, prev_c = b, c
    return prev_b


def _fmt(v: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if v is None else f"{v * scale:{spec}}{suffix}"


def _delta(now: float | None, past: float | None) -> float | None:
    return None if now is None else now - (past or 0.0)


def backend_table(now: Scrape, past: Scrape | None) -> Table:
    t = Table(title="backends", title_justify="left")
    for col in ("backend", "health", "breaker", "in flight", "running", "waiting", "KV usage", "prefix hit",
                "TTFT p50", "TTFT p99"):
        t.add_column(col, justify="left" if col in ("backend", "health", "breaker") else "right")
    backends = now.health.get("backends", {}) if isinstance(now.health, dict) else {}
    if isinstance(now.health, dict) and "backends" not in now.health and "healthy_backends" in now.health:
        t.caption = f"{now.health['healthy_backends']} healthy; API keys are on: --api-key ADMIN_KEY lists them"
    for name, b in sorted(backends.items()):
        e, pe = now.engines.get(name), (past.engines.get(name) if past else None)
        hits = queries = None
        if e is not None:
            hits = _delta(e.total("vllm:prefix_cache_hits_total"), pe.total("vllm:prefix_cache_hits_total") if pe
                          else None)
            queries = _delta(e.total("vllm:prefix_cache_queries_total"),
                             pe.total("vllm:prefix_cache_queries_total") if pe else None)
        ttft = e.buckets("vllm:time_to_first_token_seconds") if e else {}
        pttft = pe.buckets("vllm:time_to_first_token_seconds") if pe else None
        t.add_row(name, "[green]up[/]" if b["healthy"] else "[red]down[/]",
                  b["breaker"] if b["breaker"] == "closed" else f"[red]{b['breaker']}[/]", str(b["in_flight"]),
                  _fmt(e.total("vllm:num_requests_running") if e else None, ".0f"),
                  _fmt(e.total("vllm:num_requests_waiting") if e else None, ".0f"),
                  _fmt(e.total("vllm:kv_cache_usage_perc") if e else None, ".1f", 100, "%"),
                  _fmt(hits / queries if hits is not None and queries else None, ".1f", 100, "%"),
                  _fmt(quantile(0.5, ttft, pttft), ".0f", 1000, " ms"),
                  _fmt(quantile(0.99, ttft, pttft), ".0f", 1000, " ms"))
    return t


def gateway_table(now: Scrape, past: Scrape | None) -> Table:
    g, pg = now.gateway, past.gateway if past else None
    span = now.at - past.at if past else None
    t = Table(title="gateway", title_justify="left")
    for col in ("policy", "requests", "2xx", "4xx", "5xx", "queue", "TTFT p50", "TTFT p99", "overhead p99"):
        t.add_column(col, justify="left" if col == "policy" else "right")

    def count(prefix: str = "") -> str:
        got = [v for lab, v in g.select("kvmesh_gateway_requests_total") if lab["status"].startswith(prefix)]
        old = [v for lab, v in (pg.select("kvmesh_gateway_requests_total") if pg else ())
               if lab["status"].startswith(prefix)]
        n = sum(got) - sum(old)
        return f"{n / span:.1f}/s" if span else f"{n:.0f}"

    ttft = g.buckets("kvmesh_gateway_ttft_seconds")
    pttft = pg.buckets("kvmesh_gateway_ttft_seconds") if pg else None
    over = g.buckets("kvmesh_gateway_overhead_seconds")
    pover = pg.buckets("kvmesh_gateway_overhead_seconds") if pg else None
    policy = str(now.health.get("policy", "-")) if isinstance(now.health, dict) else "[red]unreachable[/]"
    t.add_row(policy, count(), count("2"), count("4"), count("5"),
              _fmt(g.total("kvmesh_gateway_queue_depth"), ".0f"), _fmt(quantile(0.5, ttft, pttft), ".0f", 1000, " ms"),
              _fmt(quantile(0.99, ttft, pttft), ".0f", 1000, " ms"),
              _fmt(quantile(0.99, over, pover), ".2f", 1000, " ms"))
    return t


def cache_table(now: Scrape) -> Table:
    t = Table(title="cache nodes", title_justify="left")
    for col in ("node", "tier", "objects", "used", "capacity", "use", "hits", "hit rate"):
        t.add_column(col, justify="left" if col in ("node", "tier") else "right")
    for url, st in now.caches.items():
        if st is None:
            t.add_row(url, "[red]unreachable[/]", *["-"] * 6)
            continue
        for tier, use, hits in (("dram", st.dram, st.reads.dram), ("ssd", st.ssd, st.reads.ssd)):
            t.add_row(f"{st.node_id} ({url})" if tier == "dram" else "", tier, str(use.objects),
                      f"{use.used_bytes / 2**20:.1f} MiB", f"{use.capacity_bytes / 2**20:.0f} MiB",
                      _fmt(use.used_bytes / use.capacity_bytes if use.capacity_bytes else None, ".0f", 100, "%"),
                      str(hits), f"{st.reads.hit_rate:.0%}" if tier == "dram" else "")
    return t


def tenant_table(now: Scrape, past: Scrape | None, top_n: int = 5) -> Table:
    t = Table(title=f"top {top_n} tenants", title_justify="left")
    for col in ("tenant", "requests", "429", "in flight"):
        t.add_column(col, justify="left" if col == "tenant" else "right")
    reqs: dict[str, float] = collections.defaultdict(float)
    throttled: dict[str, float] = collections.defaultdict(float)
    for sign, sc in ((1.0, now), (-1.0, past)):
        for lab, v in sc.gateway.select("kvmesh_gateway_tenant_requests_total") if sc else ():
            reqs[lab["tenant"]] += sign * v
            if lab["status"] == "429":
                throttled[lab["tenant"]] += sign * v
    in_flight = {lab["tenant"]: v for lab, v in now.gateway.select("kvmesh_gateway_tenant_in_flight")}
    for name in sorted(reqs, key=lambda n: -reqs[n])[:top_n]:
        t.add_row(name, f"{reqs[name]:.0f}", f"{throttled[name]:.0f}", _fmt(in_flight.get(name), ".0f"))
    return t


def frame(gateway: str, now: Scrape, past: Scrape | None) -> Group:
    span = f"last {now.at - past.at:.0f} s" if past else "totals since start"
    head = f"[bold]kvmesh top[/] {gateway}   ({span})"
    return Group(head, gateway_table(now, past), backend_table(now, past), cache_table(now),
                 tenant_table(now, past))


def run(gateway: str, caches: Iterable[str], interval_s: float, once: bool, console: Console,
        api_key: str | None = None) -> None:
    from rich.live import Live

    gateway, caches = gateway.rstrip("/"), list(caches)
    with httpx.Client(timeout=2.0) as client:
        if once:
            console.print(frame(gateway, scrape(client, gateway, caches, api_key), None))
            return
        history: collections.deque[Scrape] = collections.deque()
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                history.append(scrape(client, gateway, caches, api_key))
                while history[-1].at - history[0].at > WINDOW_S:
                    history.popleft()
                live.update(frame(gateway, history[-1], history[0] if len(history) > 1 else None), refresh=True)
                time.sleep(interval_s)  # the refresh period of a display, not a synchronisation
