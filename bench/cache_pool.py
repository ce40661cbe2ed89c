"""The cache pool, side by side with Redis 7 in one run, and pooled vs per-node hit rates on Mooncake.

1. Throughput: three ``kvmesh cache-node`` processes on loopback forming a pool (R=1) and one
   ``redis-server``, the same objects (1, 4, 32 MB) and the same Python process as client.
   - pool PUT: written through node A's shared memory, timed until the object sits on its owner node (keys
     are picked so the owner is another node: every byte crosses the network); Redis: ``SET``.
   - pool GET: read through node C's shared memory (lease, verify, copy out) of objects C does not hold, so
     each is fetched from its owner over TCP first; Redis: ``GET`` (redis-py with hiredis).
   Also, same run: GET of objects C now holds; one batched GET vs a Redis pipeline; GETs the node fetches
   itself (two hops); ``--workers`` client processes at once on both sides; reads straight from the owner
   with no local node; and a bare TCP transfer of the same objects (the ceiling for any one-hop store here).
   Best of ``--reps`` per size, sides interleaved.
2. Hit rate: the Mooncake conversation trace through 8 per-node LRU caches vs one pooled LRU cache of the
   same total size (requests placed round-robin) — a trace-driven model of the tier (kvmesh.bench.cachesim),
   not the engine simulator; reported at several sizes (fractions of the trace's unique blocks).

    python bench/cache_pool.py [--reps 3] [--trace ../shared/traces/mooncake/conversation_trace.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.bench.cachesim import simulate
from kvmesh.cache.chunk import checksum
from kvmesh.cache.client import NodeClient
from kvmesh.cache.pool.direct import PeerReader
from kvmesh.cache.pool.ring import Ring
from kvmesh.cache.protocol import CommitItem
from kvmesh.workloads import infinite_cache_hit_rate, load_mooncake

MB = 1 << 20
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
DEFAULT_TRACE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, tmp: pathlib.Path, dram_mib: int) -> None:
        self.tmp = tmp
        self.ids = [f"node{i}-{uuid.uuid4().hex[:4]}" for i in range(3)]
        self.ports = {n: free_port() for n in self.ids}
        self.procs = []
        peers = [f"--peer={n}=127.0.0.1:{p}" for n, p in self.ports.items()]
        for n in self.ids:
            d = tmp / n
            d.mkdir()
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "kvmesh", "cache-node", "--socket", str(d / "s.sock"), "--run-dir", str(d),
                 "--node-id", n, "--peer-port", str(self.ports[n]), "--dram-mib", str(dram_mib), "--ssd-mib", "0",
                 *peers], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.clients = {n: NodeClient(tmp / n / "s.sock", retry_s=0.0, timeout_s=60) for n in self.ids}
        self.ring = Ring.build({n: dram_mib << 20 for n in self.ids})
        deadline = time.monotonic() + 60
        while not all((st := c.stats()) is not None and st.pool is not None and st.pool.members == 3
                      for c in self.clients.values()):
            if time.monotonic() > deadline:
                raise SystemExit("the pool did not form")
            time.sleep(0.1)

    def keys_owned_by(self, owner: str, n: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < n:
            k = uuid.uuid4().bytes
            if self.ring.owners(k)[0] == owner:
                out.append(k)
        return out

    def stop(self) -> None:
        for c in self.clients.values():
            c.close()
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(30)


def pool_put(cl: Cluster, writer: str, owner: str, objs: list[np.ndarray]) -> tuple[float, list[bytes]]:
    keys = cl.keys_owned_by(owner, len(objs))
    w, o = cl.clients[writer], cl.clients[owner]
    t0 = time.perf_counter()
    for k, x in zip(keys, objs, strict=True):
        [v] = w.reserve([(k, x.nbytes)])
        assert v is not None, "arena too small"
        np.frombuffer(v, dtype=np.uint8)[:] = x
        w.commit([CommitItem(k, checksum(v), None, [], 0)], wait=False)  # pipelined, as the connector does
        v.release()
    while o.lookup(keys, local=True) < len(keys):  # write-behind: done when the owner holds every object
        time.sleep(0.0005)
    return time.perf_counter() - t0, keys


def pool_get(cl: Cluster, reader: str, keys: list[bytes], out: list[np.ndarray], direct: bool = True) -> float:
    r = cl.clients[reader]
    size = out[0].nbytes if direct else 0  # the chunk size, as the connector passes it: direct reads
    t0 = time.perf_counter()
    for k, dst in zip(keys, out, strict=True):
        leases = r.get([k], fetch_size=size)
        assert len(leases) == 1 and leases[0].verify()
        dst[:] = np.frombuffer(leases[0].view, dtype=np.uint8)
        r.release(leases)
    return time.perf_counter() - t0


def owner_only_get(cl: Cluster, owner: str, keys: list[bytes], out: list[np.ndarray]) -> float:
    """Reads straight from the owner's peer port, as if the local node did not exist (no local copy, no
    lookup): checksum-verified and copied out like the other rows.  What an owner-first design could do."""
    reader = PeerReader(timeout_s=60)
    buf = memoryview(bytearray(out[0].nbytes))
    addr = f"127.0.0.1:{cl.ports[owner]}"
    reader.get(addr, [b"warm-up"], lambda j, m: None)  # connect before the clock starts
    t0 = time.perf_counter()
    for k, dst in zip(keys, out, strict=True):
        [meta] = reader.get(addr, [k], lambda j, m: buf)
        if checksum(buf) != meta.checksum:
            raise SystemExit("owner-only read: checksum mismatch")
        dst[:] = np.frombuffer(buf, dtype=np.uint8)
    t = time.perf_counter() - t0
    reader.close()
    return t


def pool_get_batch(cl: Cluster, reader: str, keys: list[bytes], out: list[np.ndarray]) -> float:
    """One request for every object, as the connector asks for a prompt's chunks."""
    r = cl.clients[reader]
    t0 = time.perf_counter()
    leases = r.get(keys, fetch_size=out[0].nbytes)
    assert len(leases) == len(keys)
    for le, dst in zip(leases, out, strict=True):
        assert le.verify()
        dst[:] = np.frombuffer(le.view, dtype=np.uint8)
    r.release(leases)
    return time.perf_counter() - t0


