"""Direct reads from pool peers, for engine processes: one network hop instead of two.

A node-mediated pool read costs two hops (engine → its node over the Unix socket, node → owner over TCP,
then the bytes land in the node's arena and the engine is told where).  A direct read lets the engine's own
process ask the owner: its node reserves arena space and names the owners (:class:`kvmesh.cache.protocol.Fetch`),
the engine reads the owner's reply straight into that space (``recv_into`` with ``MSG_WAITALL``: one copy,
one system call per chunk), verifies the checksum, and hands the chunk back to its node as a local copy.

Blocking sockets, one connection per peer, reused; safe to call from any thread (one lock).  A peer that
fails is skipped for ``retry_s`` (its keys go to the next owner): never an error to the caller.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

import msgspec

from kvmesh.cache import protocol as p
from kvmesh.cache.chunk import ObjectMeta
from kvmesh.cache.pool.peer import SOCK_BUF, PeerError, PGet, PGetReply, encode, rep_decoder

log = logging.getLogger(__name__)

Sink = Callable[[int, ObjectMeta], memoryview | None]  # (index in the request, meta) -> where its bytes go


class PeerReader:
    def __init__(self, timeout_s: float = 5.0, retry_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._socks: dict[str, socket.socket] = {}
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._scratch = bytearray()

    def get(self, addr: str, keys: Sequence[bytes], sink: Sink) -> list[ObjectMeta]:
        """The longest prefix of ``keys`` that ``addr`` holds, each chunk's bytes received where ``sink``
        says (None: read and dropped).  [] when the peer is unreachable or misbehaves."""
        with self._lock:
            sock = self._connect(addr)
            if sock is None:
                return []
            try:
                return self._get(sock, keys, sink)
            except (OSError, PeerError, msgspec.DecodeError, msgspec.ValidationError) as e:
                log.info("cache pool: direct read from %s failed (%s); trying other owners", addr, e)
                self._drop(addr)
                return []

    def _get(self, sock: socket.socket, keys: Sequence[bytes], sink: Sink) -> list[ObjectMeta]:
        sock.sendall(encode(PGet(list(keys))))
        reply = rep_decoder.decode(p.recv_frame(sock))
        if not isinstance(reply, PGetReply) or len(reply.metas) > len(keys):
            raise PeerError("unexpected reply")
        for i, meta in enumerate(reply.metas):
            view = sink(i, meta) if meta.key == keys[i] else None
            if view is None or len(view) != meta.size:
                view = self._scratch_view(meta.size)
            _recv_exact(sock, view)
        return reply.metas

    def _scratch_view(self, size: int) -> memoryview:
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        return memoryview(self._scratch)[:size]

    def _connect(self, addr: str) -> socket.socket | None:
        sock = self._socks.get(addr)
        if sock is not None:
            return sock
        if time.monotonic() < self._down_until.get(addr, 0.0):
            return None
        host, _, port = addr.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        except (OSError, ValueError) as e:
            log.info("cache pool: peer %s unreachable (%s)", addr, e)
            self._down_until[addr] = time.monotonic() + self.retry_s
            return None
        # A blocking socket with kernel-side timeouts: recv(MSG_WAITALL) then fills a chunk in one call
        # (Python's own timeouts make the socket non-blocking, and MSG_WAITALL moot).
        sock.settimeout(None)
        tv = struct.pack("ll", int(self.timeout_s), int(self.timeout_s % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        self._socks[addr] = sock
        return sock

    def _drop(self, addr: str) -> None:
        sock = self._socks.pop(addr, None)
        if sock is not None:
            sock.close()
        self._down_until[addr] = time.monotonic() + self.retry_s

    def close(self) -> None:
        with self._lock:
            for addr in list(self._socks):
                self._socks.pop(addr).close()


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if not n:
            raise PeerError("the peer closed the connection")
        got += n
