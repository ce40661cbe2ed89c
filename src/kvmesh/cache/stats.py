"""What a cache node reports about itself: one typed struct, on the wire and in ``kvmesh cache status``.

The node builds a :class:`NodeStats` from its store, pool and metrics (``CacheNode.stats``); it travels as
msgpack in the control protocol's ``StatsReply`` (engine ↔ node) and the pool's ``PStatsReply`` (node ↔
node), and as JSON on the node's ``/status`` and ``kvmesh cache status --json``.  Readers use attributes, never
string keys, so a renamed field is a type error instead of a silent zero; :func:`describe` renders the human
view.  Sizes are bytes, counts are totals since the node started.  This module imports nothing of kvmesh:
the CLI and engine-side clients load it cheaply.
"""

from __future__ import annotations

import msgspec


class TierUse(msgspec.Struct, kw_only=True):
    """One local tier (DRAM arena or SSD directory)."""
    objects: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0  # 0: the tier is disabled


class TenantUse(msgspec.Struct, kw_only=True):
    """One tenant's share of the local tiers; a quota is None when the tenant has none on that tier."""
    dram_bytes: int = 0
    ssd_bytes: int = 0
    dram_quota_bytes: int | None = None
    ssd_quota_bytes: int | None = None


class Reads(msgspec.Struct, kw_only=True):
    """Chunk reads by where they were served from.  ``pool`` counts chunks that came from pool peers,
    whether this node fetched them or an engine read them from the owner itself (``pool_direct`` of them);
    ``remote`` counts the remote tier (Redis/Valkey, S3 or a shared file system)."""
    dram: int = 0
    ssd: int = 0
    pool: int = 0
    pool_direct: int = 0
    remote: int = 0
    misses: int = 0

    @property
    def hits(self) -> int:
        return self.dram + self.ssd + self.pool + self.remote

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class PoolUse(msgspec.Struct, kw_only=True):
    """The node's view of its pool: live members on its ring (itself included) and copies per chunk."""
    members: int
    replicas: int


class NodeStats(msgspec.Struct, kw_only=True):
    node_id: str
    dram: TierUse
    ssd: TierUse
    writing: int = 0  # arena reservations not yet committed
    tenants: dict[str, TenantUse] = {}  # "" is the default tenant (no cache salt)
    reads: Reads = msgspec.field(default_factory=Reads)
    pool: PoolUse | None = None  # None: a standalone node

    @property
    def capacity_bytes(self) -> int:
        return self.dram.capacity_bytes + self.ssd.capacity_bytes


def describe(st: NodeStats, this: bool = False) -> list[str]:
    """``kvmesh cache status``'s lines for one node: hit rate and read sources, then tier and tenant use."""
    r = st.reads
    pool = f", pool of {st.pool.members} (R={st.pool.replicas})" if st.pool is not None else ""
    peers = f"; {r.pool} from pool peers, {r.pool_direct} of them read directly by engines" if r.pool else ""
    remote = f"; {r.remote} from the remote tier" if r.remote else ""
    lines = [f"node {st.node_id}{' (this one)' if this else ''}{pool}: hit rate {r.hit_rate:.0%} "
             f"({r.hits} hits, {r.misses} misses{peers}{remote})"]
    for name, tier in (("dram", st.dram), ("ssd", st.ssd)):
        pct = 100 * tier.used_bytes / tier.capacity_bytes if tier.capacity_bytes else 0.0
        lines.append(f"  {name:<6} {tier.objects:>8} objects  {tier.used_bytes / 2**20:>10.1f} / "
                     f"{tier.capacity_bytes / 2**20:.0f} MiB  ({pct:.0f}%)")
    for t, use in sorted(st.tenants.items()):
        parts = [f"{used / 2**20:.1f} MiB in {tier}" + (f" of {quota / 2**20:.0f} MiB" if quota else "")
                 for tier, used, quota in (("DRAM", use.dram_bytes, use.dram_quota_bytes),
                                           ("SSD", use.ssd_bytes, use.ssd_quota_bytes))]
        lines.append(f"  tenant {t or '-'}: " + ", ".join(parts))
    return lines