def redis_get_batch(r: Any, objs: list[np.ndarray], out: list[np.ndarray]) -> float:
    keys = [uuid.uuid4().hex for _ in objs]
    for k, x in zip(keys, objs, strict=True):
        r.set(k, x.tobytes())
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    vals = pipe.execute()
    for v, dst in zip(vals, out, strict=True):
        dst[:] = np.frombuffer(v, dtype=np.uint8)  # delivered where the reader wants it, as on the pool side
    t = time.perf_counter() - t0
    r.delete(*keys)
    return t


def redis_side(r: Any, objs: list[np.ndarray], out: list[np.ndarray]) -> tuple[float, float]:
    keys = [uuid.uuid4().hex for _ in objs]
    t0 = time.perf_counter()
    for k, x in zip(keys, objs, strict=True):
        r.set(k, x.tobytes())  # redis-py needs bytes: the copy is part of its PUT path
    put = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k, dst in zip(keys, out, strict=True):
        v = r.get(k)
        dst[:] = np.frombuffer(v, dtype=np.uint8)  # delivered where the reader wants it, as on the pool side
    get = time.perf_counter() - t0
    r.delete(*keys)
    return put, get


def _floor_server(listener: Any, size: int) -> None:
    import socket

    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes()
    ask = bytearray(1)
    while conn.recv_into(ask, 1) == 1:
        conn.sendall(payload)


def tcp_floor(size: int, n: int) -> float:
    """Seconds to move ``n`` objects of ``size`` bytes over loopback TCP between two processes, one request
    at a time, with nothing else: blocking sockets, a one-byte request, ``recv_into`` with ``MSG_WAITALL``, then
    the same copy-out as the other rows.  What any TCP-based store could at best do here."""
    import multiprocessing as mp
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    proc = mp.get_context("fork").Process(target=_floor_server, args=(listener, size))
    proc.start()
    s = socket.create_connection(listener.getsockname())
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, dst = memoryview(bytearray(size)), np.empty(size, dtype=np.uint8)
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            s.sendall(b"g")
            got = 0
            while got < size:
                got += s.recv_into(buf[got:], size - got, socket.MSG_WAITALL)
            dst[:] = np.frombuffer(buf, dtype=np.uint8)
        best = min(best, time.perf_counter() - t0)
    s.close()
    listener.close()
    proc.join(10)
    return best


def _pool_worker(sock: str, keys: list[bytes], size: int, go: Any, done: Any) -> None:
    c = NodeClient(sock, retry_s=0.0, timeout_s=60)
    dst = np.empty(size, dtype=np.uint8)
    c.lookup([b"warm-up"])  # connect before the clock starts
    go.wait()
    ok = 0
    for k in keys:
        leases = c.get([k], fetch_size=size)
        if len(leases) == 1 and leases[0].verify():
            dst[:] = np.frombuffer(leases[0].view, dtype=np.uint8)
            ok += 1
        c.release(leases)
    done.put(ok)


