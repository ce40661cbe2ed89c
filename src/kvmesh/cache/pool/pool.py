"""One node's part in the cache pool.

Placement: a chunk's *owners* are the first R live nodes on the consistent-hash ring.  A node that commits a
chunk keeps a local copy (its engines read it from DRAM) and pushes it to the owners (write-behind).  A
local miss asks the owners (the first that answers; a dead one is skipped at once, so with R ≥ 2 a node
kill costs no read), and a fetched chunk lands straight in the local arena as a local copy.  When
membership changes, each holder pushes the chunks whose owner set gained a node: ~1/N of the keys move, and
reads keep working meanwhile (they fall back to the previous ring's owners).

All methods run on the node's event loop.  Peer trouble is never an error to the engine: a miss.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from kvmesh.cache.chunk import ObjectMeta
from kvmesh.cache.keys import prefix_len, tenant_of
from kvmesh.cache.metrics import CacheMetrics
from kvmesh.cache.pool.membership import Membership, make_membership
from kvmesh.cache.pool.peer import (
    PeerClient,
    PeerError,
    PGet,
    PGetReply,
    PHas,
    PHasReply,
    POk,
    PPut,
    PStats,
    PStatsReply,
    discard,
    encode,
    recv_frame,
    recv_into,
    req_decoder,
    tune,
)
from kvmesh.cache.pool.ring import Ring
from kvmesh.cache.stats import NodeStats, PoolUse
from kvmesh.cache.store import DramObject, TieredStore

if TYPE_CHECKING:
    from kvmesh.config import CacheNodeConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Member:
    node_id: str
    host: str
    port: int
    capacity: int = 0
    alive: bool = False
    client: PeerClient | None = None


def parse_peers(specs: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    """Static pool members, ``id=host:port`` each (as validated by ``CacheNodeConfig.peers``)."""
    peers = {}
    for spec in specs:
        nid, _, addr = spec.partition("=")
        host, _, port = addr.rpartition(":")
        peers[nid] = (host, int(port))
    return peers


class Pool:
    """The pool part of a node configured with ``peer_port`` (``node_id`` resolved); ``stats`` builds the
    node's :class:`NodeStats`, which peers ask for as a health check."""

    def __init__(self, cfg: CacheNodeConfig, store: TieredStore, metrics: CacheMetrics,
                 stats: Callable[[], NodeStats], health_interval_s: float = 1.0) -> None:
        if cfg.node_id is None:
            raise ValueError("a pooled node needs a node_id; resolve the config first")
        self.cfg = cfg
        # read once: the read and write paths consult these per chunk
        self.node_id: str = cfg.node_id
        self.replicas = cfg.replicas
        self.health_interval_s = health_interval_s
        self.store = store
        self.metrics = metrics
        self.node_stats = stats
        self.members: dict[str, Member] = {
            nid: Member(nid, h, p) for nid, (h, p) in parse_peers(cfg.peers).items() if nid != self.node_id}
        self.ring = Ring.build({self.node_id: self.capacity()})
        self.previous: Ring | None = None  # during a rebalance, reads also try the old owners
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[socket.socket] = set()
        self.port = cfg.peer_port or 0
        self.membership: Membership | None = None  # None: the static peer list

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._listener = socket.create_server((self.cfg.peer_host, self.port), backlog=128)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop(self._listener))
        self.membership = make_membership(self.cfg)
        if self.membership is not None:
            await self.membership.join(self.node_id, self.cfg.peer_host, self.port, self.capacity())
            self._spawn(self.membership.run(self._members_changed))
        await self.check_members()
        self._spawn(self._health_loop())

    def _members_changed(self, peers: dict[str, tuple[str, int]]) -> None:
        self.set_members(peers)
        self._spawn(self.check_members())

    async def stop(self) -> None:
        if self.membership is not None:
            await self.membership.leave()  # peers drop this node at once instead of after the lease TTL
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        # the handlers unregister their sockets from the loop as they unwind; close the sockets after
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for c in list(self._conns):
            c.close()
        for m in self.members.values():
            if m.client:
                m.client.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- membership ----------------------------------------------------------------------------------
    def set_members(self, peers: dict[str, tuple[str, int]]) -> None:
        """Replace the member list (from a discovery backend); health checks decide who is live."""
        for nid in list(self.members):
            if nid not in peers:
                m = self.members.pop(nid)
                if m.client:
                    m.client.close()
        for nid, (h, p) in peers.items():
            old = self.members.get(nid)
            if old is not None and (old.host, old.port) != (h, p):
                # back under the same id at a new address (a restarted pod): the old one is unreachable
                self.members.pop(nid)
                if old.client:
                    old.client.close()
            if nid != self.node_id and nid not in self.members:
                self.members[nid] = Member(nid, h, p)
        self._rebuild()  # departures leave the ring now; arrivals join once a health check reaches them

    async def _health_loop(self) -> None:
        started = asyncio.get_running_loop().time()
        while True:
            # Right after start, peers are often still starting too: look again soon so rings converge fast.
            young = asyncio.get_running_loop().time() - started < 10
            missing = any(not m.alive for m in self.members.values())
            await asyncio.sleep(min(self.health_interval_s, 0.2) if young and missing else self.health_interval_s)
            await self.check_members()

    def capacity(self) -> int:
        """This node's weight on the ring: its local tiers' bytes."""
        return self.store.alloc.size + self.store.ssd_capacity

    def use(self) -> PoolUse:
        return PoolUse(members=len(self.ring.nodes), replicas=self.replicas)

    async def member_stats(self) -> dict[str, NodeStats]:
        """Every live member's stats (for ``kvmesh cache status``)."""
        async def one(m: Member) -> tuple[str, NodeStats | None]:
            if m.client is None or not m.alive:
                return m.node_id, None
            try:
                r = await m.client.call(PStats())
            except PeerError:
                return m.node_id, None
            return m.node_id, (r.stats if isinstance(r, PStatsReply) else None)

        got = await asyncio.gather(*(one(m) for m in self.members.values()))
        return {nid: st for nid, st in got if st is not None}

    async def check_members(self) -> None:
        async def probe(m: Member) -> None:
            if m.client is None:
                m.client = PeerClient(m.host, m.port, timeout_s=2.0)
            try:
                r = await m.client.call(PStats())
            except PeerError:
                m.alive = False
                return
            if isinstance(r, PStatsReply):
                m.alive = True
                m.capacity = r.stats.capacity_bytes

        await asyncio.gather(*(probe(m) for m in self.members.values()))
        self._rebuild()

    def mark_dead(self, nid: str) -> None:
        m = self.members.get(nid)
        if m is not None and m.alive:
            log.warning("cache pool: peer %s unreachable; taken out of the ring", nid)
            m.alive = False
            self._rebuild()

    def _rebuild(self) -> None:
        caps = {self.node_id: self.capacity()}
        caps.update({m.node_id: m.capacity or 1 for m in self.members.values() if m.alive})
        if frozenset(caps) == self.ring.nodes:
            return
        old, self.ring = self.ring, Ring.build(caps)
        self.previous = old
        log.info("cache pool: members now %s", sorted(caps))
        self._spawn(self._rebalance(old, self.ring))

    def owners(self, key: bytes) -> list[str]:
        own = self.ring.owners(key, self.replicas)
        if self.previous is not None:
            own += [n for n in self.previous.owners(key, self.replicas) if n not in own]
        return own

    def owner_addresses(self, key: bytes) -> list[str]:
        """``host:port`` of the live peers that own ``key``, in the order to ask them (for direct reads)."""
        out = []
        for nid in self.owners(key):
            m = self.members.get(nid)
            if m is not None and m.alive:
                out.append(f"{m.host}:{m.port}")
        return out

    # ---- reads ---------------------------------------------------------------------------------------
    async def count_remote(self, keys: list[bytes]) -> int:
        """How many of ``keys``, from the first, some owner holds (one round trip per owner, in parallel)."""
        return prefix_len(await self._has(keys))

    async def _has(self, keys: list[bytes]) -> list[bool]:
        held = [self.store.holds(k) for k in keys]
        pending = [i for i, h in enumerate(held) if not h]
        for attempt in range(self.replicas + 2):
            by_node: dict[str, list[int]] = {}
            for i in pending:
                own = [n for n in self.owners(keys[i]) if n != self.node_id and self._alive(n)]
                if attempt < len(own):
                    by_node.setdefault(own[attempt], []).append(i)
            if not by_node:
                break
            replies = await asyncio.gather(*(self._ask_has(n, [keys[i] for i in ix]) for n, ix in by_node.items()))
            pending = []
            for (_, ix), rep in zip(by_node.items(), replies, strict=True):
                if rep is None:
                    pending += ix  # unreachable: ask the next owner
                    continue
                for i, h in zip(ix, rep, strict=True):
                    held[i] = h
                    if not h:
                        pending.append(i)  # maybe a replica has it (e.g. during a rebalance)
        return held

    def _alive(self, nid: str) -> bool:
        m = self.members.get(nid)
        return m is not None and m.alive

    async def _ask_has(self, nid: str, keys: list[bytes]) -> list[bool] | None:
        m = self.members.get(nid)  # set_members may have removed it since it was chosen
        if m is None or m.client is None:
            return None
        try:
            r = await m.client.call(PHas(keys))
        except PeerError:
            self.mark_dead(nid)
            return None
        return r.held if isinstance(r, PHasReply) else None

    async def fetch(self, keys: list[bytes]) -> int:
        """Copy the longest remotely held prefix of ``keys`` into the local DRAM tier; returns its length."""
        got = 0
        for k in keys:
            if self.store.holds(k):  # on SSD too: the lease after promotes it (the store refuses a 2nd copy)
                got += 1
                continue
            if not await self._fetch_one(k):
                break
            got += 1
        return got

    async def _fetch_one(self, key: bytes) -> bool:
        for nid in self.owners(key):
            if nid == self.node_id or not self._alive(nid):
                continue
            if await self._fetch_from(nid, [key]) == 1:
                return True
        self.metrics.misses_remote.inc()
        return False

    async def fetch_batch(self, keys: list[bytes]) -> int:
        """Like :meth:`fetch`, one pipelined request per owner (the batch path for long prefixes)."""
        todo = [k for k in keys if not self.store.holds(k)]
        by_node: dict[str, list[bytes]] = {}
        for k in todo:
            own = [n for n in self.owners(k) if n != self.node_id and self._alive(n)]
            if own:
                by_node.setdefault(own[0], []).append(k)
        await asyncio.gather(*(self._fetch_from(n, ks) for n, ks in by_node.items()))
        return await self.fetch(keys)  # whatever the first owners missed: replicas, one by one

    async def _fetch_from(self, nid: str, keys: list[bytes]) -> int:
        m = self.members.get(nid)  # set_members may have removed it since it was chosen
        if m is None or m.client is None:
            return 0
        landed: list[tuple[ObjectMeta, int]] = []

        def sink(meta: ObjectMeta) -> memoryview | None:
            off = self.store.reserve_raw(meta.key, meta.size, tenant_of(meta.salt))
            if off is None:
                return None
            landed.append((meta, off))
            return self.store.arena.view[off:off + meta.size]

        try:
            r = await m.client.call(PGet(keys), sink=sink)
        except PeerError:
            for meta, off in landed:
                self.store.unreserve_raw(meta.key, off, meta.size)
            self.mark_dead(nid)
            return 0
        n = 0
        for meta, off in landed:
            if self.store.adopt(meta, off):  # verifies the checksum
                n += 1
                self.metrics.hits.labels("remote").inc()
                self.metrics.bytes_read.labels("remote").inc(meta.size)
        return n if isinstance(r, PGetReply) else 0

    # ---- writes --------------------------------------------------------------------------------------
    def replicate(self, meta: ObjectMeta) -> None:
        """Push a chunk just committed here to its other owners (background), straight from the arena."""
        for n in self.ring.owners(meta.key, self.replicas):
            if n != self.node_id and self.store.pin(meta.key) is not None:
                self._spawn(self._push_pinned(n, meta))

    async def _push_pinned(self, nid: str, meta: ObjectMeta) -> None:
        o = self.store.dram[meta.key]  # pinned: neither evicted nor moved until released
        view = self.store.arena.view[o.offset:o.offset + meta.size]
        try:
            await self._push(nid, meta, view)
        finally:
            view.release()
            self.store.release([meta.key], [])

    async def _push(self, nid: str, meta: ObjectMeta, data: bytes | memoryview) -> bool:
        m = self.members.get(nid)
        if m is None or m.client is None:
            return False
        try:
            r = await m.client.call(PPut(meta), payload=data)
        except PeerError:
            self.mark_dead(nid)
            return False
        self.metrics.replicated.inc()
        return isinstance(r, POk)

    async def _rebalance(self, old: Ring, new: Ring) -> None:
        """Push the chunks whose owner set gained nodes; this node pushes those it is the first surviving
        old owner of (so each chunk moves once)."""
        moved = 0
        try:
            for key in list(self.store.dram) + list(self.store.ssd):
                before = old.owners(key, self.replicas)
                after = new.owners(key, self.replicas)
                gained = [n for n in after if n not in before and n != self.node_id]
                survivors = [n for n in before if n in new.nodes]
                if not gained or (survivors and survivors[0] != self.node_id):
                    continue
                data = await self._read_local(key)
                if data is None:
                    continue
                meta, payload = data
                for n in gained:
                    moved += await self._push(n, meta, payload)
        finally:
            if self.ring is new:
                self.previous = None
        if moved:
            log.info("cache pool: rebalance pushed %d chunks", moved)

    async def _read_local(self, key: bytes) -> tuple[ObjectMeta, bytes] | None:
        objs = await self.store.lease([key])
        if not objs:
            return None
        o = objs[0]
        try:
            return o.meta, bytes(self.store.arena.view[o.offset:o.offset + o.meta.size])
        finally:
            self.store.release([key], [])

    # ---- serving peers -------------------------------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            tune(conn)
            self._spawn(self._serve(conn))

    async def _serve(self, sock: socket.socket) -> None:
        """One peer connection: requests one at a time, replies in order; payloads straight to and from the
        arena.  A protocol error or a closed connection ends it (the peer reconnects)."""
        loop = asyncio.get_running_loop()
        self._conns.add(sock)
        try:
            while True:
                req = req_decoder.decode(await recv_frame(sock))
                if isinstance(req, PHas):
                    await loop.sock_sendall(sock, _frame(PHasReply([self.store.holds(k) for k in req.keys])))
                elif isinstance(req, PGet):
                    await self._serve_get(req, sock)
                elif isinstance(req, PPut):
                    if not 0 <= req.meta.size <= self.store.alloc.size:
                        break  # no chunk is larger than the arena: a broken or hostile peer
                    await loop.sock_sendall(sock, _frame(POk(await self._receive_put(req.meta, sock))))
                elif isinstance(req, PStats):
                    await loop.sock_sendall(sock, _frame(PStatsReply(self.node_stats())))
        except (ConnectionError, OSError, msgspec.DecodeError):
            pass  # PeerError is a ConnectionError
        finally:
            self._conns.discard(sock)
            sock.close()

    async def _receive_put(self, meta: ObjectMeta, sock: socket.socket) -> bool:
        """Receive a pushed chunk straight into reserved arena space; True when held afterwards."""
        if self.store.holds(meta.key):
            await discard(sock, meta.size)
            return True
        off = self.store.reserve_raw(meta.key, meta.size, tenant_of(meta.salt))
        if off is None:
            await discard(sock, meta.size)
            return False
        try:
            await recv_into(sock, self.store.arena.view[off:off + meta.size])
        except BaseException:
            self.store.unreserve_raw(meta.key, off, meta.size)
            raise
        return self.store.adopt(meta, off)  # verifies the checksum

    async def _serve_get(self, req: PGet, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        objs: list[DramObject] = await self.store.lease(req.keys)
        try:
            await loop.sock_sendall(sock, _frame(PGetReply([o.meta for o in objs])))
            for o in objs:  # the leases hold the bytes until the kernel has them
                await loop.sock_sendall(sock, self.store.arena.view[o.offset:o.offset + o.meta.size])
        finally:
            self.store.release([o.meta.key for o in objs], [])


def _frame(msg: msgspec.Struct) -> bytes:
    return encode(msg)
