"""Tiered object store of a cache node: DRAM (shared-memory arena) over SSD (directory).

Objects are immutable and content-addressed.  Life of an object: reserved (an engine is writing it into the
arena) → committed in DRAM (readable; leased while an engine copies it out) → demoted to SSD when DRAM needs
room (write-behind, in a thread) → promoted back into DRAM on an SSD hit → evicted.  A checksum mismatch
anywhere is a miss, counted, and the object is dropped — never served.

Concurrency: every method runs on the node's event loop; blocking file I/O goes to the default executor.
Objects being written, leased or promoted are never evicted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pathlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmesh.cache.arena import Arena, ExtentAllocator
from kvmesh.cache.chunk import CorruptObject, ObjectMeta, checksum
from kvmesh.cache.eviction import EvictionPolicy, SeenCounter, make_policy
from kvmesh.cache.keys import tenant_of
from kvmesh.cache.metrics import CacheMetrics
from kvmesh.cache.ssd import DiskFull, SsdStore
from kvmesh.cache.stats import TenantUse, TierUse

if TYPE_CHECKING:
    from kvmesh.config import CacheNodeConfig

log = logging.getLogger(__name__)
DRAM, SSD = "dram", "ssd"


@dataclass(slots=True)
class DramObject:
    offset: int
    meta: ObjectMeta
    leases: int = 0
    doomed: bool = False  # no new leases; drop when the last lease goes (found corrupt, or expired while read)
    tenant: str = ""


@dataclass(slots=True)
class SsdObject:
    disk_bytes: int
    meta: ObjectMeta


@dataclass(slots=True)
class TierListener:
    """Told about what each tier gains and loses (the node turns these into KV events)."""
    stored: Callable[[str, ObjectMeta], None]
    removed: Callable[[str, bytes], None]


class TieredStore:
    """The node's tiers, sized by its config: ``arena_path`` and ``ssd_dir`` must be set (the node resolves
    unset paths first, :func:`kvmesh.cache.node.resolve_paths`); ``ssd_mib`` 0 means no SSD tier."""

    def __init__(self, cfg: CacheNodeConfig, metrics: CacheMetrics, listener: TierListener | None = None,
                 demote_backlog_bytes: int | None = None) -> None:
        if cfg.arena_path is None or (cfg.ssd_mib and cfg.ssd_dir is None):
            raise ValueError("the store needs arena_path (and ssd_dir with an SSD tier); resolve the config first")
        self.metrics = metrics
        self.listener = listener
        # read once: the write path consults these per chunk
        self.admit_after = cfg.admit_after
        self.ssd_capacity = cfg.ssd_mib << 20
        self.dram_quotas = {t: mib << 20 for t, mib in cfg.tenant_quota_mib.items()}
        self.ssd_quotas = {t: mib << 20 for t, mib in cfg.tenant_ssd_quota_mib.items()}
        dram_bytes = cfg.dram_mib << 20
        self.arena = Arena(pathlib.Path(cfg.arena_path), dram_bytes, create=True)
        self.alloc = ExtentAllocator(dram_bytes)
        self.dram: dict[bytes, DramObject] = {}
        self.writing: dict[bytes, tuple[int, int]] = {}  # key -> (offset, size) reserved
        self.ssd: dict[bytes, SsdObject] = {}
        self.ssd_used = 0
        self.dram_policy: EvictionPolicy = make_policy(cfg.eviction, cfg.ttl_s)
        self.ssd_policy: EvictionPolicy = make_policy(cfg.eviction, cfg.ttl_s)
        self.disk = SsdStore(pathlib.Path(cfg.ssd_dir)) if cfg.ssd_mib and cfg.ssd_dir else None
        self._seen = SeenCounter()
        self._busy_ssd: set[bytes] = set()  # being demoted or promoted
        self._demoting: dict[bytes, tuple[ObjectMeta, bytes]] = {}  # left DRAM, not yet on disk
        # The write-behind copies live on the heap until on disk: a stalled SSD must not grow them without
        # bound, so past this many bytes evicted chunks are dropped instead of demoted (counted).
        self.demote_backlog_bytes = dram_bytes if demote_backlog_bytes is None else demote_backlog_bytes
        self._demoting_bytes = 0
        self.demote_dropped = 0
        self.tenant_bytes: collections.Counter[str] = collections.Counter()  # DRAM bytes by tenant
        # reserved and not yet committed, by tenant: counted against its quota, or one batched reserve could
        # take many times the quota (and evict other tenants' chunks to make the room)
        self.tenant_reserved: collections.Counter[str] = collections.Counter()
        self._writing_tenant: dict[bytes, str] = {}
        self.tenant_ssd_bytes: collections.Counter[str] = collections.Counter()  # SSD (disk) bytes by tenant
        self._bg: set[asyncio.Task[None]] = set()

    # ---- start / stop ------------------------------------------------------------------------------
    def reindex_ssd(self) -> int:
        """Adopt the objects an earlier run left on disk (blocking: call before serving)."""
        if self.disk is None:
            return 0
        for meta, nbytes, _ in sorted(self.disk.scan(), key=lambda t: t[2]):
            self.ssd[meta.key] = SsdObject(nbytes, meta)
            self.ssd_used += nbytes
            self.tenant_ssd_bytes[tenant_of(meta.salt)] += nbytes
            self.ssd_policy.inserted(meta.key)
        self._export()
        return len(self.ssd)

    async def close(self) -> None:
        await self.settle()
        self.arena.close(unlink=True)

    # ---- lookups -----------------------------------------------------------------------------------
    def holds(self, key: bytes) -> bool:
        """In DRAM (even doomed), on SSD, or on its way to SSD."""
        return key in self.dram or key in self.ssd or key in self._demoting

    def _taken(self, key: bytes) -> bool:
        """Held, being written, or being promoted: a second object under ``key`` would replace (and leak) the
        one readers lease, so writes of such keys are refused."""
        return self.holds(key) or key in self.writing or key in self._busy_ssd

    def count_prefix(self, keys: list[bytes]) -> int:
        n = 0
        for k in keys:
            o = self.dram.get(k)
            if (o is None or o.doomed) and k not in self.ssd and k not in self._demoting:
                break
            n += 1
        return n

    async def lease(self, keys: list[bytes]) -> list[DramObject]:
        """Lease the longest held prefix of ``keys`` in DRAM, promoting SSD objects; stops at a miss."""
        out: list[DramObject] = []
        for k in keys:
            t0 = time.perf_counter()
            o = self.dram.get(k)
            tier = DRAM
            if o is None:
                if k in self._demoting:
                    o = self._undemote(k)
                else:
                    o = await self._promote(k) if k in self.ssd and k not in self._busy_ssd else None
                tier = SSD
            # A doomed object still sits under its key (readers hold it): a miss, never a reason to promote
            # another copy over it.
            if o is None or o.doomed:
                self.metrics.misses.inc()
                break
            o.leases += 1
            self.dram_policy.accessed(k)
            self.metrics.hits.labels(tier).inc()
            self.metrics.bytes_read.labels(tier).inc(o.meta.size)
            self.metrics.latency.labels(tier).observe(time.perf_counter() - t0)
            out.append(o)
        return out

    def pin(self, key: bytes) -> DramObject | None:
        """Lease a DRAM object without counting a read (the node's own use: pushing it to a peer); release
        it with :meth:`release`."""
        o = self.dram.get(key)
        if o is None or o.doomed:
            return None
        o.leases += 1
        return o

    def release(self, keys: list[bytes], corrupt: list[bytes]) -> None:
        for k in corrupt:
            if (o := self.dram.get(k)) is not None:
                o.doomed = True
                self.metrics.checksum_failures.labels(DRAM).inc()
        for k in keys:
            o = self.dram.get(k)
            if o is None or o.leases == 0:
                continue
            o.leases -= 1
            if o.doomed and o.leases == 0:
                self._drop_dram(k)

    # ---- writes ------------------------------------------------------------------------------------
    def reserve(self, key: bytes, size: int, tenant: str = "") -> int:
        """Arena offset to write ``size`` bytes at; -1 when already held or being written, -2 when refused."""
        if self._taken(key):
            return -1
        if self._seen.bump(key) < self.admit_after:
            self.metrics.not_admitted.inc()
            return -2
        if not self._within_quota(tenant, size):
            self.metrics.refused.inc()
            return -2
        off = self._make_room(size)
        if off is None:
            self.metrics.refused.inc()
            return -2
        self._reserved(key, off, size, tenant)
        self._export()
        return off

    def _reserved(self, key: bytes, off: int, size: int, tenant: str) -> None:
        self.writing[key] = (off, size)
        self._writing_tenant[key] = tenant
        self.tenant_reserved[tenant] += size

    def _unreserved(self, key: bytes) -> tuple[int, int] | None:
        """Forget ``key``'s reservation (committed or given up): its (offset, size), None if there was none."""
        res = self.writing.pop(key, None)
        if res is not None:
            self.tenant_reserved[self._writing_tenant.pop(key, "")] -= res[1]
        return res

    def _within_quota(self, tenant: str, size: int) -> bool:
        """Make room under ``tenant``'s quota by evicting its own chunks (never another tenant's)."""
        quota = self.dram_quotas.get(tenant)
        if quota is None:
            return True
        while self.tenant_bytes[tenant] + self.tenant_reserved[tenant] + size > quota:
            victim = self.dram_policy.victim(
                lambda k: (o := self.dram.get(k)) is not None and o.leases == 0 and o.tenant == tenant)
            if victim is None:
                return False
            self._evict_dram(victim)
        return True

    def commit(self, meta: ObjectMeta) -> bool:
        res = self._unreserved(meta.key)
        if res is None or res[1] != meta.size:
            return False
        o = self.dram[meta.key] = DramObject(res[0], meta, tenant=tenant_of(meta.salt))
        self.tenant_bytes[o.tenant] += meta.size
        self.dram_policy.inserted(meta.key)
        self.metrics.bytes_written.labels(DRAM).inc(meta.size)
        if self.listener:
            self.listener.stored(DRAM, meta)
        self._export()
        return True

    def abort(self, key: bytes) -> None:
        res = self._unreserved(key)
        if res is not None:
            self.alloc.free(*res)

    # ---- raw placement (chunks arriving from peers or remote tiers) --------------------------------------
    def reserve_raw(self, key: bytes, size: int, tenant: str = "") -> int | None:
        """Arena space for a chunk that will be written by this node itself; None if held or no room."""
        if self._taken(key) or not self._within_quota(tenant, size):
            return None
        off = self._make_room(size)
        if off is not None:
            self._reserved(key, off, size, tenant)
        return off

    def unreserve_raw(self, key: bytes, off: int, size: int) -> None:
        if self.writing.get(key) == (off, size):
            self._unreserved(key)
            self.alloc.free(off, size)

    def adopt(self, meta: ObjectMeta, off: int) -> bool:
        """Publish bytes written at ``off`` after verifying them against ``meta.checksum``."""
        view = self.arena.view[off:off + meta.size]
        try:
            ok = checksum(view) == meta.checksum
        finally:
            view.release()
        if not ok:
            self.metrics.checksum_failures.labels("remote").inc()
            self.unreserve_raw(meta.key, off, meta.size)
            return False
        return self.commit(meta)

    def put_bytes(self, meta: ObjectMeta, data: bytes | memoryview) -> bool:
        """Store a chunk that arrived whole (a peer's push, a remote tier's read); True when held afterwards."""
        if self.holds(meta.key):
            return True
        off = self.reserve_raw(meta.key, meta.size, tenant_of(meta.salt))
        if off is None or len(data) != meta.size:
            return False
        self.arena.view[off:off + meta.size] = data
        return self.adopt(meta, off)

    def tier_use(self) -> tuple[TierUse, TierUse]:
        """DRAM and SSD use, for :class:`~kvmesh.cache.stats.NodeStats`."""
        return (TierUse(objects=len(self.dram), used_bytes=self.alloc.used, capacity_bytes=self.alloc.size),
                TierUse(objects=len(self.ssd), used_bytes=self.ssd_used, capacity_bytes=self.ssd_capacity))

    def tenant_use(self) -> dict[str, TenantUse]:
        """Every tenant holding bytes or having a quota (a tenant at zero under a quota is still shown)."""
        names = ({t for t, n in self.tenant_bytes.items() if n} | {t for t, n in self.tenant_ssd_bytes.items() if n}
                 | set(self.dram_quotas) | set(self.ssd_quotas))
        return {t: TenantUse(dram_bytes=self.tenant_bytes[t], ssd_bytes=self.tenant_ssd_bytes[t],
                             dram_quota_bytes=self.dram_quotas.get(t), ssd_quota_bytes=self.ssd_quotas.get(t))
                for t in sorted(names)}

    # ---- DRAM room, demotion, promotion ------------------------------------------------------------
    def _make_room(self, size: int) -> int | None:
        if size > self.alloc.size:
            return None
        while (off := self.alloc.alloc(size)) is None:
            victim = self.dram_policy.victim(lambda k: (o := self.dram.get(k)) is not None and o.leases == 0)
            if victim is None:
                return None
            self._evict_dram(victim)
        return off

    def _evict_dram(self, key: bytes) -> None:
        o = self.dram[key]
        demote = self.disk is not None and key not in self.ssd and key not in self._busy_ssd
        if demote and self._demoting_bytes + o.meta.size > self.demote_backlog_bytes:
            demote = False
            self.demote_dropped += 1
            self.metrics.errors.labels("demote_backlog_full").inc()
        if demote:
            data = bytes(self.arena.view[o.offset:o.offset + o.meta.size])  # copy out, then free at once
            self._busy_ssd.add(key)
            self._demoting[key] = (o.meta, data)
            self._demoting_bytes += o.meta.size
            self._spawn(self._demote(o.meta, data))
        self.metrics.evictions.labels(DRAM).inc()
        # A demoted chunk's DRAM removal is announced once it is on SSD (stored-then-removed), so the KV
        # index never loses the chain link that the chunk's children (demoted in any order) refer to.
        self._drop_dram(key, announce=not demote)

    def _drop_dram(self, key: bytes, announce: bool = True) -> None:
        o = self.dram.pop(key)
        self.tenant_bytes[o.tenant] -= o.meta.size
        self.dram_policy.removed(key)
        self.alloc.free(o.offset, o.meta.size)
        if self.listener and announce:
            self.listener.removed(DRAM, key)
        self._export()

    async def _demote(self, meta: ObjectMeta, data: bytes) -> None:
        assert self.disk is not None
        try:
            nbytes = await asyncio.get_running_loop().run_in_executor(None, self.disk.write, meta, data)
        except DiskFull as e:
            self.metrics.errors.labels("disk_full").inc()
            log.warning("SSD tier full, chunk not demoted: %s", e)
            self._left_dram(meta.key)
            return
        except OSError as e:
            self.metrics.errors.labels("disk_io").inc()
            log.warning("SSD tier write failed: %s", e)
            self._left_dram(meta.key)
            return
        finally:
            self._busy_ssd.discard(meta.key)
            if self._demoting.pop(meta.key, None) is not None:
                self._demoting_bytes -= meta.size
        self.ssd[meta.key] = SsdObject(nbytes, meta)
        self.ssd_used += nbytes
        self.tenant_ssd_bytes[tenant_of(meta.salt)] += nbytes
        self.ssd_policy.inserted(meta.key)
        self.metrics.bytes_written.labels(SSD).inc(meta.size)
        if self.listener:
            self.listener.stored(SSD, meta)
        self._left_dram(meta.key)
        await self._trim_ssd(tenant_of(meta.salt))
        self._export()

    def _left_dram(self, key: bytes) -> None:
        """The deferred DRAM-removal event of a demotion (unless the chunk came back to DRAM meanwhile)."""
        if self.listener and key not in self.dram:
            self.listener.removed(DRAM, key)

    async def _trim_ssd(self, tenant: str = "") -> None:
        """Over ``tenant``'s SSD quota: evict that tenant's own chunks; then over the tier: anyone's."""
        assert self.disk is not None
        quota = self.ssd_quotas.get(tenant)
        while quota is not None and self.tenant_ssd_bytes[tenant] > quota:
            victim = self.ssd_policy.victim(
                lambda k: k not in self._busy_ssd and (s := self.ssd.get(k)) is not None
                and tenant_of(s.meta.salt) == tenant)
            if victim is None:
                break
            await self._drop_ssd(victim)
            self.metrics.evictions.labels(SSD).inc()
        while self.ssd_used > self.ssd_capacity:
            victim = self.ssd_policy.victim(lambda k: k not in self._busy_ssd)
            if victim is None:
                return
            await self._drop_ssd(victim)
            self.metrics.evictions.labels(SSD).inc()

    async def _drop_ssd(self, key: bytes) -> None:
        assert self.disk is not None
        s = self.ssd.pop(key, None)
        if s is None:
            return
        self.ssd_used -= s.disk_bytes
        self.tenant_ssd_bytes[tenant_of(s.meta.salt)] -= s.disk_bytes
        self.ssd_policy.removed(key)
        if self.listener:
            self.listener.removed(SSD, key)
        await asyncio.get_running_loop().run_in_executor(None, self.disk.delete, key)

    def _undemote(self, key: bytes) -> DramObject | None:
        """An SSD hit on an object still on its way to disk: copy it back from memory."""
        meta, data = self._demoting[key]
        off = self._make_room(meta.size)
        if off is None:
            return None
        self.arena.view[off:off + meta.size] = data
        o = self.dram[key] = DramObject(off, meta, tenant=tenant_of(meta.salt))
        self.tenant_bytes[o.tenant] += meta.size
        self.dram_policy.inserted(key)
        if self.listener:
            self.listener.stored(DRAM, meta)
        return o

    async def _promote(self, key: bytes) -> DramObject | None:
        assert self.disk is not None
        s = self.ssd[key]
        off = self._make_room(s.meta.size)
        if off is None:
            return None
        self._busy_ssd.add(key)
        out = self.arena.view[off:off + s.meta.size]
        try:
            meta = await asyncio.get_running_loop().run_in_executor(None, self.disk.read_into, key, out)
        except (CorruptObject, OSError) as e:
            self.alloc.free(off, s.meta.size)
            self._busy_ssd.discard(key)
            self.metrics.checksum_failures.labels(SSD).inc()
            log.warning("SSD tier: %s; dropped (a miss: the engine recomputes)", e)
            await self._drop_ssd(key)
            return None
        finally:
            out.release()
        self._busy_ssd.discard(key)
        self.ssd_policy.accessed(key)
        if (o := self.dram.get(key)) is not None:
            # The key reached DRAM another way meanwhile: keep that object (readers may hold it).
            self.alloc.free(off, s.meta.size)
            return None if o.doomed else o
        o = DramObject(off, meta, tenant=tenant_of(meta.salt))
        self.dram[key] = o
        self.tenant_bytes[o.tenant] += meta.size
        self.dram_policy.inserted(key)
        if self.listener:
            self.listener.stored(DRAM, meta)
        return o

    async def evict_dram(self) -> int:
        """Evict every unleased DRAM object (demoting it to SSD) and wait for the writes; returns the count.
        For operators (drain a node before maintenance) and tests."""
        keys = [k for k, o in self.dram.items() if o.leases == 0]
        for k in keys:
            self._evict_dram(k)
        await self.settle()
        return len(keys)

    async def settle(self) -> None:
        """Wait until background demotions are on disk."""
        while self._bg:
            await asyncio.gather(*list(self._bg))

    # ---- housekeeping ------------------------------------------------------------------------------
    async def expire(self, now: float) -> None:
        """Drop objects whose TTL ran out (a no-op for other policies)."""
        for k in self.dram_policy.expired(now):
            o = self.dram.get(k)
            if o is None:
                continue
            if o.leases:
                o.doomed = True  # the policy forgot it: the last release drops it
                continue
            self.dram_policy.inserted(k)  # _drop_dram forgets it again
            self._drop_dram(k)
        for k in self.ssd_policy.expired(now):
            self.ssd_policy.inserted(k)
            await self._drop_ssd(k)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def _export(self) -> None:
        m = self.metrics
        m.objects.labels(DRAM).set(len(self.dram))
        m.objects.labels(SSD).set(len(self.ssd))
        m.used.labels(DRAM).set(self.alloc.used)
        m.used.labels(SSD).set(self.ssd_used)
        m.capacity.labels(DRAM).set(self.alloc.size)
        m.capacity.labels(SSD).set(self.ssd_capacity)
