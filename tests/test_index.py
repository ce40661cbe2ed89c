"""KV index: wire format (against vLLM's own event classes), application order, matching, tiers."""

from __future__ import annotations

import pathlib

import msgspec
import pytest

from kvmesh.index.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, decode_batch, encode_batch
from kvmesh.index.hashing import block_keys
from kvmesh.index.index import KvIndex

BS = 4


def stored(hashes: list[int], parent: int | None, tokens: list[int], medium: str | None = None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS,
                       medium=medium)


def batch(*events: object) -> EventBatch:
    return EventBatch(1.0, list(events))  # type: ignore[arg-type]


def test_decodes_vllms_own_encoding() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events", reason="vLLM not installed")
    ev = kv.BlockStored(block_hashes=[11, 12], parent_block_hash=None, token_ids=list(range(8)), block_size=4,
                        lora_id=None, medium="GPU", lora_name=None)
    payload = msgspec.msgpack.Encoder().encode(kv.KVEventBatch(ts=5.0, events=[
        ev, kv.BlockRemoved(block_hashes=[12], medium="GPU"), kv.AllBlocksCleared()], data_parallel_rank=0))
    b = decode_batch(payload)
    assert b.ts == 5.0 and b.data_parallel_rank == 0
    assert isinstance(b.events[0], BlockStored) and b.events[0].block_hashes == [11, 12]
    assert b.events[0].token_ids == list(range(8)) and b.events[0].medium == "GPU"
    assert isinstance(b.events[1], BlockRemoved) and b.events[1].block_hashes == [12]
    assert isinstance(b.events[2], AllBlocksCleared)


def test_decodes_array_encoded_events_of_older_vllm() -> None:
    # Older vLLM: events were array_like tagged structs: [tag, block_hashes, parent, token_ids, block_size, lora_id]
    payload = msgspec.msgpack.encode([2.0, [["BlockStored", [1], None, [1, 2, 3, 4], 4, None],
                                            ["BlockRemoved", [1]], ["AllBlocksCleared"]]])
    b = decode_batch(payload)
    assert isinstance(b.events[0], BlockStored) and b.events[0].token_ids == [1, 2, 3, 4]
    assert isinstance(b.events[1], BlockRemoved) and isinstance(b.events[2], AllBlocksCleared)
    with pytest.raises(ValueError, match="undecodable"):
        decode_batch(b"\x01garbage")


def test_round_trip_of_our_encoder() -> None:
    b = batch(stored([1], None, [1, 2, 3, 4]))
    assert decode_batch(encode_batch(b)) == b


def test_index_keys_match_our_tokenisation_and_prefixes() -> None:
    idx = KvIndex("m")
    toks = list(range(100, 112))  # 3 blocks
    idx.apply("a", batch(stored([1, 2], None, toks[:8])))
    idx.apply("a", batch(stored([3], 2, toks[8:12])))
    keys = block_keys(toks, BS, idx.seed)
    assert idx.engine_keys("a") == set(keys)
    assert idx.block_size == BS
    m = idx.match(keys, ["a", "b"])
    assert (m[0].gpu, m[1].gpu) == (3, 0)
    # a prompt diverging in block 2 matches only the first block
    other = block_keys([*toks[:4], 0, 0, 0, 0, *toks[8:]], BS, idx.seed)
    assert idx.match(other, ["a"])[0].gpu == 1


def test_removal_clear_and_orphans() -> None:
    idx = KvIndex("m")
    toks = list(range(8))
    idx.apply("a", batch(stored([1, 2], None, toks)))
    idx.apply("b", batch(stored([7, 8], None, toks)))  # same content, other engine, other hashes
    keys = block_keys(toks, BS, idx.seed)
    idx.apply("a", batch(BlockRemoved(block_hashes=[2])))
    assert [m.gpu for m in idx.match(keys, ["a", "b"])] == [1, 2]
    idx.apply("b", batch(AllBlocksCleared()))
    assert [m.gpu for m in idx.match(keys, ["a", "b"])] == [1, 0]
    idx.apply("a", batch(stored([9], 12345, [1, 1, 1, 1])))  # parent never seen
    assert idx.engines["a"].orphans == 1
    assert idx.clear_engine("a") == 1 and idx.size() == 0


