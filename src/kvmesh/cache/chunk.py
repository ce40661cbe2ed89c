"""A KV chunk's metadata and integrity check — the types every tier, the node, the pool and the connector share.

A chunk is the KV of one whole block of tokens for one model/namespace, stored under its
:class:`~kvmesh.cache.keys.ChunkKey`.  :class:`ObjectMeta` travels with it everywhere (arena index, SSD file
header, remote blobs, node and peer protocols); its ``checksum`` is the xxh3-128 of the payload, written by
whoever produced the bytes (the connector on save) and verified by whoever consumes them (the connector on
load, the SSD and remote tiers on read).  A mismatch is :class:`CorruptObject`, which every reader treats as
a miss.

This module sits at the bottom of ``kvmesh.cache``: it imports only msgspec and xxhash, because it is loaded
inside every vLLM worker.
"""

from __future__ import annotations

import msgspec
import xxhash


class ObjectMeta(msgspec.Struct, array_like=True):
    """What the cache knows about a chunk besides its bytes: the parent key and token ids let the node
    publish vLLM-style KV events for the chunk; ``salt`` is the tenant's cache salt."""

    key: bytes
    size: int
    checksum: bytes
    parent: bytes | None = None
    token_ids: list[int] = []
    block_size: int = 0
    salt: str | None = None


class CorruptObject(Exception):
    """The chunk's header or payload does not match its checksum."""


def checksum(data: memoryview | bytes) -> bytes:
    """xxh3-128 of the payload: cheap enough to run on every save and load, wide enough that a corrupt
    chunk is not mistaken for a good one."""
    return xxhash.xxh3_128_digest(data)
