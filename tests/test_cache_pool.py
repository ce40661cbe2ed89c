"""Cache nodes as one pool: three or four real ``kvmesh cache-node`` processes on loopback, driven by the
real client (the connector's) through each node's socket."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import msgspec
import pytest

from kvmesh.cache import protocol as proto
from kvmesh.cache.chunk import ObjectMeta, checksum
from kvmesh.cache.client import NodeClient
from kvmesh.cache.pool import peer
from kvmesh.cache.pool.ring import Ring
from kvmesh.cache.protocol import CommitItem
from kvmesh.cache.stats import NodeStats, PoolUse, TierUse
from tests.helpers import free_port_block, wait_until
from tests.servers import etcd_server

KB = 1 << 10


class Pool:
    def __init__(self, tmp: pathlib.Path, n: int, replicas: int, start: int | None = None,
                 etcd: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.etcd = etcd
        self.extra = extra
        self.ids = [f"n{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
        base = free_port_block(n)
        self.ports = {nid: base + i for i, nid in enumerate(self.ids)}
        self.replicas = replicas
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for nid in self.ids[:start if start is not None else n]:
            self.start(nid)
        self.converge()

    def converge(self) -> None:
        """Wait until every running node's ring holds every running node (and the outside members)."""
        members = len(self.procs) + sum(a.startswith("--peer=") for a in self.extra)
        for nid in self.procs:
            c = self.client(nid)

            def sees_all(c: NodeClient = c) -> bool:
                return pool_members(c) == members

            wait_until(sees_all, 30, f"node {nid} to see the pool")

    def sock(self, nid: str) -> pathlib.Path:
        return self.tmp / nid / "node.sock"

    def start(self, nid: str) -> None:
        d = self.tmp / nid
        d.mkdir(exist_ok=True)
        peers = ([f"--etcd={self.etcd}", "--etcd-ttl-s=2"] if self.etcd
                 else [f"--peer={o}=127.0.0.1:{p}" for o, p in self.ports.items()])
        self.procs[nid] = subprocess.Popen(
            [sys.executable, "-m", "kvmesh", "cache-node", "--socket", str(self.sock(nid)), "--run-dir", str(d),
             "--node-id", nid, "--peer-port", str(self.ports[nid]), "--replicas", str(self.replicas),
             "--dram-mib", "64", "--ssd-mib", "0", *peers, *self.extra],
            stdout=subprocess.DEVNULL, stderr=open(d / "log", "ab"))  # noqa: SIM115

    def client(self, nid: str) -> NodeClient:
        return NodeClient(self.sock(nid), retry_s=0.0)

    def kill(self, nid: str) -> None:
        self.procs[nid].send_signal(signal.SIGKILL)
        self.procs[nid].wait(10)
        del self.procs[nid]

    def terminate(self, nid: str) -> None:
        self.procs[nid].send_signal(signal.SIGTERM)
        self.procs[nid].wait(30)
        del self.procs[nid]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()


@pytest.fixture
def make_pool(tmp_path: pathlib.Path) -> Iterator[object]:
    made: list[Pool] = []

    def make(n: int = 3, replicas: int = 1, start: int | None = None, etcd: str | None = None,
             extra: tuple[str, ...] = ()) -> Pool:
        p = Pool(tmp_path, n, replicas, start, etcd, extra)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def used_bytes(c: NodeClient) -> int:
    st = c.stats()
    assert st is not None
    return st.dram.used_bytes


def dram_objects(c: NodeClient) -> int:
    st = c.stats()
    return st.dram.objects if st is not None else 0


def pool_members(c: NodeClient) -> int | None:
    st = c.stats()
    return st.pool.members if st is not None and st.pool is not None else None


def put(c: NodeClient, key: bytes, data: bytes) -> None:
    [v] = c.reserve([(key, len(data))])
    assert v is not None
    v[:] = data
    v.release()
    assert c.commit([CommitItem(key, checksum(data), None, [1, 2], 2)])


def chunks(n: int) -> dict[bytes, bytes]:
    return {uuid.uuid4().bytes: os.urandom(64 * KB) for _ in range(n)}


def wait_replicated(pool: Pool, data: dict[bytes, bytes]) -> None:
    """Wait until every chunk is held by each of its owners (replication is write-behind)."""
    ring = Ring.build({n: 64 << 20 for n in pool.procs})
    clients = {n: pool.client(n) for n in pool.procs}

    def done() -> bool:
        return all(clients[o].lookup([k], local=True) for k in data for o in ring.owners(k, pool.replicas))

    wait_until(done, 30, "every chunk on each of its owners")