def _redis_worker(port: int, keys: list[str], size: int, go: Any, done: Any) -> None:
    import redis

    r = redis.Redis(port=port)
    dst = np.empty(size, dtype=np.uint8)
    r.ping()
    go.wait()
    ok = 0
    for k in keys:
        v = r.get(k)
        if isinstance(v, bytes) and len(v) == size:
            dst[:] = np.frombuffer(v, dtype=np.uint8)
            ok += 1
    done.put(ok)


def concurrent_get(cl: Cluster, r: Any, port: int, objs: list[np.ndarray], workers: int) -> tuple[float, float]:
    """Seconds for ``workers`` client processes to GET every object once, each its share, one at a time: the
    pool (from node C's engines; every object owned by another node) and Redis, the same objects."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    size = objs[0].nbytes
    _, keys = pool_put(cl, cl.ids[0], cl.ids[1], objs)
    rkeys = [uuid.uuid4().hex for _ in objs]
    for k, x in zip(rkeys, objs, strict=True):
        r.set(k, x.tobytes())
    out = []
    for target, ks in ((_pool_worker, keys), (_redis_worker, rkeys)):
        go, done = ctx.Barrier(workers + 1), ctx.Queue()
        where = str(cl.tmp / cl.ids[2] / "s.sock") if target is _pool_worker else port
        procs = [ctx.Process(target=target, args=(where, ks[i::workers], size, go, done)) for i in range(workers)]
        for p in procs:
            p.start()
        go.wait()
        t0 = time.perf_counter()
        ok = sum(done.get(timeout=120) for _ in procs)
        out.append(time.perf_counter() - t0)
        for p in procs:
            p.join(30)
        if ok != len(objs):
            raise SystemExit(f"{target.__name__}: {ok} of {len(objs)} objects read")
    r.delete(*rkeys)
    return out[0], out[1]


def one_round(cl: Cluster, r: Any, port: int, objs: list[np.ndarray], dst: list[np.ndarray],
              workers: int) -> dict[str, float]:
    """Seconds for each way of moving ``objs`` once, both sides interleaved."""
    a, b, c = cl.ids
    t: dict[str, float] = {}
    t["pool_put"], keys = pool_put(cl, a, b, objs)  # written on A, owned by B
    t["pool_get"] = pool_get(cl, c, keys, dst)  # read on C: fetched from B
    t["pool_get_local"] = pool_get(cl, c, keys, dst)  # read again: C holds them now (no network)
    t["owner_only_get"] = owner_only_get(cl, b, keys, dst)
    t["redis_put"], t["redis_get"] = redis_side(r, objs, dst)
    _, keys = pool_put(cl, a, b, objs)
    t["pool_get_batch"] = pool_get_batch(cl, c, keys, dst)
    t["redis_get_batch"] = redis_get_batch(r, objs, dst)
    _, keys = pool_put(cl, a, b, objs)
    t["pool_get_mediated"] = pool_get(cl, c, keys, dst, direct=False)  # the node fetches (two hops)
    for node in cl.clients.values():
        node.evict_dram()  # (no SSD here: frees the arenas)
    t["pool_get_concurrent"], t["redis_get_concurrent"] = concurrent_get(cl, r, port, objs, workers)
    t["tcp_floor"] = tcp_floor(objs[0].nbytes, len(objs))
    for node in cl.clients.values():
        node.evict_dram()
    return t


def ratios(best: dict[str, float], n: int, size: int) -> dict[str, float]:
    """GB/s per way, and the ratios the result file reports (Redis time over pool time: > 1 is faster)."""
    row = {k: n * size / v / 1e9 for k, v in best.items()}
    row["get_over_redis"] = best["redis_get"] / best["pool_get"]
    row["put_over_redis"] = best["redis_put"] / best["pool_put"]
    row["batch_get_over_redis_pipeline"] = best["redis_get_batch"] / best["pool_get_batch"]
    # against Redis's faster way to read many objects here (pipelining is slower than single GETs for large
    # values with redis-py): the fair ratio for the batch path
    row["batch_get_over_redis_best"] = min(best["redis_get_batch"], best["redis_get"]) / best["pool_get_batch"]
    row["local_get_over_redis"] = best["redis_get"] / best["pool_get_local"]
    row["mediated_get_over_redis"] = best["redis_get"] / best["pool_get_mediated"]
    row["concurrent_get_over_redis"] = best["redis_get_concurrent"] / best["pool_get_concurrent"]
    row["tcp_floor_over_redis"] = best["redis_get"] / best["tcp_floor"]
    row["owner_only_get_over_redis"] = best["redis_get"] / best["owner_only_get"]
    row["get_ms"] = best["pool_get"] / n * 1000
    row["local_get_ms"] = best["pool_get_local"] / n * 1000
    return row


def report(size_mb: int, n: int, workers: int, row: dict[str, float]) -> None:
    print(f"{size_mb:>2} MB x{n}: pool PUT {row['pool_put']:.2f} GB/s vs Redis {row['redis_put']:.2f} "
          f"({row['put_over_redis']:.2f}x); pool GET {row['pool_get']:.2f} GB/s vs Redis "
          f"{row['redis_get']:.2f} ({row['get_over_redis']:.2f}x); batched GET {row['pool_get_batch']:.2f} "
          f"vs Redis pipeline {row['redis_get_batch']:.2f} ({row['batch_get_over_redis_pipeline']:.2f}x; "
          f"{row['batch_get_over_redis_best']:.2f}x Redis's faster way); "
          f"per GET {row['get_ms']:.2f} ms fetched, {row['local_get_ms']:.2f} ms once local "
          f"({row['local_get_over_redis']:.2f}x Redis); node-mediated GET {row['mediated_get_over_redis']:.2f}x; "
          f"{workers} clients at once: pool {row['pool_get_concurrent']:.2f} GB/s vs Redis "
          f"{row['redis_get_concurrent']:.2f} ({row['concurrent_get_over_redis']:.2f}x); bare TCP transfer "
          f"{row['tcp_floor']:.2f} GB/s ({row['tcp_floor_over_redis']:.2f}x Redis: the ceiling for one hop); "
          f"straight from the owner, no local node: {row['owner_only_get_over_redis']:.2f}x Redis")


def throughput(args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make services)")
    port = free_port()
    rs = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                          stdout=subprocess.DEVNULL)
    cl = Cluster(tmp, dram_mib=1024)
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    out: dict[str, Any] = {}
    try:
        for size_mb in (1, 4, 32):
            n = max(4, 64 // size_mb)
            objs = [np.random.default_rng(i).integers(0, 255, size_mb * MB, dtype=np.uint8) for i in range(n)]
            dst = [np.empty(size_mb * MB, dtype=np.uint8) for _ in range(n)]
            best: dict[str, float] = {}
            for _ in range(args.reps):
                for k, v in one_round(cl, r, port, objs, dst, args.workers).items():
                    best[k] = min(best.get(k, v), v)
            out[f"{size_mb}mb"] = row = ratios(best, n, size_mb * MB)
            report(size_mb, n, args.workers, row)
    finally:
        cl.stop()
        rs.terminate()
        rs.wait(10)
    return out


def hit_rates(trace: pathlib.Path) -> dict[str, Any]:
    reqs = load_mooncake(trace)
    uniq = len({b for r in reqs for b in r.block_ids})
    ceiling = infinite_cache_hit_rate(reqs)[1]
    rows = {}
    for frac in (0.02, 0.05, 0.1, 0.25):
        h = simulate(reqs, 8, max(1, int(uniq * frac / 8)))
        rows[str(frac)] = {"per_node": h.per_node, "pooled": h.pooled, "gain": h.gain}
        print(f"total cache = {frac:.0%} of unique blocks: per-node hit {h.per_node:.3f}, pooled {h.pooled:.3f} "
              f"({h.gain:.2f}x; infinite-cache ceiling {ceiling:.3f})")
    return {"requests": len(reqs), "unique_blocks": uniq, "ceiling": ceiling, "by_capacity": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="client processes for the concurrent GET row")
    ap.add_argument("--trace", type=pathlib.Path, default=DEFAULT_TRACE)
    args = ap.parse_args()
    logging.getLogger("kvmesh.cache.client").setLevel(logging.ERROR)
    if not args.trace.is_file():
        sys.exit(f"trace not found: {args.trace} (the Mooncake trace lives in ../shared/traces/, see its README)")
    with tempfile.TemporaryDirectory() as d:
        tp = throughput(args, pathlib.Path(d))
    hr = hit_rates(args.trace)
    metrics = {"get_1mb_over_redis": tp["1mb"]["get_over_redis"], "get_32mb_over_redis": tp["32mb"]["get_over_redis"],
               "put_32mb_over_redis": tp["32mb"]["put_over_redis"],
               "pooled_hit_over_local_hit": hr["by_capacity"]["0.1"]["gain"], "throughput": tp, "hit_rate": hr}
    for k in ("get_1mb_over_redis", "get_32mb_over_redis", "put_32mb_over_redis", "pooled_hit_over_local_hit"):
        print(f"{k}: {metrics[k]:.2f}")
    print("wrote", write_result("cache_pool", metrics))


if __name__ == "__main__":
    main()
