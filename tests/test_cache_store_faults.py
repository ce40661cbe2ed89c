"""Races and faults of the cache node's store and pool found in review: a real TieredStore (shared-memory arena,
SSD directory), real CacheNodes and pools on loopback.  Ordering is forced with events and tasks: a gated SSD
call parks its executor thread until the test lets it go, and tells the loop when it got there."""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from kvmesh.cache.chunk import ObjectMeta, checksum
from kvmesh.cache.client import NodeClient
from kvmesh.cache.metrics import CacheMetrics
from kvmesh.cache.node import CacheNode
from kvmesh.cache.pool.pool import Pool
from kvmesh.cache.stats import NodeStats, TierUse
from kvmesh.cache.store import TieredStore
from tests.helpers import LoopThread
from tests.test_cache_node import node_config, put

MB = 1 << 20


def commit(st: TieredStore, key: bytes, data: bytes) -> None:
    off = st.reserve(key, len(data))
    assert off >= 0
    st.arena.view[off:off + len(data)] = data
    assert st.commit(ObjectMeta(key, len(data), checksum(data)))


@asynccontextmanager
async def store(tmp: pathlib.Path, **kw: Any) -> AsyncIterator[TieredStore]:
    st = TieredStore(node_config(tmp, **kw), CacheMetrics())
    try:
        yield st
    finally:
        await st.close()


