"""kvmesh's own prefix-chained block keys.

key(block i) = xxh3_64(uint32 little-endian token ids of block i, seed = key(block i-1)), with the root
seed derived from a namespace (model name, and later tenant salt).  Computing our own keys from token ids
means the router never depends on an engine's hash function or its per-process random seed (vLLM seeds
its hashes from PYTHONHASHSEED unless configured), and two engines holding the same prefix agree on it.
Only full blocks are keyed: engines cache nothing smaller.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from typing import NewType

import numpy as np
import xxhash

BlockKey = NewType("BlockKey", int)
_BIG_ENDIAN = sys.byteorder == "big"


def root_seed(namespace: str) -> int:
    return xxhash.xxh3_64_intdigest(namespace.encode())


def block_keys(token_ids: Sequence[int] | np.ndarray, block_size: int, seed: int,
               max_blocks: int | None = None) -> list[BlockKey]:
    """Chained keys of every full block of ``token_ids`` (at most ``max_blocks``)."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        return []
    raw = _u32(token_ids[: n * block_size]).cast("B")
    step = block_size * 4
    keys: list[int] = []
    append = keys.append
    h = seed
    digest = xxhash.xxh3_64_intdigest
    for start in range(0, n * step, step):
        h = digest(raw[start:start + step], h)
        append(h)
    return keys  # type: ignore[return-value]  # BlockKey is int at run time; skip n NewType calls


def chain_key(parent: int, tokens: Sequence[int]) -> BlockKey:
    return BlockKey(xxhash.xxh3_64_intdigest(_u32(tokens), parent))


def _u32(tokens: Sequence[int] | np.ndarray) -> memoryview:
    # array.array converts a Python list ~4x faster than numpy; keys are defined on little-endian bytes.
    if isinstance(tokens, np.ndarray):
        return memoryview(np.ascontiguousarray(tokens, dtype="<u4").data)
    a = array.array("I", tokens)
    if _BIG_ENDIAN:
        a.byteswap()
    return memoryview(a)


def salted_seed(seed: int, salt: str | None) -> int:
    """Root of the key chain for a tenant's cache salt (vLLM mixes ``cache_salt`` into the first block)."""
    return seed if not salt else xxhash.xxh3_64_intdigest(salt.encode(), seed)
