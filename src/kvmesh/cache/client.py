"""Blocking client of a cache node, for engine processes (the vLLM connector) and benchmarks.

Every call is safe to make from any thread (one lock per client).  Contract: the client never raises for
node trouble — a node that is down, restarting or answering garbage reads as "holds nothing" and refuses
writes; the client reconnects after ``retry_s``.  So an engine whose node is down keeps serving by
recomputation.  Payload bytes go through the shared-memory arena, never through the socket.
"""

from __future__ import annotations

import logging
import pathlib
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from kvmesh.cache import protocol as p
from kvmesh.cache.arena import Arena
from kvmesh.cache.chunk import ObjectMeta, checksum
from kvmesh.cache.pool.direct import PeerReader
from kvmesh.cache.stats import NodeStats

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    key: bytes
    view: memoryview
    checksum: bytes
    checked: bool = False  # verified already (a direct read checks what it received)

    def verify(self) -> bool:
        return self.checked or checksum(self.view) == self.checksum


class NodeClient:
    def __init__(self, socket_path: str | pathlib.Path, timeout_s: float = 5.0, retry_s: float = 1.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._sock: socket.socket | None = None
        self._arena: Arena | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False  # an outage is logged once, when it starts, and once when it ends
        self._unread = 0  # replies to fire-and-forget requests (release) not read yet
        self.node_id = ""
        self.errors = 0
        self._peers = PeerReader(timeout_s, retry_s)

    # ---- connection ----------------------------------------------------------------------------------
    def _connect(self) -> None:
        self._unread = 0
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        s.connect(self.socket_path)
        self._sock = s
        hello = self._roundtrip(p.Hello())
        if isinstance(hello, p.Failure):
            raise ConnectionError(hello.message)
        if not isinstance(hello, p.HelloReply):
            raise ConnectionError("cache node did not say hello")
        if self._arena is not None:
            self._arena.close()
        self._arena = Arena(pathlib.Path(hello.arena_path), hello.arena_size, create=False)
        self.node_id = hello.node_id

    def _roundtrip(self, msg: msgspec.Struct, wait: bool = True) -> p.Reply:
        assert self._sock is not None
        self._sock.sendall(p.frame(msg))
        if not wait:  # pipelined: its reply is read (and dropped) before the next request's
            self._unread += 1
            return p.Ok()
        while self._unread:
            p.recv_frame(self._sock)
            self._unread -= 1
        reply: p.Reply = p.reply_decoder.decode(p.recv_frame(self._sock))
        return reply

    def _call(self, msg: msgspec.Struct, wait: bool = True) -> p.Reply | None:
        with self._lock:
            if self._sock is None:
                if time.monotonic() < self._down_until:
                    return None
                try:
                    self._connect()
                except (OSError, ConnectionError, msgspec.DecodeError) as e:
                    self._fail(e)
                    return None
                if self._down:
                    log.warning("cache node at %s is back", self.socket_path)
                    self._down = False
            try:
                reply = self._roundtrip(msg, wait)
            except (OSError, ConnectionError, msgspec.DecodeError) as e:
                self._fail(e)
                return None
            if isinstance(reply, p.Failure):
                log.warning("cache node refused %s: %s", type(msg).__name__, reply.message)
                return None
            return reply

    def _fail(self, e: BaseException) -> None:
        self.errors += 1
        if not self._down:
            log.warning("cache node at %s unavailable (%s); serving without it, retrying every %.1fs",
                        self.socket_path, e, self.retry_s)
            self._down = True
        self._down_until = time.monotonic() + self.retry_s
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unread = 0

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._arena is not None:
                self._arena.close()
                self._arena = None
        self._peers.close()

    # ---- operations ----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], local: bool = False) -> int:
        """How many of ``keys``, from the first, the node (``local``: itself, not its pool) holds; 0 when it
        is unreachable."""
        if not keys:
            return 0
        r = self._call(p.Lookup(list(keys), local))
        return r.n if isinstance(r, p.Count) else 0

    def get(self, keys: Sequence[bytes], fetch_size: int = 0, tenant: str = "") -> list[Lease]:
        """Lease the longest held prefix of ``keys``; call :meth:`release` with the same keys when copied.

        ``fetch_size``: the chunks' size in bytes, when known (the connector knows it from the KV layout).
        Then chunks that only pool peers hold are read from them directly by this process (one network hop;
        :mod:`kvmesh.cache.pool.direct`) into space the node reserved, and become the node's local copies.
        Without it, the node fetches them itself (two hops)."""
        r = self._call(p.Get(list(keys), fetch_size, tenant))
        arena = self._arena
        if not isinstance(r, p.GetReply) or arena is None:
            return []
        v = arena.view
        out = [Lease(k, v[e.offset:e.offset + e.size], e.checksum) for k, e in zip(keys, r.extents, strict=False)]
        if r.fetch:
            out += self._read_direct(keys[len(out):len(out) + len(r.fetch)], r.fetch, fetch_size, v)
            if r.remote and len(out) < len(keys):  # what the pool lacks may sit in the node's remote tier
                r2 = self._call(p.Get(list(keys[len(out):]), pool=False))
                if isinstance(r2, p.GetReply) and self._arena is arena:
                    out += [Lease(k, v[e.offset:e.offset + e.size], e.checksum)
                            for k, e in zip(keys[len(out):], r2.extents, strict=False)]
        return out

    def _read_direct(self, keys: Sequence[bytes], plan: list[p.Fetch], size: int, arena: memoryview) -> list[Lease]:
        """Read planned chunks from their owners (the next owner for what one lacks or when it fails), verify
        them, and give the verified prefix to the node as leased local copies; free the rest."""
        local = [not f.owners for f in plan]  # leased to us already
        metas: list[ObjectMeta | None] = [None] * len(plan)
        pending = [i for i, f in enumerate(plan) if f.owners]
        for attempt in range(max(len(f.owners) for f in plan)):
            by_addr: dict[str, list[int]] = {}
            for i in pending:
                if attempt < len(plan[i].owners):
                    by_addr.setdefault(plan[i].owners[attempt], []).append(i)
            pending = []
            for addr, ix in by_addr.items():
                offsets = [plan[i].offset for i in ix]

                def sink(j: int, m: ObjectMeta, offsets: list[int] = offsets) -> memoryview | None:
                    return arena[offsets[j]:offsets[j] + size] if m.size == size else None

                got = self._peers.get(addr, [keys[i] for i in ix], sink)
                for j, i in enumerate(ix):
                    if j < len(got) and got[j].size == size:
                        metas[i] = got[j]
                    else:
                        pending.append(i)
            if not pending:
                break
        out: list[Lease] = []
        for i, (f, m) in enumerate(zip(plan, metas, strict=True)):
            if local[i]:
                out.append(Lease(keys[i], arena[f.offset:f.offset + f.size], f.checksum))
                continue
            view = arena[f.offset:f.offset + size]
            if m is None or checksum(view) != m.checksum:
                break
            out.append(Lease(m.key, view, m.checksum, checked=True))
        fetched = [m for m in metas[:len(out)] if m is not None]
        rest = range(len(out), len(plan))
        self._call(p.Commit([], [keys[i] for i in rest if not local[i]], fetched), wait=False)
        unused = [keys[i] for i in rest if local[i]]
        if unused:
            self._call(p.Release(unused), wait=False)
        return out

    def release(self, leases: Sequence[Lease], corrupt: Sequence[bytes] = ()) -> None:
        keys = [le.key for le in leases]
        for le in leases:
            le.view.release()
        if keys:
            self._call(p.Release(keys, list(corrupt)), wait=False)  # nothing to wait for: saves a round trip

    def reserve(self, items: Sequence[tuple[bytes, int]], tenant: str = "") -> list[memoryview | None]:
        """Arena space for each (key, size): a writable view, or None (held already, refused, or node down)."""
        r = self._call(p.Put([p.PutItem(k, n, tenant) for k, n in items]))
        if not isinstance(r, p.PutReply) or self._arena is None:
            return [None] * len(items)
        v = self._arena.view
        return [v[off:off + n] if off >= 0 else None for off, (_, n) in zip(r.offsets, items, strict=True)]

    def commit(self, items: Sequence[p.CommitItem], abort: Sequence[bytes] = (), wait: bool = True) -> bool:
        """Publish written chunks.  ``wait=False`` pipelines the request (no round trip; this client's later
        requests still see the chunks, since the node handles a connection's requests in order); True then
        only means the request was sent."""
        return isinstance(self._call(p.Commit(list(items), list(abort)), wait), p.Ok)

    def evict_dram(self) -> int:
        """Ask the node to demote its DRAM tier to SSD; returns the number of objects moved."""
        r = self._call(p.Evict())
        return r.n if isinstance(r, p.Count) else 0

    def stats(self) -> NodeStats | None:
        """The node's stats; None when it is unreachable."""
        r = self._call(p.Stats())
        return r.stats if isinstance(r, p.StatsReply) else None

    def pool_stats(self) -> dict[str, NodeStats]:
        """This node's stats and every live pool member's, by node id ({} when the node is unreachable)."""
        r = self._call(p.Stats(pool=True))
        if not isinstance(r, p.StatsReply):
            return {}
        return {r.stats.node_id: r.stats, **r.nodes}