def test_lower_tiers_continue_the_chain() -> None:
    idx = KvIndex("m")
    toks = list(range(16))
    idx.apply("a", batch(stored([1], None, toks[:4])))                       # GPU
    idx.apply("a", batch(stored([2, 3], 1, toks[4:12], medium="CPU")))       # CPU
    idx.apply("a", batch(stored([4], 3, toks[12:16], medium="STORAGE")))     # SSD
    m = idx.match(block_keys(toks, BS, idx.seed), ["a"])[0]
    assert (m.gpu, m.cpu, m.storage) == (1, 2, 1)
    idx.apply("a", batch(BlockRemoved(block_hashes=[2], medium="CPU")))
    m = idx.match(block_keys(toks, BS, idx.seed), ["a"])[0]
    assert (m.gpu, m.cpu, m.storage) == (1, 0, 0)


def test_pending_entries_expire_and_refresh() -> None:
    idx = KvIndex("m", pending_ttl_s=10)
    idx.block_size = BS
    keys = block_keys(list(range(8)), BS, idx.seed)
    idx.add_pending("a", keys)
    assert idx.match(keys, ["a"])[0].gpu == 2
    idx.expire_pending(now=1e18)
    assert idx.match(keys, ["a"])[0].gpu == 0


def test_pending_entries_follow_the_given_clock() -> None:
    """The virtual-time simulator passes its own clock: speculative entries expire in simulated time."""
    now = [100.0]
    idx = KvIndex("m", pending_ttl_s=2, clock=lambda: now[0])
    idx.block_size = BS
    keys = block_keys(list(range(8)), BS, idx.seed)
    idx.add_pending("a", keys)
    now[0] = 101.9
    assert idx.match(keys, ["a"])[0].gpu == 2
    now[0] = 102.1
    assert idx.match(keys, ["a"])[0].gpu == 0


def test_forgotten_engine_frees_its_bit_for_the_next_one() -> None:
    """Pods come and go with new names: a gone engine leaves nothing behind — blocks, pending entries, entry —
    and the engine after it reuses its bit without inheriting any of it."""
    now = [0.0]
    idx = KvIndex("m", pending_ttl_s=5, clock=lambda: now[0])
    toks = list(range(8))
    keys = block_keys(toks, BS, idx.seed)
    idx.apply("pod-a", batch(stored([1, 2], None, toks)))
    idx.apply("pod-b", batch(stored([3], None, toks[:4])))
    idx.add_pending("pod-a", keys)
    bit = idx.engines["pod-a"].bit
    assert idx.forget_engine("pod-a") == 2 and idx.forget_engine("pod-a") == 0
    assert "pod-a" not in idx.engines and idx.pending_size() == 0
    assert [m.gpu for m in idx.match(keys, ["pod-a", "pod-b"])] == [0, 1]
    assert idx.engine("pod-c").bit == bit  # reused, so the index stays as small as the live fleet
    assert [m.gpu for m in idx.match(keys, ["pod-c", "pod-b"])] == [0, 1]
    # pod-a's queued expiry must not clear what pod-c (same bit) has pending now
    now[0] = 3.0
    idx.add_pending("pod-c", keys)
    now[0] = 6.0  # past pod-a's expiry, before pod-c's
    assert idx.match(keys, ["pod-c"])[0].gpu == 2
    for i in range(100):  # a fleet of churning pods never grows past the live ones
        idx.engine(f"pod-{i}")
        idx.forget_engine(f"pod-{i}")
    assert set(idx.engines) == {"pod-b", "pod-c"} and max(e.bit for e in idx.engines.values()) <= 1


def test_memory_is_bounded_per_engine() -> None:
    idx = KvIndex("m", max_blocks_per_engine=100)
    for i in range(300):
        idx.apply("a", batch(stored([i], None, [i, i, i, i])))
    assert len(idx.engines["a"].hashes) <= 100 and idx.size() <= 100


