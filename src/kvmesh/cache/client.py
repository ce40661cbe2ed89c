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
from kvmesh.cache.ssd import checksum

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    key: bytes
    view: memoryview
    checksum: bytes

    def verify(self) -> bool:
        return checksum(self.view) == self.checksum


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

    # ---- operations ----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], local: bool = False) -> int:
        """How many of ``keys``, from the first, the node (``local``: itself, not its pool) holds; 0 when it
        is unreachable."""
        if not keys:
            return 0
        r = self._call(p.Lookup(list(keys), local))
        return r.n if isinstance(r, p.Count) else 0

    def get(self, keys: Sequence[bytes]) -> list[Lease]:
        """Lease the longest held prefix of ``keys``; call :meth:`release` with the same keys when copied."""
        r = self._call(p.Get(list(keys)))
        if not isinstance(r, p.GetReply) or self._arena is None:
            return []
        v = self._arena.view
        return [Lease(k, v[e.offset:e.offset + e.size], e.checksum) for k, e in zip(keys, r.extents, strict=False)]

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

    def commit(self, items: Sequence[p.CommitItem], abort: Sequence[bytes] = ()) -> bool:
        return isinstance(self._call(p.Commit(list(items), list(abort))), p.Ok)

    def evict_dram(self) -> int:
        """Ask the node to demote its DRAM tier to SSD; returns the number of objects moved."""
        r = self._call(p.Evict())
        return r.n if isinstance(r, p.Count) else 0

    def stats(self) -> dict[str, float]:
        r = self._call(p.Stats())
        return r.stats if isinstance(r, p.StatsReply) else {}

    def pool_stats(self) -> dict[str, dict[str, float]]:
        """This node's stats and every live pool member's, by node id ({} when the node is unreachable)."""
        r = self._call(p.Stats(pool=True))
        if not isinstance(r, p.StatsReply):
            return {}
        return {self.node_id or "local": r.stats, **r.nodes}