def read_all(c: NodeClient, data: dict[bytes, bytes], direct: bool = False) -> tuple[int, int]:
    """(found, wrong) over every key, each read through the node's shared memory; ``direct``: chunks only
    peers hold are read from them by this process (the connector's way), else fetched by the node."""
    found = wrong = 0
    for k, v in data.items():
        leases = c.get([k], fetch_size=len(v) if direct else 0)
        if leases:
            found += 1
            wrong += bytes(leases[0].view) != v or not leases[0].verify()
        c.release(leases)
    return found, wrong


@pytest.mark.parametrize("direct", [False, True], ids=["node-fetches", "direct"])
def test_written_on_a_read_on_c(make_pool, direct: bool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(3)
    a, _, c = (pool.client(n) for n in pool.ids)
    data = chunks(20)
    for k, v in data.items():
        put(a, k, v)
    assert c.lookup(list(data)) in range(0, 21)
    wait_until(lambda: c.lookup(list(data)) == 20, 30, "C to see every chunk through the pool")
    held_before = c.lookup(list(data), local=True)
    owned = sum(c.lookup([k], local=True) for k in data)  # the chunks C owns itself
    assert read_all(c, data, direct) == (20, 0)
    assert c.lookup(list(data), local=True) == 20 > held_before  # C kept local copies for its engines
    assert read_all(c, data, direct) == (20, 0)  # now from C's own DRAM
    # the cluster view, from any node
    r = subprocess.run([sys.executable, "-m", "kvmesh", "cache", "status", "--socket", str(pool.sock(pool.ids[2])),
                        "--json"], capture_output=True, text=True, timeout=60)
    view = json.loads(r.stdout)
    nodes = {nid: msgspec.convert(st, NodeStats) for nid, st in view.pop("nodes").items()}
    assert sorted(nodes) == sorted(pool.ids) and msgspec.convert(view, NodeStats) == nodes[pool.ids[2]]
    assert all(st.pool == PoolUse(members=3, replicas=1) for st in nodes.values())
    assert all(st.dram.capacity_bytes == 64 << 20 and st.ssd.capacity_bytes == 0 for st in nodes.values())
    reads = nodes[pool.ids[2]].reads  # C fetched what it does not own from its peers, once
    assert reads.pool == 20 - owned and reads.pool_direct == (20 - owned if direct else 0)
    assert sum(st.dram.objects for st in nodes.values()) >= 40  # A's copies + the owners'
    human = subprocess.run([sys.executable, "-m", "kvmesh", "cache", "status", "--socket", str(pool.sock(pool.ids[2]))],
                           capture_output=True, text=True, timeout=60).stdout
    assert human.count("node ") == 3 and "pool of 3 (R=1)" in human and "hit rate" in human
    assert f"{20 - owned} from pool peers, {reads.pool_direct} of them read directly by engines" in human


@pytest.mark.parametrize("direct", [False, True], ids=["node-fetches", "direct"])
def test_r2_survives_a_node_kill_during_reads(make_pool, direct: bool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(3, replicas=2)
    a_id, b_id, c_id = pool.ids
    a, c = pool.client(a_id), pool.client(c_id)
    data = chunks(60)
    for k, v in data.items():
        put(a, k, v)
    wait_replicated(pool, data)
    items = list(data.items())
    first = dict(items[:20])
    assert read_all(c, first, direct) == (20, 0)
    pool.kill(b_id)  # mid-run: the remaining 40 reads go on
    assert read_all(c, dict(items[20:]), direct) == (40, 0)
    assert read_all(a, data, direct) == (60, 0)


@pytest.mark.parametrize("direct", [False, True], ids=["node-fetches", "direct"])
def test_r1_node_kill_gives_misses_never_errors(make_pool, direct: bool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(3, replicas=1)
    _, b_id, c_id = pool.ids
    b, c = pool.client(b_id), pool.client(c_id)
    data = chunks(60)
    for k, v in data.items():
        put(b, k, v)  # written on B: B's own keys exist nowhere else
    wait_replicated(pool, data)
    ring = Ring.build({n: 64 << 20 for n in pool.ids})
    on_b = {k: v for k, v in data.items() if ring.owners(k)[0] == b_id}
    elsewhere = {k: v for k, v in data.items() if k not in on_b}
    assert on_b and elsewhere
    pool.kill(b_id)
    assert read_all(c, on_b, direct) == (0, 0)  # misses (the engine recomputes), never errors or wrong bytes
    assert read_all(c, elsewhere, direct) == (len(elsewhere), 0)


def test_direct_batch_read_and_reservation_hygiene(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(3)
    a, c = pool.client(pool.ids[0]), pool.client(pool.ids[2])
    data = chunks(12)
    for k, v in data.items():
        put(a, k, v)
    wait_replicated(pool, data)
    keys = list(data)
    ring = Ring.build({n: 64 << 20 for n in pool.ids})
    remote = [k for k in keys if ring.owners(k)[0] != pool.ids[2]]  # C holds none of these
    used = used_bytes(c)
    # The wrong chunk size (a misconfigured engine): nothing is read, and the space reserved for it is freed.
    assert remote and c.get(remote, fetch_size=32 * KB) == []
    wait_until(lambda: used_bytes(c) == used, 10, "the reservations to be freed")
    # A batch: local copies first, then one request per owner; every byte right.
    leases = c.get(keys, fetch_size=64 * KB)
    assert [le.key for le in leases] == keys
    assert all(bytes(le.view) == data[le.key] for le in leases)
    c.release(leases)
    assert c.lookup(keys, local=True) == len(keys)
    # An engine that goes away with reservations open (killed mid-read) leaves no space behind.
    more = {k: v for k, v in chunks(12).items() if ring.owners(k)[0] != pool.ids[2]}  # C does not hold them
    for k, v in more.items():
        put(a, k, v)
    wait_replicated(pool, more)
    used = used_bytes(c)
    dying = pool.client(pool.ids[2])
    dying._call(proto.Get(list(more), 64 * KB))  # the plan's space is reserved; the engine never reads or commits
    assert used_bytes(c) == used + len(more) * 64 * KB
    dying.close()
    wait_until(lambda: used_bytes(c) == used, 10, "a gone engine's reservations to be freed")
    assert read_all(c, more, direct=True) == (len(more), 0)


def test_direct_read_of_a_corrupt_copy_is_a_miss(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(3)
    a_id, b_id, c_id = pool.ids
    a, c = pool.client(a_id), pool.client(c_id)
    data = chunks(30)
    for k, v in data.items():
        put(a, k, v)
    wait_replicated(pool, data)
    ring = Ring.build({n: 64 << 20 for n in pool.ids})
    on_b = [k for k in data if ring.owners(k)[0] == b_id]
    assert on_b
    b = pool.client(b_id)
    [le] = b.get([on_b[0]])  # flip a byte of B's copy in its shared memory
    le.view[100] ^= 0xFF
    b.release([le])
    assert read_all(c, {on_b[0]: data[on_b[0]]}, direct=True) == (0, 0)  # a miss, never wrong bytes
    assert c.lookup([on_b[0]], local=True) == 0  # and no bad local copy
    assert read_all(c, {k: data[k] for k in on_b[1:]}, direct=True) == (len(on_b) - 1, 0)


def test_direct_read_falls_back_to_the_remote_tier(make_pool, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    shared = tmp_path / "shared-tier"
    pool = make_pool(3, extra=(f"--remote=file://{shared}",))
    a_id, b_id, c_id = pool.ids
    a, c = pool.client(a_id), pool.client(c_id)
    data = chunks(30)
    for k, v in data.items():
        put(a, k, v)  # write-behind to the owner and to the shared tier
    wait_replicated(pool, data)
    wait_until(lambda: len(list(shared.rglob("*"))) >= 30, 30, "the chunks on the shared tier")
    ring = Ring.build({n: 64 << 20 for n in pool.ids})
    on_b = {k: v for k, v in data.items() if ring.owners(k)[0] == b_id}
    pool.kill(b_id)  # C may still plan to read from B: the client finds B gone, then asks the tier
    assert read_all(c, on_b, direct=True) == (len(on_b), 0)


def test_join_moves_about_one_nth(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(4, replicas=1, start=3)
    a = pool.client(pool.ids[0])
    data = chunks(200)
    for k, v in data.items():
        put(a, k, v)
    d_id = pool.ids[3]
    pool.start(d_id)
    d = pool.client(d_id)
    pool.converge()
    ring4 = Ring.build({n: 64 << 20 for n in pool.ids})
    mine = [k for k in data if ring4.owners(k)[0] == d_id]
    wait_until(lambda: dram_objects(d) >= len(mine), 30, "the rebalance to reach the new node")
    moved = dram_objects(d)
    assert moved <= 1.5 * len(data) / 4, moved  # only the keys the new node now owns
    assert read_all(d, {k: data[k] for k in mine}) == (len(mine), 0)


def test_ring_moves_at_most_1_5_over_n() -> None:
    keys = [uuid.uuid4().bytes for _ in range(20_000)]
    for n in (3, 5, 8):
        nodes = {f"n{i}": 1 << 30 for i in range(n)}
        before = Ring.build(nodes)
        after = Ring.build({**nodes, "new": 1 << 30})
        moved = sum(before.owners(k) != after.owners(k) for k in keys) / len(keys)
        assert moved <= 1.5 / (n + 1), (n, moved)
        gone = Ring.build({k: v for k, v in nodes.items() if k != "n0"})
        moved = sum(before.owners(k) != gone.owners(k) for k in keys) / len(keys)
        assert moved <= 1.5 / n, (n, moved)


def test_ring_weights_by_capacity() -> None:
    keys = [uuid.uuid4().bytes for _ in range(20_000)]
    ring = Ring.build({"small": 1 << 30, "big": 2 << 30})
    share = sum(ring.owners(k)[0] == "big" for k in keys) / len(keys)
    assert 0.6 < share < 0.73  # ~2/3
    assert len(set(ring.owners(keys[0], 2))) == 2 and ring.owners(keys[0], 5) == ring.owners(keys[0], 2)


def test_etcd_membership_join_leave_and_expiry(make_pool, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    with etcd_server(tmp_path) as etcd:
        pool = make_pool(4, replicas=1, start=3, etcd=etcd)  # no static list: found through etcd
        a_id, b_id, c_id, d_id = pool.ids
        a, c = pool.client(a_id), pool.client(c_id)
        data = chunks(30)
        for k, v in data.items():
            put(a, k, v)
        wait_until(lambda: c.lookup(list(data)) == 30, 30, "C to find every chunk through the pool")
        assert read_all(c, data) == (30, 0)
        pool.start(d_id)  # joins without restarting anyone
        pool.converge()
        pool.terminate(c_id)  # a clean stop revokes its lease: the others drop it at once
        pool.converge()
        pool.kill(b_id)  # a crash: its lease expires (2 s here)
        wait_until(lambda: pool_members(a) == 2, 30, "B's lease to expire")
        assert read_all(pool.client(d_id), data)[1] == 0  # never wrong bytes
        pool.stop()  # while etcd still runs: the nodes revoke their leases


def test_a_killed_nodes_arena_is_swept_by_the_next_node(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(1)
    nid = pool.ids[0]
    pid = pool.procs[nid].pid
    arena = pathlib.Path("/dev/shm") / f"kvmesh-{nid}.{pid}"
    assert arena.exists()
    pool.kill(nid)  # SIGKILL: no chance to unlink
    assert arena.exists()
    pool.start(nid)
    wait_until(lambda: pool.client(nid).stats() is not None, 30, "the restarted node")
    assert not arena.exists()


class BrokenPeer:
    """A pool member that answers health checks and lookups correctly but breaks every GET: the reply
    announces whole chunks, then the connection ends halfway through the first one (``mode="truncate"``) or
    the bytes are not the chunk's (``mode="garbage"``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.gets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    req = peer.req_decoder.decode(proto.recv_frame(conn))
                except (OSError, ConnectionError):
                    return
                if isinstance(req, peer.PStats):
                    conn.sendall(peer.encode(peer.PStatsReply(NodeStats(
                        node_id="evil", dram=TierUse(capacity_bytes=64 << 20), ssd=TierUse()))))
                elif isinstance(req, peer.PHas):
                    conn.sendall(peer.encode(peer.PHasReply([True] * len(req.keys))))
                elif isinstance(req, peer.PGet):
                    self.gets += 1
                    good = bytes(64 * KB)
                    metas = [ObjectMeta(k, len(good), checksum(good)) for k in req.keys]
                    conn.sendall(peer.encode(peer.PGetReply(metas)))
                    if self.mode == "truncate":
                        conn.sendall(good[:len(good) // 2])
                        return
                    for _ in metas:
                        conn.sendall(os.urandom(len(good)))

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("mode", ["truncate", "garbage"])
@pytest.mark.parametrize("direct", [False, True], ids=["node-fetches", "direct"])
def test_a_peer_that_breaks_the_protocol_gives_misses(make_pool, mode: str, direct: bool) -> None:  # type: ignore[no-untyped-def]
    evil = BrokenPeer(mode)
    try:
        pool = make_pool(1, extra=(f"--peer=evil=127.0.0.1:{evil.port}",))
        c = pool.client(pool.ids[0])  # (the pool formed: the node took the broken peer in)
        ring = Ring.build({pool.ids[0]: 64 << 20, "evil": 64 << 20})
        keys = [k for k in (uuid.uuid4().bytes for _ in range(40)) if ring.owners(k)[0] == "evil"][:8]
        used = used_bytes(c)
        assert c.lookup(keys) == len(keys)  # it claims to hold them all
        for k in keys:
            assert c.get([k], fetch_size=64 * KB if direct else 0) == []  # a miss each time, never bad bytes
        assert evil.gets >= 1
        assert c.lookup(keys, local=True) == 0  # nothing it sent was kept
        wait_until(lambda: used_bytes(c) == used, 10, "the space reserved for it to be freed")
        assert pool_members(c) in (1, 2)  # the node is still serving
    finally:
        evil.close()