def test_replay_with_a_hole_is_incomplete_unless_it_restarts_fresh(tmp_path: pathlib.Path) -> None:
    """Gap repair over vLLM's replay protocol, against kvmesh's own publisher (which speaks it): batches the
    publisher no longer buffers must not be skipped silently — unless what follows starts with a clear."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from kvmesh.cache.events import EventPublisher
    from kvmesh.index.subscriber import EventSubscriber, IndexMetrics

    def stored(i: int) -> list[BlockStored]:
        return [BlockStored(block_hashes=[i], parent_block_hash=None, token_ids=list(range(BS)), block_size=BS)]

    async def scenario() -> tuple[bool, bool]:
        pub = EventPublisher(f"ipc://{tmp_path}/ev.sock", f"ipc://{tmp_path}/replay.sock", buffer=2)
        pub.start()  # seq s0: AllBlocksCleared
        s0 = pub.seq - 1
        for i in range(4):  # s0+1 .. s0+4; the buffer keeps the last two
            pub._send(stored(i))
        sub = EventSubscriber(KvIndex("m"), "e", f"ipc://{tmp_path}/ev.sock", IndexMetrics(CollectorRegistry()),
                              f"ipc://{tmp_path}/replay.sock")
        holed = await sub._replay(s0 + 1, s0 + 5)  # s0+1, s0+2 are gone
        pub._send([AllBlocksCleared()])  # s0+5: a fresh start
        pub._send(stored(9))             # s0+6; the buffer now holds s0+5, s0+6
        fresh = await sub._replay(s0 + 4, s0 + 7)  # s0+4 is gone, but s0+5 starts with a clear
        await pub.close()
        return holed, fresh

    holed, fresh = asyncio.run(scenario())
    assert holed is False and fresh is True


def _walk(idx: KvIndex, name: str) -> list[int]:
    counts = [0, 0, 0]
    for _, tiers in idx.engines[name].hashes.values():
        for t in range(3):
            counts[t] += tiers >> t & 1
    return counts


def test_events_the_index_cannot_key_are_skipped_and_teach_it_nothing() -> None:
    idx = KvIndex("m")
    toks = list(range(8))
    # vLLM's offloading connector's placeholder store (no block size, no tokens), another KV-cache group's
    # store (hybrid models), a medium the index does not track: none keys anything, none sets the block size
    idx.apply("a", batch(BlockStored(block_hashes=[5], parent_block_hash=None, token_ids=[], block_size=0,
                                     medium="CPU"),
                         BlockStored(block_hashes=[6, 7], parent_block_hash=None, token_ids=toks, block_size=BS,
                                     group_idx=1),
                         stored([8], None, toks[:4], medium="NVME")))
    assert idx.block_size is None and idx.size() == 0 and idx.engines["a"].skipped == 3
    idx.apply("a", batch(stored([1, 2], None, toks), stored([3], 2, [9, 9, 9, 9], medium="cpu")))  # lower case
    m = idx.match(block_keys([*toks, 9, 9, 9, 9], BS, idx.seed), ["a"])[0]
    assert idx.block_size == BS and (m.gpu, m.cpu) == (2, 1)
    idx.apply("a", batch(BlockRemoved(block_hashes=[1, 2], group_idx=1)))  # another group's removal
    assert idx.match(block_keys(toks, BS, idx.seed), ["a"])[0].gpu == 2


def test_a_hash_stored_again_keeps_its_key_and_its_removal_leaves_nothing() -> None:
    idx = KvIndex("m")
    idx.apply("a", batch(stored([1, 2], None, list(range(8)))))
    idx.apply("a", batch(stored([2], 1, [7, 7, 7, 7], medium="CPU")))  # the same hash, other content
    idx.apply("a", batch(BlockRemoved(block_hashes=[1, 2]), BlockRemoved(block_hashes=[2], medium="CPU")))
    assert idx.size() == 0 and not idx.engines["a"].hashes


def test_per_tier_counts_follow_every_change() -> None:
    idx = KvIndex("m", max_blocks_per_engine=6)
    toks = list(range(40))
    idx.apply("a", batch(stored(list(range(1, 6)), None, toks[:20])))
    idx.apply("a", batch(stored([3, 4], 2, toks[8:16], medium="CPU"), stored([11], None, toks[20:24], "STORAGE")))
    assert idx.engines["a"].counts == _walk(idx, "a") == [5, 2, 1]
    idx.apply("a", batch(BlockRemoved(block_hashes=[4], medium="CPU"), BlockRemoved(block_hashes=[5, 99])))
    assert idx.engines["a"].counts == _walk(idx, "a")
    idx.clear_tiers("a", 0b010)
    assert idx.engines["a"].counts == _walk(idx, "a")
    idx.apply("a", batch(stored([21, 22, 23], None, toks[24:36])))  # over 6: the oldest tenth is shed
    assert idx.engines["a"].counts == _walk(idx, "a")
    idx.clear_engine("a")
    assert idx.engines["a"].counts == [0, 0, 0]


def test_the_salt_is_not_the_lora_name() -> None:
    idx = KvIndex("m")
    ev = BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=BS,
                     lora_name="adapter", extra_keys=[("adapter",)])
    idx.apply("a", batch(ev))
    assert idx.match(block_keys([1, 2, 3, 4], BS, idx.seed), ["a"])[0].gpu == 1  # no salt: the plain chain


def test_an_engine_reset_or_restart_keeps_what_its_cache_node_holds_for_it() -> None:
    from prometheus_client import CollectorRegistry

    from kvmesh.index.subscriber import EventSubscriber, IndexMetrics, NodeSubscriber

    idx = KvIndex("m")
    toks = list(range(8))
    keys = block_keys(toks, BS, idx.seed)
    metrics = IndexMetrics(CollectorRegistry())
    sub = EventSubscriber(idx, "a", "tcp://127.0.0.1:9", metrics)
    node = NodeSubscriber(idx, "node", "tcp://127.0.0.1:8", ["a"], metrics)
    sub._apply(0, encode_batch(batch(stored([1, 2], None, toks), stored([3], None, toks[:4], medium="CPU"))))
    node._apply(0, encode_batch(batch(stored([31, 32], None, toks, medium="CPU"))))
    # vLLM reset its prefix cache: the events before the clear count, then everything the engine reported goes
    sub._apply(1, encode_batch(batch(BlockRemoved(block_hashes=[2]), AllBlocksCleared(), stored([1], None, toks[:4]))))
    m = idx.match(keys, ["a"])[0]
    assert (m.gpu, m.cpu) == (1, 1) and idx.engines["a"].counts == [1, 0, 0]  # the node's blocks stay readable
    sub._drop()  # a restart, an unrepaired gap, a lost connection: its own in-process offload goes with it
    m = idx.match(keys, ["a"])[0]
    assert (m.gpu, m.cpu) == (0, 2) and not idx.engines["a"].hashes


def test_a_cache_node_is_applied_once_and_read_by_every_engine_it_serves(make_gateway, loop_thread) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import CollectorRegistry

    from kvmesh.config import CacheNodeSpec
    from kvmesh.index.subscriber import IndexMetrics, NodeSubscriber

    idx = KvIndex("m")
    toks = list(range(8))
    keys = block_keys(toks, BS, idx.seed)
    node = NodeSubscriber(idx, "node", "tcp://127.0.0.1:9", ["a"], IndexMetrics(CollectorRegistry()), serves_new=True)
    idx.apply("a", batch(stored([1], None, toks[:4])))  # a's own GPU block
    node._apply(0, encode_batch(batch(stored([51, 52], None, toks, medium="CPU"))))
    node.serve(["b"])  # an engine that came later (autoscaled, discovered)
    assert [(m.gpu, m.cpu) for m in idx.match(keys, ["a", "b"])] == [(1, 1), (0, 2)]
    assert idx.size() == 3  # the node's two blocks once, not once per engine
    node._apply(1, encode_batch(batch(AllBlocksCleared())))  # the node restarted
    assert [(m.gpu, m.cpu) for m in idx.match(keys, ["a", "b"])] == [(1, 0), (0, 0)]
    # the gateway: a backend added after start reads a node that serves every backend
    gw = make_gateway(backends=(), policy="kv-aware",
                      cache_nodes=(CacheNodeSpec(kv_events="ipc:///nonexistent/kvmesh-test-node"),))

    def add() -> None:
        gw.subscribe(gw.pool.add("late", "http://127.0.0.1:9"))

    loop_thread.call(add)
    assert loop_thread.call(lambda: gw.index._reads.get("late", 0)) != 0
