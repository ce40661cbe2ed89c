"""Control messages between engines (connector, benchmarks) and their cache node.

Frames on a Unix stream socket: a 4-byte big-endian length, then one msgpack-encoded message (msgspec tagged
union).  Only metadata travels here; KV bytes move through the shared-memory arena at the offsets the node
hands out.  A request gets exactly one reply, in order, on the same connection.
"""

from __future__ import annotations

import socket
import struct

import msgspec

from kvmesh.cache.chunk import ObjectMeta
from kvmesh.cache.stats import NodeStats

_LEN = struct.Struct(">I")
MAX_FRAME = 64 << 20


class Hello(msgspec.Struct, tag=True):
    pass


class Lookup(msgspec.Struct, tag=True):
    """How many of ``keys``, from the first, the node holds (any tier; ``local``: this node's own tiers only,
    not the pool's).  No side effects."""
    keys: list[bytes]
    local: bool = False


class Get(msgspec.Struct, tag=True):
    """Lease every held key (promoting SSD objects into the arena); the reply stops at the first miss.

    ``fetch_size`` > 0 asks for a *direct* read of what the pool holds: instead of fetching pool chunks
    itself (two hops), the node reserves ``fetch_size`` bytes of arena per missing key and answers with a
    :class:`Fetch` plan; the client reads each chunk from its owners straight into that space and hands it
    back with ``Commit.fetched`` (or frees it with ``Commit.abort``).  ``pool=False``: skip the pool (the
    client already asked it), consult only the remote tier."""
    keys: list[bytes]
    fetch_size: int = 0
    tenant: str = ""
    pool: bool = True


class Release(msgspec.Struct, tag=True):
    keys: list[bytes]
    corrupt: list[bytes] = []  # leased objects whose checksum did not match: the node drops them


class PutItem(msgspec.Struct, array_like=True):
    key: bytes
    size: int
    tenant: str = ""  # charged against the tenant's byte quota (kvmesh.cache.keys.tenant_of)


class Put(msgspec.Struct, tag=True):
    """Reserve arena space; offsets are -1 for keys already held (or being written) and -2 when refused."""
    items: list[PutItem]


class CommitItem(msgspec.Struct, array_like=True):
    key: bytes
    checksum: bytes
    parent: bytes | None
    token_ids: list[int]
    block_size: int
    salt: str | None = None  # the tenant's cache salt (first blocks' events carry it, as vLLM's do)


class Commit(msgspec.Struct, tag=True):
    """Publish written objects (they become readable only now: no torn reads); ``abort`` frees reservations.

    ``fetched``: chunks the client read from pool peers into a :class:`Fetch` reservation and verified; the
    node keeps them as local copies (not pushed back to the pool) and leases them to this connection, so the
    client's :meth:`release` applies to them as to any lease."""
    items: list[CommitItem]
    abort: list[bytes] = []
    fetched: list[ObjectMeta] = []


class Stats(msgspec.Struct, tag=True):
    pool: bool = False  # also every live pool member's stats


class Evict(msgspec.Struct, tag=True):
    """Demote every unleased DRAM object to SSD and wait until it is on disk (maintenance, benchmarks)."""


Request = Hello | Lookup | Get | Release | Put | Commit | Stats | Evict


class HelloReply(msgspec.Struct, tag=True):
    arena_path: str
    arena_size: int
    node_id: str


class Count(msgspec.Struct, tag=True):
    n: int


class Extent(msgspec.Struct, array_like=True):
    offset: int
    size: int
    checksum: bytes


class Fetch(msgspec.Struct, array_like=True):
    """Where to read one chunk the pool holds: arena space reserved for it, and its owners in order.  No
    owners: the node holds the chunk itself after all and leased it to the client, like an :class:`Extent`
    (``size`` and ``checksum`` then describe it)."""
    offset: int
    owners: list[str]  # "host:port" of pool peers
    size: int = 0
    checksum: bytes = b""


class GetReply(msgspec.Struct, tag=True):
    extents: list[Extent]
    fetch: list[Fetch] = []  # for the keys after ``extents``, in order (direct reads only)
    remote: bool = False     # the node has a remote tier: ask again with ``pool=False`` for what the pool lacks


class PutReply(msgspec.Struct, tag=True):
    offsets: list[int]


class Ok(msgspec.Struct, tag=True):
    pass


class StatsReply(msgspec.Struct, tag=True):
    stats: NodeStats
    nodes: dict[str, NodeStats] = {}  # pool members' stats, when asked


class Failure(msgspec.Struct, tag=True):
    message: str


Reply = HelloReply | Count | GetReply | PutReply | Ok | StatsReply | Failure

request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)


def frame(msg: msgspec.Struct) -> bytes:
    body = request_encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def recv_frame(sock: socket.socket) -> bytes:
    head = _recv_exact(sock, 4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes exceeds the limit")
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("cache node closed the connection")
        got += k
    return bytes(buf)