class Gate:
    """Wraps a blocking SSD call: the call signals ``entered`` on the loop, then waits for ``open``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.loop = fn, asyncio.get_running_loop()
        self.entered, self.go = asyncio.Event(), threading.Event()

    def __call__(self, *a: Any) -> Any:
        self.loop.call_soon_threadsafe(self.entered.set)
        self.go.wait()
        return self.fn(*a)


@contextmanager
def gated(obj: object, name: str) -> Iterator[Gate]:
    g = Gate(getattr(obj, name))
    setattr(obj, name, g)
    try:
        yield g
    finally:
        g.go.set()  # never leave an executor thread parked


# ---- 1. a promotion must never replace a DRAM object --------------------------------------------------
def test_no_second_copy_lands_while_a_promotion_reads_the_ssd(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with store(tmp_path) as st:
            k, d = b"a" * 16, os.urandom(MB)
            commit(st, k, d)
            await st.evict_dram()
            assert st.disk is not None and k in st.ssd and k not in st.dram
            with gated(st.disk, "read_into") as g:
                promoting = asyncio.create_task(st.lease([k]))  # engine 1
                await g.entered.wait()
                assert await st.lease([k]) == []  # engine 2: busy, a miss; it asks the pool, which lands...
                assert st.reserve_raw(k, MB) is None  # ...nothing: the store already holds the key
                assert st.put_bytes(ObjectMeta(k, MB, checksum(d)), d)  # held already: nothing written
                assert st.reserve(k, MB) == -1
                g.go.set()
                [o] = await promoting
            assert st.dram[k] is o and o.leases == 1
            assert st.alloc.used == MB and st.tenant_bytes[""] == MB and not st.writing
            assert bytes(st.arena.view[o.offset:o.offset + MB]) == d
            st.release([k], [])
            assert o.leases == 0

    asyncio.run(main())


def test_a_doomed_promoted_object_is_a_miss_not_promoted_over(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with store(tmp_path) as st:
            k = b"b" * 16
            commit(st, k, os.urandom(MB))
            await st.evict_dram()
            [a] = await st.lease([k])  # promoted: in DRAM and on SSD
            await st.lease([k])
            st.release([k], [k])  # one reader found it corrupt: doomed, the other still reads
            assert a.doomed and a.leases == 1
            assert await st.lease([k]) == []  # a miss: no second object over the one being read
            assert st.dram[k] is a and st.alloc.used == MB and st.tenant_bytes[""] == MB
            st.release([k], [])  # the last reader goes: dropped, its extent freed once
            assert k not in st.dram and st.alloc.used == 0 and st.tenant_bytes[""] == 0
            [fresh] = await st.lease([k])  # the SSD copy is promoted again, cleanly
            assert fresh is not a and not fresh.doomed and st.alloc.used == MB

    asyncio.run(main())


def test_a_doomed_undemoted_object_is_a_miss_not_copied_over(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with store(tmp_path, dram_mib=2) as st:
            k = b"c" * 16
            commit(st, k, os.urandom(MB))
            assert st.disk is not None
            with gated(st.disk, "write") as g:
                commit(st, b"d" * 16, os.urandom(MB))
                commit(st, b"e" * 16, os.urandom(MB))  # k leaves DRAM; its SSD write is parked
                await g.entered.wait()
                assert k not in st.dram and k in st._demoting
                [a] = await st.lease([k])  # copied back from the write-behind buffer
                await st.lease([k])
                st.release([k], [k])
                assert a.doomed and await st.lease([k]) == []
                assert st.dram[k] is a and st.alloc.used == 2 * MB
                st.release([k], [])
                assert k not in st.dram and st.alloc.used == MB

    asyncio.run(main())


# ---- 2. a TTL expiry under a reader ------------------------------------------------------------------------
def test_ttl_expiry_of_a_leased_chunk_drops_it_at_the_last_release(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with store(tmp_path, dram_mib=4, ssd_mib=0, eviction="ttl", ttl_s=60.0) as st:
            k = b"t" * 16
            commit(st, k, os.urandom(MB))
            [o] = await st.lease([k])
            await st.expire(time.monotonic() + 3600)  # expires while leased: kept for its reader
            assert st.dram[k] is o
            assert await st.lease([k]) == []  # expired: no new reader
            st.release([k], [])
            assert k not in st.dram and st.alloc.used == 0 and st.tenant_bytes[""] == 0

    asyncio.run(main())


# ---- 3. the write-behind backlog is bounded --------------------------------------------------------------
def test_a_stalled_ssd_bounds_the_demotion_backlog(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with store(tmp_path, dram_mib=8, ssd_mib=1024) as st:
            assert st.disk is not None
            with gated(st.disk, "write") as g:
                for i in range(24):  # 16 chunks leave an 8 MiB DRAM tier while the SSD is stuck
                    commit(st, i.to_bytes(16, "big"), os.urandom(MB))
                    backlog = sum(len(d) for _, d in st._demoting.values())
                    assert backlog <= 8 * MB
                assert st.demote_dropped == 8
                assert st.metrics.errors.labels("demote_backlog_full")._value.get() == 8
                g.go.set()
                await st.settle()
            assert len(st.ssd) == 8 and len(st.dram) == 8 and not st._demoting and st._demoting_bytes == 0

    asyncio.run(main())


# ---- 4. leases taken before a failing step stay on the connection ------------------------------------------
def test_get_that_fails_after_leasing_releases_on_disconnect(tmp_path: pathlib.Path,
                                                            loop_thread: LoopThread) -> None:
    n = CacheNode(node_config(tmp_path, peer_port=0, node_id="solo"), tmp_path)
    loop_thread.run(n.start())
    c = NodeClient(n.socket_path, retry_s=0.0)
    try:
        k = b"g" * 16
        assert put(c, k, os.urandom(MB))
        assert n.pool is not None

        async def broken(keys: list[bytes]) -> int:
            raise KeyError("a peer removed mid-fetch")

        n.pool.fetch_batch = broken  # type: ignore[method-assign]
        assert c.get([k, b"h" * 16]) == []  # the node's handler raised after leasing k: connection closed
        c2 = NodeClient(n.socket_path)
        c2.stats()  # a round trip after the first connection's cleanup ran
        c2.close()
        assert n.store.dram[k].leases == 0
    finally:
        c.close()
        loop_thread.run(n.stop())


def _stats() -> NodeStats:
    return NodeStats(node_id="a", dram=TierUse(), ssd=TierUse())


@asynccontextmanager
async def peer_node(tmp: pathlib.Path, nid: str) -> AsyncIterator[CacheNode]:
    """A started pooled node (``tmp`` made by the test: no blocking file calls on the loop)."""
    b = CacheNode(node_config(tmp, ssd_mib=0, peer_port=0, node_id=nid), tmp)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@asynccontextmanager
async def bare_pool(tmp: pathlib.Path, peers: tuple[str, ...]) -> AsyncIterator[Pool]:
    """Node a's pool, not started (no listener, no health loop): the test drives its membership."""
    cfg = node_config(tmp, ssd_mib=0, peer_port=0, node_id="a", peers=peers)
    st = TieredStore(cfg, CacheMetrics())
    pool = Pool(cfg, st, st.metrics, _stats)
    try:
        yield pool
    finally:
        await pool.stop()
        await st.close()


