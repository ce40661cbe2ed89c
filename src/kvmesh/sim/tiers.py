"""Cache tiers in the simulator: each machine's cache node (DRAM over SSD), optionally pooled across machines.

What is modelled, and how it maps to the real system:

- **Saves.** Every block an engine computes is saved to its machine's node.  The connector hands them to its
  save thread (``connector_async``, its default), so no step waits for them; with the synchronous connector
  the copy of the blocks not held yet crosses the host link at the end of the step that computed them
  (charged to that step, latency once per step).  Contention of saves with loads on the host link is not
  modelled.  Pooled, a block goes to its
  owners instead: the first ``replication`` nodes of :class:`kvmesh.cache.pool.ring.Ring` (the cache pool's own
  ring, weighted by DRAM capacity).
- **Loads.** Admission continues an engine's GPU prefix through the tiers: the consecutive blocks its node
  holds (pooled: any owner) are loaded instead of computed.  The connector loads asynchronously by default:
  the request waits aside for its load time (vLLM's ``WAITING_FOR_REMOTE_KVS``) and joins the batch at the
  first step after it, while the engine's steps go on; the load is **not overlapped with that request's
  own compute** (it is in its TTFT).  With the synchronous connector the load time adds to the engine step
  that admits the request, stalling its whole batch (``overlap_loads``: the what-if of layer-wise loads,
  not built).  Load time = bytes over each link on the way plus that link's latency, once per request:
  DRAM → GPU over the host link; an SSD hit reads the SSD then crosses the host link (and is promoted into
  DRAM, as the node does on an SSD hit); a block whose owner is another machine also crosses the network.
  Contention between engines sharing a link is not modelled.
- **Room.** A full DRAM evicts by kvmesh's own policy (:mod:`kvmesh.cache.eviction`) and demotes the victim to
  SSD (stored-then-removed, the node's event order); a full SSD drops its victim.
- **Events.** Tier changes are vLLM-format events with medium CPU (DRAM) or STORAGE (SSD), applied to the
  index once under the node's name (pooled: one stream, ``pool``) and read by every engine that can load from
  the node — its machine's engines, or all engines when pooled — through ``KvIndex.serve``: the same matches
  as the gateway's ``CacheNodeSpec.engines`` crediting each event to each engine, at one apply per event.
  Block hashes are kvmesh's own chained keys, as the simulated GPU pool's are.

Not thread-safe; driven by the cluster's event loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.cache.eviction import make_policy
from kvmesh.cache.pool.ring import Ring
from kvmesh.index.events import MEDIUM_CPU, MEDIUM_STORAGE, BlockRemoved, BlockStored, Event

GB = 1e9


@dataclass(frozen=True, slots=True)
class Link:
    """A transfer path: ``gbps`` GB/s and a fixed ``latency_s`` per transfer."""

    gbps: float
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / (self.gbps * GB) if nbytes > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TierProfile:
    """Transfer figures of one hardware class: host DRAM → accelerator, SSD → DRAM, a pool peer → this host."""

    name: str
    host: Link
    ssd: Link
    network: Link


TIER_PROFILES: dict[str, TierProfile] = {
    # PCIe Gen5 x16 host→GPU ~50 GB/s; one NVMe drive ~7 GB/s; RDMA 200 Gb/s NIC ~25 GB/s.
    "h100-llama3-8b": TierProfile("h100-llama3-8b", Link(50.0, 20e-6), Link(7.0, 100e-6), Link(25.0, 10e-6)),
    # This machine's cache node (bench/results/cache_node.json, cache_pool.json) at the connector's chunk size
    # (one 128-token block of the small demo model in float32: 2 MiB): shared-memory get 5.3 GB/s (1-4 MiB
    # objects); SSD read 1.0 GB/s — the node reads one file per chunk, one after another, and 1 MiB objects
    # read at 0.81 GB/s, 4 MiB at 1.14 (1.74 is the 64 MiB figure, which no chunk reaches); pool get from a
    # peer 1.47 GB/s (4 MiB).  bench/sim_fidelity.py checks DRAM- and SSD-hit TTFT against the real node.
    "cpu-demo-small": TierProfile("cpu-demo-small", Link(5.3, 50e-6), Link(1.0, 200e-6), Link(1.47, 300e-6)),
}


@dataclass(frozen=True, slots=True)
class TierConfig:
    """Sizes of each machine's node and how machines share them.  0 bytes disables a tier."""

    engines_per_machine: int = 8
    dram_bytes: int = 0
    ssd_bytes: int = 0
    pooled: bool = False
    replication: int = 1
    eviction: str = "lru"
    profile: str | None = None  # a TIER_PROFILES name; default: the timing profile's
    # The connector's default: loads wait aside (the step does not), saves are copied by a thread (the step
    # does not wait).  False: the synchronous connector (connector_async = false), where the what-ifs apply.
    connector_async: bool = True
    overlap_saves: bool = False  # what-if for the synchronous connector: saves copied out behind compute
    overlap_loads: bool = False  # what-if for the synchronous connector: layer-wise loads behind compute

    def __post_init__(self) -> None:
        if self.engines_per_machine < 1 or self.replication < 1 or self.dram_bytes < 0 or self.ssd_bytes < 0:
            raise ValueError("engines_per_machine and replication must be >= 1, tier sizes >= 0")

    @property
    def enabled(self) -> bool:
        return self.dram_bytes > 0 or self.ssd_bytes > 0


