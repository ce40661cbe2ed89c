"""Node-to-node transfers: a framed TCP protocol, msgspec header + raw payload.

Frame: 4-byte big-endian header length, msgpack header, then the payload bytes the header announces (GET
replies carry their chunks back to back; PUT requests carry one).  One request at a time per connection,
replies in order.  Both sides use raw non-blocking sockets: payloads are received with ``sock_recv_into``
straight into the arena (a fetched chunk on the client side, a pushed chunk on the server side) and sent
with ``sock_sendall`` straight from it, so a transfer costs one copy on each side of the socket, none in
between.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import msgspec

from kvmesh.cache.chunk import ObjectMeta
from kvmesh.cache.stats import NodeStats

_LEN = struct.Struct(">I")
MAX_HEADER = 16 << 20
SOCK_BUF = 4 << 20
LOWAT_FROM = 256 << 10  # payloads from this size wait for big pieces (SO_RCVLOWAT)
LOWAT_MAX = 1 << 20


class PHas(msgspec.Struct, tag=True):
    keys: list[bytes]


class PGet(msgspec.Struct, tag=True):
    keys: list[bytes]


class PPut(msgspec.Struct, tag=True):
    meta: ObjectMeta


class PStats(msgspec.Struct, tag=True):
    pass


PRequest = PHas | PGet | PPut | PStats


class PHasReply(msgspec.Struct, tag=True):
    held: list[bool]


class PGetReply(msgspec.Struct, tag=True):
    metas: list[ObjectMeta]  # the longest held prefix of the keys asked; payloads follow in this order


class POk(msgspec.Struct, tag=True):
    stored: bool


class PStatsReply(msgspec.Struct, tag=True):
    stats: NodeStats


PReply = PHasReply | PGetReply | POk | PStatsReply

_enc = msgspec.msgpack.Encoder()
req_decoder = msgspec.msgpack.Decoder(PRequest)
rep_decoder = msgspec.msgpack.Decoder(PReply)


def encode(msg: msgspec.Struct) -> bytes:
    body = _enc.encode(msg)
    return _LEN.pack(len(body)) + body


class PeerError(ConnectionError):
    """The peer is unreachable or broke the protocol; callers try another owner or count a miss."""


class PeerClient:
    """Connections to one peer, opened lazily (up to ``max_conns``, so pushes and fetches to one peer run
    side by side instead of queueing behind one round trip each), reused, and dropped after an error.
    Coroutine-safe: each call has a connection to itself for its request and reply."""

    def __init__(self, host: str, port: int, timeout_s: float = 5.0, max_conns: int = 4) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: list[socket.socket] = []
        self._open: set[socket.socket] = set()
        self._slots = asyncio.Semaphore(max_conns)

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tune(s)
        try:
            await asyncio.wait_for(loop.sock_connect(s, (self.host, self.port)), self.timeout_s)
        except (OSError, TimeoutError) as e:
            s.close()
            raise PeerError(f"{self.host}:{self.port}: {e}") from None
        return s

    def close(self) -> None:
        for s in self._open:
            s.close()
        self._open.clear()
        self._idle.clear()

    async def call(self, msg: msgspec.Struct, payload: memoryview | bytes | None = None,
                   sink: Callable[[ObjectMeta], memoryview | None] | None = None) -> PReply:
        """Send ``msg`` (+ ``payload``); for a GET, ``sink(meta)`` gives the buffer each chunk lands in
        (None: read and drop).  Raises :class:`PeerError`; the connection is then dropped."""
        async with self._slots:
            sock = self._idle.pop() if self._idle else None
            try:
                async with asyncio.timeout(self.timeout_s):  # no extra task per call (unlike wait_for)
                    if sock is None:
                        sock = await self._connect()
                        self._open.add(sock)
                    reply = await self._call(sock, msg, payload, sink)
            except BaseException as e:  # an error or a cancellation mid-exchange: the connection is unusable
                if sock is not None:
                    self._open.discard(sock)
                    sock.close()
                if isinstance(e, OSError | TimeoutError | msgspec.DecodeError):  # (PeerError is an OSError)
                    raise PeerError(f"{self.host}:{self.port}: {type(e).__name__}: {e}") from None
                raise
            if sock in self._open:  # (close() may have run meanwhile)
                self._idle.append(sock)
            return reply

    @staticmethod
    async def _call(sock: socket.socket, msg: msgspec.Struct, payload: memoryview | bytes | None,
                    sink: Callable[[ObjectMeta], memoryview | None] | None) -> PReply:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, encode(msg))
        if payload is not None:
            await loop.sock_sendall(sock, payload)
        reply: PReply = rep_decoder.decode(await recv_frame(sock))
        if isinstance(reply, PGetReply):
            for meta in reply.metas:
                buf = sink(meta) if sink else None
                await recv_into(sock, buf if buf is not None else memoryview(bytearray(meta.size)))
        return reply


async def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; raises :class:`PeerError` when the peer closes first."""
    loop = asyncio.get_running_loop()
    got = 0
    lowat = len(view) >= LOWAT_FROM
    try:
        while got < len(view):
            if lowat:
                # Wake when a large piece is queued, not for every segment that arrives (a 1 MB chunk
                # otherwise costs dozens of loop wake-ups).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(len(view) - got, LOWAT_MAX))
            n = await loop.sock_recv_into(sock, view[got:])
            if not n:
                raise PeerError("the peer closed the connection")
            got += n
    finally:
        if lowat:  # back to the default, or a short header would never wake the loop
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


async def recv_frame(sock: socket.socket) -> bytearray:
    """One length-prefixed msgpack header."""
    head = bytearray(4)
    await recv_into(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > MAX_HEADER:
        raise PeerError(f"header of {n} bytes")
    body = bytearray(n)
    await recv_into(sock, memoryview(body))
    return body


async def discard(sock: socket.socket, size: int) -> None:
    """Read and drop ``size`` payload bytes (a chunk this node will not keep)."""
    scratch = memoryview(bytearray(min(size, 1 << 20)))
    while size > 0:
        n = min(size, len(scratch))
        await recv_into(sock, scratch[:n])
        size -= n


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)  # fewer, larger reads of chunk payloads
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
