"""The KV index: which engine holds which prefix block, in which tier.

Layout (chosen for the routing hot path): one dict per tier mapping our block key to a bitmask of the
engines holding it.  Matching a request's key chain against every engine at once is then one dict lookup
and a few integer operations per block, whatever the number of engines.  Each engine also keeps its own
``engine hash → our key`` map, because removals name blocks only by the engine's hash.

Speculative ("pending") entries: right after a request is routed, its blocks are recorded for the chosen
engine with a short TTL, so a burst of requests sharing a prefix follows the first one before the engine's
events arrive.  The approximate ``prefix`` policy uses the same mechanism with a long TTL and no events.

Shared sources (:meth:`KvIndex.serve`): a cache node's tier events may be applied once, under the node's own
name, instead of once per engine it serves; :meth:`match` then continues each serving engine's chain through
the node's CPU/STORAGE entries as if they were the engine's own.  Same answers, one apply per event instead
of one per engine (the simulator's pooled tier feeds every engine; per-engine application dominated its time).

Not thread-safe: owned by one event loop (the gateway's); every method is synchronous and O(blocks).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmesh.index.events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    EventBatch,
)
from kvmesh.index.hashing import BlockKey, block_keys, chain_key, root_seed, salted_seed

log = logging.getLogger(__name__)
TIERS = (MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE)
_TIER_OF = {MEDIUM_GPU: 0, None: 0, MEDIUM_CPU: 1, MEDIUM_STORAGE: 2}
GPU_TIER = 0b001     # what an engine's own prefix cache holds: gone when the engine restarts or resets
LOWER_TIERS = 0b110  # CPU | STORAGE: what cache nodes publish


def _tier(medium: str | None) -> int | None:
    """An event's tier (no medium: GPU), whatever its case (some connectors send "cpu"); None for a medium
    the index does not track."""
    return _TIER_OF.get(medium.upper() if medium else None)


@dataclass(slots=True)
class Match:
    """Consecutive prefix blocks an engine holds: first in its own cache, then continued from lower tiers."""

    gpu: int = 0
    cpu: int = 0
    storage: int = 0

    @property
    def total(self) -> int:
        return self.gpu + self.cpu + self.storage


@dataclass(slots=True)
class EngineEntry:
    name: str
    bit: int
    # engine hash -> (our key, bitmask of tiers holding it)
    hashes: dict[EngineHash, tuple[BlockKey, int]] = field(default_factory=dict)
    last_seq: int = -1
    events: int = 0
    orphans: int = 0
    clears: int = 0
    skipped: int = 0  # events the index cannot use (placeholders, other KV-cache groups, unknown media)
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])  # blocks held per tier (metrics, O(1))


def _salt_of(ev: BlockStored) -> str | None:
    # extra_keys[0] lists, in order: LoRA name, (mm id, offset) pairs, the cache_salt, embedding digests.
    if not ev.extra_keys or not ev.extra_keys[0]:
        return None
    strs = [x for x in ev.extra_keys[0] if isinstance(x, str)]
    if ev.lora_name and strs and strs[0] == ev.lora_name:  # the LoRA name comes first: not a salt
        strs = strs[1:]
    return strs[-1] if strs else None


class KvIndex:
    def __init__(self, namespace: str = "", max_blocks_per_engine: int = 4_000_000,
                 pending_ttl_s: float = 2.0, max_pending: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seed = root_seed(namespace)
        self.clock = clock  # expires speculative entries; the virtual-time simulator passes its own
        self.block_size: int | None = None
        self.max_blocks_per_engine = max_blocks_per_engine
        self.pending_ttl_s = pending_ttl_s
        self.max_pending = max_pending
        self.tiers: list[dict[int, int]] = [{}, {}, {}]
        self.engines: dict[str, EngineEntry] = {}
        self._by_bit: dict[int, EngineEntry] = {}
        self._pending: dict[int, int] = {}
        self._pending_exp: dict[tuple[int, int], float] = {}  # latest expiry per (key, engine bit)
        self._pending_q: collections.deque[tuple[float, int, int]] = collections.deque()
        self._reads: dict[str, int] = {}  # engine name -> bits of the shared sources (nodes) it loads from
        self.blocks_stored = 0
        self.blocks_removed = 0
        # the keys of the last stored event: a cache node's event is applied once per engine it serves
        self._last_keys: tuple[BlockStored | None, int, list[BlockKey]] = (None, 0, [])

    def seed_for(self, salt: str | None) -> int:
        """Root of the key chain for a tenant's cache salt (vLLM mixes ``cache_salt`` into the first block)."""
        return salted_seed(self.seed, salt)

    # ---- engines ---------------------------------------------------------------------------------
    def engine(self, name: str) -> EngineEntry:
        e = self.engines.get(name)
        if e is None:
            used = {x.bit for x in self.engines.values()}
            bit = next(i for i in range(len(used) + 1) if i not in used)
            e = self.engines[name] = EngineEntry(name, bit)
            self._by_bit[bit] = e
        return e

    def serve(self, source: str, engines: Sequence[str]) -> None:
        """``engines`` may load what ``source`` (a cache node applied under its own name) holds in its lower
        tiers: :meth:`match` counts those entries for them.  By name, so an engine that is forgotten and comes
        back under the same name still reads the node."""
        bit = 1 << self.engine(source).bit
        for name in engines:
            self.engine(name)  # known before its own first event: it matches the node's blocks already
            self._reads[name] = self._reads.get(name, 0) | bit

    def clear_engine(self, name: str) -> int:
        """Forget everything ``name`` holds (engine restarted, events lost, cache reset); returns blocks."""
        e = self.engines.get(name)
        if e is None:
            return 0
        mask = ~(1 << e.bit)
        for key, tiers in e.hashes.values():
            self._clear_bits(key, tiers, mask)
        n = len(e.hashes)
        e.hashes.clear()
        e.counts = [0, 0, 0]
        e.clears += 1
        return n

    def forget_engine(self, name: str) -> int:
        """``name`` is gone for good (its pod deleted): clear it, drop its speculative entries and its entry,
        so its bit is free for the next engine; returns blocks dropped.  Without this the index would grow
        by one entry per pod name that ever existed (a Deployment's pods get new names on every restart)."""
        e = self.engines.get(name)
        if e is None:
            return 0
        n = self.clear_engine(name)
        bit = 1 << e.bit
        for k, b in [kb for kb in self._pending_exp if kb[1] == bit]:
            del self._pending_exp[(k, b)]
            m = self._pending.get(k, 0) & ~bit
            if m:
                self._pending[k] = m
            else:
                self._pending.pop(k, None)
        # queued expiries of that bit stay behind; _expire_one skips them once a newer owner of the bit has
        # refreshed the key, and otherwise clears a bit that is already clear
        del self.engines[name]
        del self._by_bit[e.bit]
        for reader, reads in list(self._reads.items()):  # a forgotten source: its bit may be reused
            self._reads[reader] = reads & ~bit
        return n

    def clear_tiers(self, name: str, tiers: int) -> int:
        """Forget what ``name`` holds in the given tiers only (bitmask over GPU/CPU/STORAGE); returns blocks."""
        e = self.engines.get(name)
        if e is None:
            return 0
        mask = ~(1 << e.bit)
        n = 0
        for h, (key, held) in list(e.hashes.items()):
            gone = held & tiers
            if not gone:
                continue
            self._clear_bits(key, gone, mask)
            _count(e, gone, -1)
            n += 1
            if held & ~tiers:
                e.hashes[h] = (key, held & ~tiers)
            else:
                del e.hashes[h]
        return n

    def _clear_bits(self, key: BlockKey, tiers: int, mask: int) -> None:
        for t in range(3):
            if tiers >> t & 1:
                d = self.tiers[t]
                m = d.get(key, 0) & mask
                if m:
                    d[key] = m
                else:
                    d.pop(key, None)

    # ---- events ----------------------------------------------------------------------------------
    def apply(self, name: str, batch: EventBatch) -> int:
        """Apply one event batch from engine ``name`` in order; returns the number of blocks touched."""
        e = self.engine(name)
        n = 0
        for ev in batch.events:
            e.events += 1
            if isinstance(ev, BlockStored):
                n += self._stored(e, ev)
            elif isinstance(ev, BlockRemoved):
                n += self._removed(e, ev)
            elif isinstance(ev, AllBlocksCleared):
                n += self.clear_engine(name)
        return n

    def _stored(self, e: EngineEntry, ev: BlockStored) -> int:
        bs, n, t = ev.block_size, len(ev.block_hashes), _tier(ev.medium)
        # Not keyable: a placeholder store (vLLM's offloading sends block_size 0, no tokens), a KV-cache group
        # other than the first (hybrid models: its hashes skip masked blocks), a medium not tracked.  Such an
        # event must not teach the index its block size either (0 would end every key computation).
        if bs <= 0 or not n or len(ev.token_ids) <= bs * (n - 1) or (ev.group_idx or 0) != 0 or t is None:
            e.skipped += 1
            return 0
        if self.block_size is None:
            self.block_size = bs
        elif bs != self.block_size:
            log.warning("engine %s uses block size %d, index uses %d; event ignored", e.name, bs, self.block_size)
            return 0
        if ev.parent_block_hash is None:
            parent: int = self.seed_for(_salt_of(ev))
        else:
            known = e.hashes.get(ev.parent_block_hash)
            if known is None:  # we missed the parent's store: cannot key this chain
                e.orphans += 1
                return 0
            parent = known[0]
        tier_bit, bit, d = 1 << t, 1 << e.bit, self.tiers[t]
        keys = self._keys(ev, parent, bs)
        hashes = e.hashes
        for h, key in zip(ev.block_hashes, keys, strict=True):
            old = hashes.get(h)
            if old is None:
                hashes[h] = (key, tier_bit)
                e.counts[t] += 1
            else:  # a hash keeps the key it was stored under first, or its removal would leave one behind
                key = old[0]
                if not old[1] & tier_bit:
                    hashes[h] = (key, old[1] | tier_bit)
                    e.counts[t] += 1
            d[key] = d.get(key, 0) | bit
        self.blocks_stored += len(ev.block_hashes)
        if len(e.hashes) > self.max_blocks_per_engine:
            self._shed(e)
        return len(ev.block_hashes)

    def _keys(self, ev: BlockStored, parent: int, bs: int) -> list[BlockKey]:
        last_ev, last_parent, last = self._last_keys
        if last_ev is ev and last_parent == parent:
            return last
        # One token-array conversion per event, not per block (the simulator sends millions of these).
        keys = block_keys(ev.token_ids, bs, parent, len(ev.block_hashes))
        while len(keys) < len(ev.block_hashes):  # a short last block: key what is there, as before
            i = len(keys)
            keys.append(chain_key(keys[-1] if keys else parent, ev.token_ids[i * bs:(i + 1) * bs]))
        self._last_keys = (ev, parent, keys)
        return keys

    def _removed(self, e: EngineEntry, ev: BlockRemoved) -> int:
        t = _tier(ev.medium)
        if t is None or (ev.group_idx or 0) != 0:
            e.skipped += 1
            return 0
        mask = ~(1 << e.bit)
        n = 0
        for h in ev.block_hashes:
            entry = e.hashes.get(h)
            if entry is None:
                continue
            key, tiers = entry
            if tiers >> t & 1:
                e.counts[t] -= 1
            self._clear_bits(key, 1 << t, mask)
            rest = tiers & ~(1 << t)
            if rest:
                e.hashes[h] = (key, rest)
            else:
                del e.hashes[h]
            n += 1
        self.blocks_removed += n
        return n

    def _shed(self, e: EngineEntry) -> None:
        # Bounded memory even if an engine never sends removals: drop its oldest tenth.
        drop = max(1, len(e.hashes) // 10)
        mask = ~(1 << e.bit)
        for h in list(e.hashes)[:drop]:
            key, tiers = e.hashes.pop(h)
            self._clear_bits(key, tiers, mask)
            _count(e, tiers, -1)

    # ---- speculative entries ---------------------------------------------------------------------
    def add_pending(self, name: str, keys: Sequence[int], ttl_s: float | None = None) -> None:
        bit = 1 << self.engine(name).bit
        expiry = self.clock() + (self.pending_ttl_s if ttl_s is None else ttl_s)
        for k in keys:
            self._pending[k] = self._pending.get(k, 0) | bit
            self._pending_exp[(k, bit)] = expiry
            self._pending_q.append((expiry, k, bit))
        while len(self._pending_exp) > self.max_pending or len(self._pending_q) > 2 * self.max_pending:
            self._expire_one(force=True)

    def _expire_one(self, force: bool = False) -> None:
        t, k, bit = self._pending_q.popleft()
        if self._pending_exp.get((k, bit), 0.0) > t and not force:
            return  # refreshed by a later add: that newer queue entry will expire it
        self._pending_exp.pop((k, bit), None)
        m = self._pending.get(k, 0) & ~bit
        if m:
            self._pending[k] = m
        else:
            self._pending.pop(k, None)

    def expire_pending(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        q = self._pending_q
        while q and q[0][0] <= now:
            self._expire_one()

    # ---- lookups ---------------------------------------------------------------------------------
    def match(self, keys: Sequence[int], names: Sequence[str]) -> list[Match]:
        """Longest consecutive prefix of ``keys`` each engine in ``names`` holds, by tier.

        GPU (the engine's own prefix cache, plus pending entries) is matched first; the chain then
        continues through blocks the engine can load from CPU or STORAGE tiers.
        """
        self.expire_pending()
        out = [Match() for _ in names]
        bits = [self.engines[n].bit if n in self.engines else -1 for n in names]
        alive = 0
        for b in bits:
            if b >= 0:
                alive |= 1 << b
        gpu_len = self._gpu_prefix(keys, alive)
        lower = bool(self.tiers[1] or self.tiers[2])
        for i, b in enumerate(bits):
            if b < 0:
                continue
            m = out[i]
            m.gpu = gpu_len.get(b, 0)
            if lower:
                self._lower(keys, m, 1 << b | self._reads.get(names[i], 0))
        return out

    def _gpu_prefix(self, keys: Sequence[int], alive: int) -> dict[int, int]:
        gpu, pending = self.tiers[0], self._pending
        lengths: dict[int, int] = {}
        for i, k in enumerate(keys):
            if not alive:
                return lengths
            m = (gpu.get(k, 0) | pending.get(k, 0)) & alive
            dead = alive & ~m
            while dead:
                low = dead & -dead
                lengths[low.bit_length() - 1] = i
                dead ^= low
            alive = m
        while alive:
            low = alive & -alive
            lengths[low.bit_length() - 1] = len(keys)
            alive ^= low
        return lengths

    def _lower(self, keys: Sequence[int], m: Match, bits: int) -> None:
        cpu, storage = self.tiers[1], self.tiers[2]
        for k in keys[m.gpu:]:
            if cpu.get(k, 0) & bits:
                m.cpu += 1
            elif storage.get(k, 0) & bits:
                m.storage += 1
            else:
                return

    def holds(self, key: int) -> bool:
        """Whether any engine holds ``key`` in any tier, or has it pending (possibly just expired)."""
        return key in self._pending or any(key in t for t in self.tiers)

    def engine_keys(self, name: str, medium: str = MEDIUM_GPU) -> set[int]:
        e = self.engines.get(name)
        t = 1 << _TIER_OF[medium]
        return {k for k, tiers in e.hashes.values() if tiers & t} if e else set()

    def pending_size(self) -> int:
        return len(self._pending_exp)

    def size(self) -> int:
        return sum(len(d) for d in self.tiers)


def _count(e: EngineEntry, tiers: int, delta: int) -> None:
    for t in range(3):
        if tiers >> t & 1:
            e.counts[t] += delta