def tier_profile(name: str) -> TierProfile:
    """Raises ``ValueError`` for an unknown name."""
    if name not in TIER_PROFILES:
        raise ValueError(f"no tier figures for profile {name!r}; known: {', '.join(TIER_PROFILES)}")
    return TIER_PROFILES[name]


def _kb(key: int) -> bytes:
    return key.to_bytes(8, "little")


class CacheNode:
    """One machine's node: DRAM over SSD, capacities in blocks, kvmesh's eviction policies."""

    def __init__(self, name: str, dram_blocks: int, ssd_blocks: int, block_size: int, eviction: str = "lru",
                 events: list[Event] | None = None) -> None:
        self.name, self.block_size = name, block_size
        self.dram_cap, self.ssd_cap = dram_blocks, ssd_blocks
        self.dram: set[int] = set()
        self.ssd: set[int] = set()
        self.meta: dict[int, tuple[int | None, list[int]]] = {}  # key -> (parent, tokens), for events
        self._dram_policy = make_policy(eviction)
        self._ssd_policy = make_policy(eviction)
        self.events: list[Event] = [] if events is None else events  # pooled nodes share one, in order

    def where(self, key: int) -> str | None:
        """``"dram"``, ``"ssd"`` or None; no side effects."""
        return "dram" if key in self.dram else "ssd" if key in self.ssd else None

    def put(self, key: int, parent: int | None, tokens: list[int]) -> bool:
        """Store a new block; False if held already (the engine's reserve finds it and skips the write)."""
        if key in self.dram or key in self.ssd:
            return False
        self.meta[key] = (parent, tokens)
        if self.dram_cap:
            self._into_dram(key)
        elif self.ssd_cap:
            self._into_ssd(key)
        return True

    def read(self, key: int, leased: set[int] | None = None) -> str | None:
        """A load: touches the key, promotes an SSD hit into DRAM (keeping the SSD copy); returns its tier.
        ``leased``: keys this load already holds, which promotion must not evict (the node's leases)."""
        if key in self.dram:
            self._dram_policy.accessed(_kb(key))
            return "dram"
        if key in self.ssd:
            self._ssd_policy.accessed(_kb(key))
            if self.dram_cap:
                self._into_dram(key, leased)
            return "ssd"
        return None

    def evict_dram(self) -> int:
        """Demote every DRAM block to SSD in eviction order, as the node's ``evict_dram`` does (benchmarks
        force SSD-tier hits this way); returns the count."""
        n = 0
        while (victim := self._dram_policy.victim(lambda _k: True)) is not None:
            self._demote(int.from_bytes(victim, "little"))
            n += 1
        return n

    def _stored(self, key: int, medium: str) -> None:
        parent, tokens = self.meta[key]
        last = self.events[-1] if self.events else None
        if isinstance(last, BlockStored) and last.medium == medium and last.block_hashes[-1] == parent:
            last.block_hashes.append(key)  # the chain continues: one multi-block event, as vLLM sends
            last.token_ids = last.token_ids + tokens
            return
        self.events.append(BlockStored(block_hashes=[key], parent_block_hash=parent, token_ids=tokens,
                                       block_size=self.block_size, medium=medium))

    def _into_dram(self, key: int, leased: set[int] | None = None) -> None:
        def evictable(k: bytes) -> bool:
            return not leased or int.from_bytes(k, "little") not in leased

        while len(self.dram) >= self.dram_cap:
            victim = self._dram_policy.victim(evictable)
            if victim is None:
                return
            self._demote(int.from_bytes(victim, "little"))
        self.dram.add(key)
        self._dram_policy.inserted(_kb(key))
        self._stored(key, MEDIUM_CPU)

    def _removed(self, key: int, medium: str) -> None:
        last = self.events[-1] if self.events else None
        if isinstance(last, BlockRemoved) and last.medium == medium:
            last.block_hashes.append(key)  # consecutive removals: one event (the index's cost is per event)
        else:
            self.events.append(BlockRemoved(block_hashes=[key], medium=medium))

    def _demote(self, key: int) -> None:
        if self.ssd_cap and key not in self.ssd:
            self._into_ssd(key)  # stored on SSD before the DRAM removal: the chain link is never lost
        self.dram.discard(key)
        self._removed(key, MEDIUM_CPU)
        if key not in self.ssd:
            self.meta.pop(key, None)

    def _into_ssd(self, key: int) -> None:
        while len(self.ssd) >= self.ssd_cap:
            victim = self._ssd_policy.victim(lambda _k: True)
            if victim is None:
                return
            v = int.from_bytes(victim, "little")
            self.ssd.discard(v)
            self._removed(v, MEDIUM_STORAGE)
            if v not in self.dram:
                self.meta.pop(v, None)
        self.ssd.add(key)
        self._ssd_policy.inserted(_kb(key))
        self._stored(key, MEDIUM_STORAGE)


