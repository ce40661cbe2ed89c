"""The cache node daemon (``kvmesh cache-node``): one per machine, shared by the engines on it.

Serves the control protocol (:mod:`kvmesh.cache.protocol`) on a Unix socket, keeps the tiered store, publishes
what its tiers gain and lose as vLLM-format KV events (``medium`` CPU for DRAM, STORAGE for SSD) on a ZMQ
``ipc://`` endpoint, and exposes Prometheus metrics and a JSON status on HTTP.  Engines whose node is down
keep serving by recomputation (the connector treats every node error as a miss).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvmesh.cache import protocol as p
from kvmesh.cache.chunk import ObjectMeta
from kvmesh.cache.events import EventPublisher, parent_first
from kvmesh.cache.metrics import CacheMetrics
from kvmesh.cache.pool.pool import Pool
from kvmesh.cache.remote import RemoteCache, make_remote
from kvmesh.cache.stats import NodeStats
from kvmesh.cache.store import SSD, DramObject, TieredStore, TierListener
from kvmesh.config import CacheNodeConfig

log = logging.getLogger(__name__)
_reply_enc = msgspec.msgpack.Encoder()


class CacheNode:
    """A node built from its config (``kvmesh cache-node`` and ``kvmesh up`` hand theirs over).  Unset paths and
    the node id are resolved once, here (:func:`resolve_paths`); ``cfg`` is then the resolved config, so
    ``CacheNode(node.cfg, node.run_dir)`` is the same node again (its SSD tier re-indexed).

    Lifecycle: ``await start()`` (re-indexes the SSD tier, then listens), ``await stop()``."""

    def __init__(self, cfg: CacheNodeConfig, run_dir: pathlib.Path = pathlib.Path("run")) -> None:
        self.cfg = cfg = resolve_paths(cfg, run_dir)
        self.run_dir = run_dir
        self.node_id: str = cfg.node_id or ""  # resolved: never empty
        self.socket_path = pathlib.Path(cfg.socket or "")
        ipc = f"ipc://{run_dir.resolve()}"
        self.events_endpoint = f"{ipc}/cache-node-kv.sock" if cfg.events else None
        # a ROUTER for subscribers catching up (vLLM's replay protocol)
        self.events_replay_endpoint = f"{ipc}/cache-node-kv-replay.sock" if cfg.events else None
        self.metrics = CacheMetrics()
        self.events = (EventPublisher(self.events_endpoint, self.events_replay_endpoint)
                       if self.events_endpoint else None)
        listener = TierListener(self.events.stored, self.events.removed) if self.events else None
        self.store = TieredStore(cfg, self.metrics, listener)
        self.pool = Pool(cfg, self.store, self.metrics, self.stats) if cfg.peer_port is not None else None
        self.remote = (RemoteCache(make_remote(cfg.remote, cfg.remote_ttl_s), self.metrics, self.store)
                       if cfg.remote else None)
        self._server: asyncio.AbstractServer | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[asyncio.StreamWriter] = set()
        self.http_port: int | None = None

    async def start(self) -> None:
        sweep_stale_arenas(self.store.arena.path.parent)
        n = await asyncio.get_running_loop().run_in_executor(None, self.store.reindex_ssd)
        if n:
            log.info("cache node %s: %d objects on the SSD tier re-indexed", self.node_id, n)
        if self.events is not None:
            self.events.start()
            # routers learn what survived the restart (and, through the replay buffer, any that join later)
            self.events.announce(SSD, parent_first(o.meta for o in self.store.ssd.values()))
        path = self.socket_path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        os.chmod(path, 0o600)
        self._tasks.add(asyncio.get_running_loop().create_task(self._housekeeping()))
        if self.pool is not None:
            await self.pool.start()
        if self.cfg.http_port is not None:
            app = web.Application()
            app.router.add_get("/metrics", self._metrics)
            app.router.add_get("/status", self._status)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.cfg.http_host, self.cfg.http_port)
            await site.start()
            self.http_port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.pool is not None:
            await self.pool.stop()
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):  # engines see the node go away at once and recompute meanwhile
                w.close()
            await self._server.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.remote is not None:
            await self.remote.close()
        await self.store.close()
        if self.events:
            await self.events.close()
        self.socket_path.unlink(missing_ok=True)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.store.expire(time.monotonic())

    # ---- control protocol --------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn()  # its leases and reservations are released when the engine goes away mid-read
        self._conns.add(writer)
        try:
            while True:
                head = await reader.readexactly(4)
                n = int.from_bytes(head, "big")
                if n > p.MAX_FRAME:
                    break
                body = await reader.readexactly(n)
                try:
                    req = p.request_decoder.decode(body)
                    reply = await self._handle(req, conn)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    reply = p.Failure(f"bad request: {e}")
                out = _reply_enc.encode(reply)
                writer.write(len(out).to_bytes(4, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.store.release([k for k, c in conn.leased.items() for _ in range(c)], [])
            for k in conn.reserved:
                self.store.abort(k)
            self._conns.discard(writer)
            writer.close()

    async def _handle(self, req: p.Request, conn: _Conn) -> p.Reply:
        self.metrics.requests.labels(type(req).__name__.lower()).inc()
        st = self.store
        if isinstance(req, p.Lookup):
            n = st.count_prefix(req.keys)
            if self.pool is not None and n < len(req.keys) and not req.local:
                n += await self.pool.count_remote(req.keys[n:])
            if self.remote is not None and n < len(req.keys) and not req.local:
                n += await self.remote.count(req.keys[n:])
            if n < len(req.keys) and not req.local:
                # the engine reads (Get) only the n chunks found, so the first one missing is counted here:
                # else a cold prompt would count as nothing and the hit rate read 100 %
                self.metrics.misses.inc()
            return p.Count(n)
        if isinstance(req, p.Get):
            return await self._get(req, conn)
        if isinstance(req, p.Release):
            # Only what this connection holds: a client that reconnected to a restarted node must not release
            # leases that other engines hold on the new one.
            held = conn.unlease(req.keys)
            st.release(held, [k for k in req.corrupt if k in held])
            return p.Ok()
        if isinstance(req, p.Put):
            offsets = [st.reserve(it.key, it.size, it.tenant) for it in req.items]
            conn.reserved.update(it.key for it, off in zip(req.items, offsets, strict=True) if off >= 0)
            return p.PutReply(offsets)
        if isinstance(req, p.Commit):
            req.abort = [k for k in req.abort if k in conn.reserved]  # only its own reservations
            conn.reserved.difference_update(req.abort)
            conn.reserved.difference_update(it.key for it in req.items)
            self._commit(req)
            self._adopt_fetched(req.fetched, conn)
            return p.Ok()
        if isinstance(req, p.Hello):
            if not st.arena.path.exists():
                # Someone removed the shared-memory file: engines already attached keep their mapping; new
                # ones cannot attach and serve by recomputation until the node is restarted.
                log.error("cache node %s: arena %s vanished; restart the node", self.node_id,
                          st.arena.path)
                return p.Failure(f"the cache node's arena {st.arena.path} vanished; restart the node")
            return p.HelloReply(str(st.arena.path), st.arena.size, self.node_id)
        if isinstance(req, p.Stats):
            nodes = await self.pool.member_stats() if (req.pool and self.pool is not None) else {}
            return p.StatsReply(self.stats(), nodes)
        if isinstance(req, p.Evict):
            return p.Count(await st.evict_dram())
        return p.Failure(f"unsupported request {type(req).__name__}")

    async def _get(self, req: p.Get, conn: _Conn) -> p.GetReply:
        """Local tiers first; then the pool (fetched here, or planned for the client's direct read); then the
        remote tier."""
        st = self.store

        async def lease(keys: list[bytes]) -> list[DramObject]:
            # on the connection at once: if a later step raises, closing the connection releases them
            got = await st.lease(keys)
            conn.lease(o.meta.key for o in got)
            return got

        objs = await lease(req.keys)
        plan: list[p.Fetch] = []
        if self.pool is not None and req.pool and len(objs) < len(req.keys):
            rest = req.keys[len(objs):]
            if req.fetch_size > 0:
                plan = await self._plan_fetch(rest, req.fetch_size, req.tenant, conn)
            elif await self.pool.fetch_batch(rest):  # lands remote chunks in local DRAM
                objs += await lease(rest)
        if self.remote is not None and len(objs) < len(req.keys) and not plan:
            rest = req.keys[len(objs):]
            if await self.remote.fetch(rest):
                objs += await lease(rest)
        return p.GetReply([p.Extent(o.offset, o.meta.size, o.meta.checksum) for o in objs], plan,
                          remote=self.remote is not None and bool(plan))

    async def _plan_fetch(self, keys: list[bytes], size: int, tenant: str, conn: _Conn) -> list[p.Fetch]:
        """Reserve arena space for the pool chunks the client will read itself (chunks held here after all
        are leased to it); stops at the first key no live peer owns or no space is left for."""
        assert self.pool is not None
        plan: list[p.Fetch] = []
        for k in keys:
            if self.store.holds(k):  # e.g. this node owns a later chunk of the prefix
                objs = await self.store.lease([k])
                if not objs:
                    break
                o = objs[0]
                conn.lease([k])
                plan.append(p.Fetch(o.offset, [], o.meta.size, o.meta.checksum))
                continue
            owners = self.pool.owner_addresses(k)
            off = self.store.reserve_raw(k, size, tenant) if owners else None
            if off is None:
                break
            conn.reserved.add(k)
            plan.append(p.Fetch(off, owners))
        return plan

    def _adopt_fetched(self, metas: list[ObjectMeta], conn: _Conn) -> None:
        """Publish the chunks a client read from the pool into its reservations (verified by the client, as a
        commit's checksum is) and lease them to it."""
        st = self.store
        for meta in metas:
            if meta.key not in conn.reserved:  # only into its own reservations
                continue
            conn.reserved.discard(meta.key)
            if st.writing.get(meta.key, (0, -1))[1] != meta.size or not st.commit(meta):
                st.abort(meta.key)
                continue
            st.pin(meta.key)
            conn.lease([meta.key])
            self.metrics.hits.labels("remote").inc()
            self.metrics.bytes_read.labels("remote").inc(meta.size)
            self.metrics.direct_reads.inc()

    def _commit(self, req: p.Commit) -> None:
        """Publish written chunks, then fan them out: pool owners and the remote tier (both write-behind)."""
        st = self.store
        for k in req.abort:
            st.abort(k)
        for it in req.items:
            size = st.writing.get(it.key, (0, -1))[1]
            meta = ObjectMeta(it.key, size, it.checksum, it.parent, it.token_ids, it.block_size, it.salt)
            if not st.commit(meta) or (self.pool is None and self.remote is None):
                continue
            if self.remote is not None:
                o = st.dram[meta.key]
                with st.arena.view[o.offset:o.offset + meta.size] as view:
                    self.remote.write_behind(meta, view)  # packs (copies) the bytes at once
            if self.pool is not None:
                self.pool.replicate(meta)  # sends straight from the arena, the chunk pinned meanwhile

    def stats(self) -> NodeStats:
        dram, ssd = self.store.tier_use()
        return NodeStats(node_id=self.node_id, dram=dram, ssd=ssd, writing=len(self.store.writing),
                         tenants=self.store.tenant_use(), reads=self.metrics.reads(),
                         pool=self.pool.use() if self.pool is not None else None)

    # ---- HTTP --------------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self.stats()), content_type="application/json")


@dataclass(slots=True)
class _Conn:
    """What one engine connection holds: leases (counted per key) and arena reservations."""
    leased: dict[bytes, int] = field(default_factory=dict)
    reserved: set[bytes] = field(default_factory=set)

    def lease(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            self.leased[k] = self.leased.get(k, 0) + 1

    def unlease(self, keys: Iterable[bytes]) -> list[bytes]:
        """Drop one lease per key; returns the keys this connection did hold."""
        held = []
        for k in keys:
            c = self.leased.get(k, 0)
            if c == 0:
                continue
            held.append(k)
            if c == 1:
                del self.leased[k]
            else:
                self.leased[k] = c - 1
        return held


def sweep_stale_arenas(directory: pathlib.Path) -> int:
    """Remove default-named arenas (``kvmesh-<node>.<pid>``) whose node process is gone — a node killed with
    SIGKILL cannot unlink its shared memory, which would otherwise stay allocated until reboot."""
    n = 0
    for path in directory.glob("kvmesh-*.*"):
        pid = path.suffix[1:]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            n += 1
            log.info("removed the arena of a dead cache node: %s", path)
        except PermissionError:  # alive, another user's
            pass
    return n


def resolve_paths(cfg: CacheNodeConfig, run_dir: pathlib.Path) -> CacheNodeConfig:
    """``cfg`` with its unset paths and node id filled in: socket and SSD directory under ``run_dir``, the
    arena in /dev/shm (``run_dir`` without it), a random node id.  Resolving a resolved config changes
    nothing."""
    node_id = cfg.node_id or uuid.uuid4().hex[:8]
    shm = pathlib.Path("/dev/shm")
    # default name kvmesh-<node>.<pid>: a later node can tell (and remove) an arena whose owner died
    arena = cfg.arena_path or str((shm if shm.is_dir() else run_dir) / f"kvmesh-{node_id}.{os.getpid()}")
    return cfg.model_copy(update={
        "node_id": node_id, "arena_path": arena,
        "socket": cfg.socket or str(run_dir / "cache-node.sock"),
        "ssd_dir": cfg.ssd_dir or str(run_dir / "cache-ssd")})
