"""Prometheus metrics of a cache node, per tier (``dram``, ``ssd``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvmesh.cache.stats import Reads

REMOTE_TIERS = ("redis", "s3", "fs")  # the names remote tiers count their hits under (RemoteTier.name)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.hits = Counter("kvmesh_cache_hits", "Chunks served, by the tier they came from", ["tier"], registry=r)
        self.misses = Counter("kvmesh_cache_misses", "Chunk reads that found nothing", registry=r)
        self.bytes_read = Counter("kvmesh_cache_read_bytes", "Bytes served, by tier", ["tier"], registry=r)
        self.bytes_written = Counter("kvmesh_cache_written_bytes", "Bytes stored, by tier", ["tier"], registry=r)
        self.latency = Histogram("kvmesh_cache_get_seconds", "Node-side time to make one chunk readable",
                                 ["tier"], registry=r,
                                 buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0))
        self.evictions = Counter("kvmesh_cache_evictions", "Objects evicted, by tier", ["tier"], registry=r)
        self.checksum_failures = Counter("kvmesh_cache_checksum_failures",
                                         "Objects whose checksum did not match (dropped, never served)",
                                         ["tier"], registry=r)
        for tier in ("dram", "ssd"):  # exported at 0 from the start, so increase() sees the first failure
            self.checksum_failures.labels(tier)
        self.refused = Counter("kvmesh_cache_refused_writes", "Writes refused for lack of evictable room",
                               registry=r)
        self.not_admitted = Counter("kvmesh_cache_not_admitted", "Writes skipped by the admission filter",
                                    registry=r)
        self.errors = Counter("kvmesh_cache_errors", "I/O errors by kind", ["kind"], registry=r)
        self.objects = Gauge("kvmesh_cache_objects", "Objects held, by tier", ["tier"], registry=r)
        self.used = Gauge("kvmesh_cache_used_bytes", "Bytes used, by tier", ["tier"], registry=r)
        self.capacity = Gauge("kvmesh_cache_capacity_bytes", "Capacity, by tier", ["tier"], registry=r)
        self.misses_remote = Counter("kvmesh_cache_pool_misses", "Chunks no pool owner could supply", registry=r)
        self.replicated = Counter("kvmesh_cache_pool_pushed", "Chunks pushed to their owners (replication, rebalance)",
                                  registry=r)
        self.direct_reads = Counter("kvmesh_cache_pool_direct_reads",
                                    "Pool chunks engines read from their owners themselves (one hop), kept here",
                                    registry=r)
        self.requests = Counter("kvmesh_cache_requests", "Control requests, by type", ["type"], registry=r)

    def reads(self) -> Reads:
        """Where chunk reads were served from (read through the registry's public API).  The ``remote`` hit
        label is the pool's peers; the remote tier counts under its own name (redis, s3, fs)."""
        def get(name: str, tier: str | None = None) -> int:
            return int(self.registry.get_sample_value(name, {"tier": tier} if tier else {}) or 0)

        hits = "kvmesh_cache_hits_total"
        return Reads(dram=get(hits, "dram"), ssd=get(hits, "ssd"), pool=get(hits, "remote"),
                     pool_direct=get("kvmesh_cache_pool_direct_reads_total"),
                     remote=sum(get(hits, t) for t in REMOTE_TIERS), misses=get("kvmesh_cache_misses_total"))
