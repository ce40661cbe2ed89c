"""A paged KV block pool with prefix caching and LRU eviction, as vLLM's v1 block pool behaves.

Blocks hold ``block_size`` tokens.  A full block is identified by its chained key (kvmesh's own xxh3
chain, the same the router computes).  Blocks referenced by running requests cannot be evicted; a block
whose last reference is dropped stays cached and joins the LRU free list, from which allocation evicts
the least recently used.  Every store and eviction is recorded as a vLLM-format event (``take_events``).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from kvmesh.index.events import AllBlocksCleared, BlockRemoved, BlockStored, Event


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, medium: str = "GPU") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.medium = medium
        self.refs: dict[int, int] = {}                                     # cached key -> references
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unreferenced cached keys
        self.used = 0                                                      # blocks held (cached or not)
        self.events: list[Event] = []
        self.hits = 0
        self.queries = 0

    def free_blocks(self) -> int:
        return self.num_blocks - self.used + len(self.lru)

    def held_blocks(self) -> int:
        """Blocks referenced by running requests (vLLM's KV usage counts these, not evictable cached ones)."""
        return self.used - len(self.lru)

    def cached_prefix(self, keys: Sequence[int]) -> int:
        """Number of leading keys cached (no side effects)."""
        n = 0
        for k in keys:
            if k not in self.refs:
                break
            n += 1
        return n

    def acquire_prefix(self, keys: Sequence[int]) -> int:
        """Reference the cached leading blocks of ``keys``; returns how many."""
        n = self.cached_prefix(keys)
        for k in keys[:n]:
            if self.refs[k] == 0:
                del self.lru[k]
            self.refs[k] += 1
        return n

    def can_allocate(self, n: int) -> bool:
        return n <= self.free_blocks()

    def allocate(self, n: int) -> bool:
        """Take ``n`` uncached blocks, evicting LRU cached ones as needed; False if impossible."""
        if n > self.free_blocks():
            return False
        while self.num_blocks - self.used < n:
            k, _ = self.lru.popitem(last=False)
            del self.refs[k]
            self.used -= 1
            last = self.events[-1] if self.events else None
            if isinstance(last, BlockRemoved):  # one event for a run of evictions, as vLLM sends them
                last.block_hashes.append(k)
            else:
                self.events.append(BlockRemoved(block_hashes=[k], medium=self.medium))
        self.used += n
        return True

    def store(self, key: int, parent: int | None, tokens: list[int], extra_keys: list[Any] | None = None) -> None:
        """A freshly computed (allocated, referenced) block becomes cached under ``key``.  ``tokens`` must be
        the caller's own list (a fresh slice): a block continuing the previous event's chain is appended to
        that event, as vLLM batches a step's blocks into one ``BlockStored`` (an event per block made the
        index's per-event work most of the simulator's time)."""
        if key in self.refs:  # computed twice (or cached meanwhile): keep one copy, free the other
            if self.refs[key] == 0:
                del self.lru[key]
            self.refs[key] += 1
            self.used -= 1
            return
        self.refs[key] = 1
        last = self.events[-1] if self.events else None
        if (extra_keys is None and parent is not None and isinstance(last, BlockStored)
                and last.block_hashes[-1] == parent):
            last.block_hashes.append(key)
            last.token_ids.extend(tokens)
            if last.extra_keys is not None:
                last.extra_keys.append(None)
            return
        self.events.append(BlockStored(block_hashes=[key], parent_block_hash=parent, token_ids=tokens,
                                       block_size=self.block_size, medium=self.medium, extra_keys=extra_keys))

    def release(self, keys: Sequence[int], uncached_blocks: int) -> None:
        """Drop a finished request's references; its uncached (partial/decode) blocks are freed."""
        for k in keys:
            r = self.refs[k] - 1
            self.refs[k] = r
            if r == 0:
                self.lru[k] = None
        self.used -= uncached_blocks

    def clear(self) -> None:
        """Drop every unreferenced cached block and publish AllBlocksCleared (callers ensure none is held)."""
        self.used -= len(self.lru)
        for k in self.lru:
            del self.refs[k]
        self.lru.clear()
        self.events.append(AllBlocksCleared())

    def take_events(self) -> list[Event]:
        ev, self.events = self.events, []
        return ev