@dataclass(slots=True)
class LoadStats:
    dram_blocks: int = 0
    ssd_blocks: int = 0
    remote_blocks: int = 0
    seconds: float = 0.0


class TierSystem:
    """Every machine's node, the ring when pooled, and the load-time model (see the module docstring)."""

    def __init__(self, cfg: TierConfig, profile: TierProfile, replicas: int, block_size: int,
                 block_bytes: float) -> None:
        self.cfg, self.profile, self.block_bytes = cfg, profile, block_bytes
        machines = math.ceil(replicas / cfg.engines_per_machine)
        dram, ssd = int(cfg.dram_bytes // block_bytes), int(cfg.ssd_bytes // block_bytes)
        shared: list[Event] | None = [] if cfg.pooled else None
        self.nodes = [CacheNode(f"m{i}", dram, ssd, block_size, cfg.eviction, shared) for i in range(machines)]
        self._by_name = {n.name: n for n in self.nodes}
        names = [f"e{i}" for i in range(replicas)]
        epm = cfg.engines_per_machine
        # who may load what each node holds (the gateway's CacheNodeSpec.engines); pooled: everyone, from
        # one event stream (the nodes share it) published as "pool"
        self.readers: list[tuple[str, tuple[str, ...], CacheNode]] = (
            [("pool", tuple(names), self.nodes[0])] if cfg.pooled else
            [(n.name, tuple(names[i * epm:(i + 1) * epm]), n) for i, n in enumerate(self.nodes)])
        self.ring = Ring.build({n.name: max(cfg.dram_bytes, cfg.ssd_bytes, 1) for n in self.nodes}) \
            if cfg.pooled else None
        self.stats = LoadStats()
        self._owners: dict[int, list[CacheNode]] = {}

    def take_events(self) -> list[tuple[str, list[Event]]]:
        """Each node's events since the last call (pooled: one stream), under the source name that
        ``readers`` pairs with the engines that may load them (``KvIndex.serve``)."""
        out = []
        for source, _, node in self.readers:
            if node.events:
                out.append((source, list(node.events)))
                node.events.clear()
        return out

    def machine_of(self, engine_index: int) -> int:
        return engine_index // self.cfg.engines_per_machine

    def _homes(self, machine: int, key: int) -> list[CacheNode]:
        if self.ring is None:
            return [self.nodes[machine]]
        homes = self._owners.get(key)
        if homes is None:  # the ring never changes during a run: a key's owners are looked up once
            homes = self._owners[key] = [self._by_name[n] for n in self.ring.owners(_kb(key), self.cfg.replication)]
        return homes

    def held(self, machine: int, keys: Sequence[int]) -> int:
        """Leading ``keys`` loadable by an engine of ``machine`` (no side effects)."""
        n = 0
        for k in keys:
            if not any(h.where(k) for h in self._homes(machine, k)):
                break
            n += 1
        return n

    def load(self, machine: int, keys: Sequence[int]) -> float:
        """Load ``keys`` (all held) into an engine of ``machine``; returns the seconds it takes."""
        local = self.nodes[machine]
        leased: set[int] = set()
        dram = ssd = remote = 0
        for k in keys:
            homes = self._homes(machine, k)
            home = local if local in homes and local.where(k) else next(h for h in homes if h.where(k))
            tier = home.read(k, leased)
            leased.add(k)
            dram += tier == "dram"
            ssd += tier == "ssd"
            remote += home is not local
        b, p = self.block_bytes, self.profile
        secs = p.host.seconds(len(keys) * b) + p.ssd.seconds(ssd * b) + p.network.seconds(remote * b)
        st = self.stats
        st.dram_blocks, st.ssd_blocks, st.remote_blocks = st.dram_blocks + dram, st.ssd_blocks + ssd, \
            st.remote_blocks + remote
        st.seconds += secs
        return secs

    def save(self, machine: int, key: int, parent: int | None, tokens: list[int]) -> bool:
        """Whether the engine copies the block out (some owner lacked it)."""
        new = False
        for h in self._homes(machine, key):
            new = h.put(key, parent, tokens) or new
        return new

    def save_seconds(self, blocks: int) -> float:
        """The engine's copy of ``blocks`` into its node's memory over the host link; forwarding to pool
        owners happens after the commit, off the engine's path."""
        if self.cfg.overlap_saves or self.cfg.connector_async:
            return 0.0
        return self.profile.host.seconds(blocks * self.block_bytes)


@dataclass(slots=True)
class MachineView:
    """What one engine sees of the tiers: its machine's node (or the pool).  ``EngineCore.tier``."""

    system: TierSystem
    machine: int

    def held(self, keys: Sequence[int]) -> int:
        return self.system.held(self.machine, keys)

    def load(self, keys: Sequence[int]) -> float:
        return self.system.load(self.machine, keys)

    def save(self, key: int, parent: int | None, tokens: list[int]) -> bool:
        return self.system.save(self.machine, key, parent, tokens)

    def save_seconds(self, blocks: int) -> float:
        return self.system.save_seconds(blocks)

    @property
    def async_loads(self) -> bool:
        """Loads wait aside instead of stalling the admitting step (the connector's default)."""
        return self.system.cfg.connector_async

    def step_seconds(self, compute_s: float, load_s: float) -> float:
        """A step that computes for ``compute_s`` and loads for ``load_s``: their sum, as kvmesh's connector
        loads everything before the forward pass; with ``overlap_loads`` (a what-if: loads streamed layer by
        layer, vLLM's ``wait_for_layer_load``) the longer of the two."""
        return max(compute_s, load_s) if self.system.cfg.overlap_loads else compute_s + load_s