def test_a_peer_removed_before_its_fetch_starts_is_a_miss(tmp_path: pathlib.Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()

    async def main() -> None:
        async with peer_node(tmp_path / "b", "b") as b:
            assert b.pool is not None
            async with bare_pool(tmp_path / "a", (f"b=127.0.0.1:{b.pool.port}",)) as pool:
                await pool.check_members()
                assert pool.ring.nodes == frozenset({"a", "b"})
                k = next(i.to_bytes(16, "big") for i in range(1000) if pool.owners(i.to_bytes(16, "big"))[0] == "b")
                fetching = asyncio.create_task(pool.fetch_batch([k]))  # picks b, then spawns the fetch from b
                asyncio.get_running_loop().call_soon(pool.set_members, {})  # b leaves before that fetch runs
                assert await fetching == 0
                assert await pool._ask_has("b", [k]) is None

    asyncio.run(main())


# ---- 5. a peer back under its id at a new address ---------------------------------------------------------
def test_a_peer_back_at_a_new_address_replaces_the_old_member(tmp_path: pathlib.Path) -> None:
    for d in ("a", "b1", "b2"):
        (tmp_path / d).mkdir()

    async def main() -> None:
        async with peer_node(tmp_path / "b1", "b") as b1:
            assert b1.pool is not None
            async with bare_pool(tmp_path / "a", (f"b=127.0.0.1:{b1.pool.port}",)) as pool:
                await pool.check_members()
                old = pool.members["b"]
                assert old.alive and old.client is not None
                open_socks = list(old.client._open)
                async with peer_node(tmp_path / "b2", "b") as b2:  # b restarted elsewhere
                    assert b2.pool is not None
                    pool.set_members({"b": ("127.0.0.1", b2.pool.port)})
                    assert all(s.fileno() == -1 for s in open_socks) and not old.client._open
                    await pool.check_members()
                    m = pool.members["b"]
                    assert m is not old and m.port == b2.pool.port and m.alive
                    assert pool.ring.nodes == frozenset({"a", "b"})

    asyncio.run(main())


async def _quota_counts_reservations(tmp: pathlib.Path) -> None:
    async with store(tmp, dram_mib=16, ssd_mib=0, tenant_quota_mib={"alpha": 2}) as st:
        offs = [st.reserve(bytes([i + 1]) * 16, MB, "alpha") for i in range(6)]  # one batched save's worth
        assert sum(o >= 0 for o in offs) == 2, "reservations in flight count against the quota"
        st.abort(bytes([1]) * 16)  # a reservation given back frees its share of the quota
        assert st.reserve(bytes([9]) * 16, MB, "alpha") >= 0
        assert st.tenant_reserved["alpha"] == 2 * MB and st.tenant_bytes["alpha"] == 0


def test_a_tenant_quota_counts_reservations_not_yet_committed(tmp_path: pathlib.Path) -> None:
    asyncio.run(_quota_counts_reservations(tmp_path))
