"""Content addresses of KV chunks.

A chunk is one engine block (``block_size`` tokens) of KV for every layer.  Its key is a prefix-chained hash:
``key_i = xxh3_128(key_{i-1} || tokens_i)`` with ``key_{-1}`` derived from the *namespace* — everything that
makes two chunks of the same tokens incompatible (model, dtype, KV layout, block size, TP rank/size, schema
version) plus the tenant's salt.  Two tenants therefore never share a key, and a chunk from another model or
layout can never be loaded by mistake.  Keys are immutable contracts: changing this function needs a new
:data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import numpy as np
import xxhash

ChunkKey = NewType("ChunkKey", bytes)  # 16 bytes
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Namespace:
    model: str
    dtype: str
    layout: str  # per-layer block shape, e.g. "2x2x128x32" — any change of layout changes every key
    block_size: int
    tp_rank: int = 0
    tp_size: int = 1

    def seed(self, salt: str | None = None) -> ChunkKey:
        text = (f"kvmesh/{SCHEMA_VERSION}|{self.model}|{self.dtype}|{self.layout}|bs={self.block_size}|"
                f"tp={self.tp_rank}/{self.tp_size}|salt={salt or ''}")
        return ChunkKey(xxhash.xxh3_128_digest(text.encode()))


def chunk_keys(seed: ChunkKey, token_ids: Sequence[int], block_size: int) -> list[ChunkKey]:
    """Keys of every *full* block of ``token_ids`` (a partial last block has no key)."""
    arr = np.asarray(token_ids, dtype=np.int64)
    keys: list[ChunkKey] = []
    parent = seed
    for i in range(len(arr) // block_size):
        parent = ChunkKey(xxhash.xxh3_128_digest(parent + arr[i * block_size:(i + 1) * block_size].tobytes()))
        keys.append(parent)
    return keys


def event_hash(key: bytes) -> int:
    """The int id a chunk has in KV events (vLLM publishes int block hashes): the key's low 63 bits."""
    return int.from_bytes(key[:8], "little") & (2**63 - 1)


def tenant_of(salt: str | None) -> str:
    """The tenant a cache salt belongs to: the gateway writes salts as ``<tenant>:<secret>``; "" = no tenant."""
    return (salt or "").split(":", 1)[0]


def prefix_len(held: Sequence[bool]) -> int:
    """Length of the leading run of True: how much of a prefix is available (chunks are loaded in order)."""
    n = 0
    for h in held:
        if not h:
            break
        n += 1
    return n
