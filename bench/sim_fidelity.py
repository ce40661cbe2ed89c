"""Fidelity of the simulated engine: calibrate on real vLLM-CPU, then compare TTFT on held-out requests.

1. Calibration (:func:`kvmesh.sim.calibrate.calibrate`) against one real vLLM-CPU engine (small demo model,
   one core): decodes at batch 1 and 8 give the per-step overhead (every step, prefill too); cold prompts of
   256..4096 tokens, each sent again right after (a prefix hit: the last block computed over a long cached
   context), give prefill throughput, the attention (quadratic) term and the per-request overhead, fitted by
   relative error — a ``cpu-demo-small`` profile for this machine.  None of these requests is one of the
   held-out or tier cases below.
2. Held-out workload (different prompts, half of them sharing a 1,024-token prefix with an earlier one),
   sent one at a time to the real engine and to a simulated engine with the calibrated profile and
   vLLM-CPU's 128-token blocks.  Reported: mean TTFT of each and the relative error.
3. TPOT under batch (issue 19): B streams at once (B = 1..16), each a cold prompt of C tokens (256 or
   2,048) and 64 output tokens; the mean TPOT (first to last token) of the real engine fits the decode
   step ``overhead + a * B + b * B * C`` (least squares), the simulated engine with the fitted profile
   replays the same cases, and the per-case error is reported (``tpot_cases``, ``sim_tpot_error_pct``:
   the mean absolute error over the cases).  A packed engine's TPOT grows with its batch and context on
   both.
4. Cache tiers (issue 16): one real vLLM-CPU engine with kvmesh's connector and a cache node (1 GiB DRAM
   arena over an SSD directory) and a simulated engine whose machine has a simulated node with the
   ``cpu-demo-small`` tier figures (:data:`kvmesh.sim.tiers.TIER_PROFILES`, this machine's measured
   cache-node figures), the calibrated timing profile, the same prompts (1,000-4,000 tokens).  Per prompt:
   cold, the engine's own prefix hit, a node-DRAM hit (engine prefix cache reset: ``VLLM_SERVER_DEV_MODE=1``
   + ``POST /reset_prefix_cache``), a node-SSD hit (reset, node DRAM evicted to SSD, page cache dropped).
   ``tier_hit_ttft_error_pct``: the larger of the DRAM-hit and SSD-hit mean-TTFT errors (goal <= 15 %).
   The simulated SSD link is measured on the real node in the same run, after the sequence
   (:func:`measure_ssd`: N = 4..31 chunks leased in one go, as a hit's ``Get`` does, each time with DRAM
   evicted and the page cache dropped; least squares gives latency + bytes / bandwidth): the built-in
   figure (1.0 GB/s, ``bench/cache_node.py`` on a quiet machine, one chunk per request) is not what a hit
   sees while an engine and the node share two loaded cores.  Both figures are recorded.  The warm-up also
   loads once from the SSD, as it did from DRAM: in the run of 2026-12-01 the first SSD hit took 851 ms
   against 550-690 ms for the other seven, a first-time cost the simulator does not model.

Every part runs in one go; the machine's load average is recorded (latency here measures the machine too).

    python bench/sim_fidelity.py [--tier-reps 2] [--skip-tpot] [--only-tiers]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pathlib
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.bench.util import reset_prefix_cache
from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig, VllmEngineConfig
from kvmesh.engines import Supervisor, VllmEngine
from kvmesh.models import demo
from kvmesh.sim.calibrate import cached_timing, calibrate, stream_timing
from kvmesh.sim.profiles import TimingProfile, get_profile
from kvmesh.sim.server import SimServer
from kvmesh.sim.tiers import Link, MachineView, TierConfig, TierProfile, TierSystem, tier_profile
from kvmesh.stack import Stack

MODEL = "kvmesh-demo"


def calibrate_here(url: str, base: TimingProfile) -> TimingProfile:
    return calibrate(url, MODEL, base)


def held_out() -> list[list[int]]:
    rng = random.Random(11)
    shared = [[rng.randrange(100, 8000) for _ in range(1024)] for _ in range(4)]
    prompts = []
    for i in range(24):
        tail = [rng.randrange(100, 8000) for _ in range(rng.choice((200, 700, 1500, 2500)))]
        prompts.append((shared[i % 4] + tail) if i % 2 else tail)
    return prompts


def measure(url: str, prompts: list[list[int]]) -> list[float]:
    with httpx.Client(timeout=300) as http:
        return [stream_timing(http, url, MODEL, p)[0] for p in prompts]


BATCH_CASES = ((1, 256), (4, 256), (8, 256), (16, 256), (1, 2048), (4, 2048), (8, 2048))


async def _tpot_case(url: str, batch: int, ctx: int, seed: int) -> float:
    """Mean TPOT of ``batch`` concurrent cold streams of ``ctx`` prompt tokens and 64 output tokens."""
    rng = random.Random(seed)

    async def one(http: httpx.AsyncClient) -> float:
        body = {"model": MODEL, "prompt": [rng.randrange(100, 8000) for _ in range(ctx)], "max_tokens": 64,
                "stream": True, "ignore_eos": True}
        stamps: list[float] = []
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    stamps.append(asyncio.get_running_loop().time())
        return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)

    async with httpx.AsyncClient(timeout=600) as http:
        return float(np.mean(await asyncio.gather(*(one(http) for _ in range(batch)))))


def tpot_cases(url: str) -> list[float]:
    return [asyncio.run(_tpot_case(url, b, c, 100 + i)) for i, (b, c) in enumerate(BATCH_CASES)]


def fit_decode(prof: TimingProfile, tpots: list[float]) -> TimingProfile:
    """``decode_s_per_seq`` and ``decode_s_per_ctx_token`` from TPOT under batch (overhead kept: the
    calibration's per-step figure)."""
    xs = np.array([(b, b * c) for b, c in BATCH_CASES], dtype=float)
    ys = np.array(tpots) - prof.overhead_s
    (a, b), *_ = np.linalg.lstsq(xs, ys, rcond=None)
    return dataclasses.replace(prof, decode_s_per_seq=max(float(a), 0.0), decode_s_per_ctx_token=max(float(b), 0.0))


TIER_LENGTHS = (1000, 2000, 3000, 4000)
TIER_KINDS = ("cold", "engine_hit", "dram_hit", "ssd_hit")


class _Loop:
    """An event loop in a thread: the in-process cache node must keep serving while this thread blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def tier_prompts(reps: int) -> list[list[int]]:
    rng = random.Random(21)
    return [[rng.randrange(100, 8000) for _ in range(n)] for _ in range(reps) for n in TIER_LENGTHS]


def tier_sequence(url: str, prompts: list[list[int]], evict: Callable[[], object]) -> dict[str, list[list[float]]]:
    """Per prompt: cold (saved to the node), the engine's own prefix hit, a node-DRAM hit (engine cache
    reset), a node-SSD hit (engine cache reset, node DRAM evicted).  Rows are [TTFT s, cached tokens]."""
    rows: dict[str, list[list[float]]] = {k: [] for k in TIER_KINDS}
    with httpx.Client(timeout=300) as http:
        for p in prompts:
            for kind in TIER_KINDS:
                if kind in ("dram_hit", "ssd_hit"):
                    reset_prefix_cache(url)
                if kind == "ssd_hit":
                    evict()
                rows[kind].append(list(cached_timing(http, url, MODEL, p)))
    return rows


def _drop_page_cache(paths: list[pathlib.Path]) -> None:
    """So an SSD hit reads the device, not the kernel's page cache (as bench/cache_node.py measures it)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


SSD_PROBE_CHUNKS = (4, 8, 16, 31)  # up to a 4,000-token prompt's 31 full blocks


async def _timed_lease(store: Any, keys: list[bytes]) -> float:
    """Seconds the node's store takes to lease ``keys`` (on its own loop: no cross-thread hop counted)."""
    t0 = time.perf_counter()
    got = await store.lease(keys)
    dt = time.perf_counter() - t0
    store.release([o.meta.key for o in got], [])
    if len(got) < len(keys):
        raise RuntimeError(f"SSD probe: {len(got)} of {len(keys)} chunks leased")
    return dt


def measure_ssd(loop: _Loop, store: Any, evict: Callable[[], object], reps: int = 3) -> list[list[float]]:
    """[bytes, seconds] of SSD reads as a hit's ``Get`` makes them: N chunks leased in one call (each read
    from its file in the node's executor and promoted to DRAM, one after another), DRAM evicted and the page
    cache dropped before each probe."""
    keys = list(store.ssd)
    if len(keys) < max(SSD_PROBE_CHUNKS):
        raise RuntimeError(f"SSD probe: the node holds {len(keys)} chunks on SSD")
    samples = []
    for n in SSD_PROBE_CHUNKS:
        for _ in range(reps):
            evict()
            dt = loop.run(_timed_lease(store, keys[:n]))
            samples.append([float(sum(store.ssd[k].meta.size for k in keys[:n])), dt])
    return samples


def fit_link(samples: list[list[float]]) -> Link:
    """``seconds = latency + bytes / bandwidth`` by least squares over the median time of each size (one
    stalled read on a loaded machine must not set the bandwidth); latency clipped at 0."""
    sizes = sorted({b for b, _ in samples})
    xs = np.array([(1.0, b) for b in sizes])
    ys = np.array([np.median([t for b2, t in samples if b2 == b]) for b in sizes])
    (lat, per_byte), *_ = np.linalg.lstsq(xs, ys, rcond=None)
    return Link(round(1 / max(float(per_byte), 1e-12) / 1e9, 3), round(max(float(lat), 0.0), 5))


def real_tiers(model: pathlib.Path, run_dir: pathlib.Path,
               prompts: list[list[int]]) -> tuple[dict[str, list[list[float]]], list[list[float]]]:
    """The tier sequence on one real vLLM-CPU engine with kvmesh's connector and a cache node (DRAM + SSD),
    then the node's SSD reads measured (:func:`measure_ssd`) while the engine still runs."""
    shutil.rmtree(run_dir / "tiers-ssd", ignore_errors=True)  # a node rescans its SSD: no chunks from a past run
    loop = _Loop()
    cfg = StackConfig(
        model_size="small", models_dir=str(model.parent),
        engine=VllmEngineConfig(model=str(model), served_model_name=MODEL, cpu_bind="0", kv_cache_gib=2,
                                max_model_len=8192, kv_events=False, env={"VLLM_SERVER_DEV_MODE": "1"}),
        supervisor=SupervisorConfig(replicas=1, base_port=18122, run_dir=str(run_dir / "tiers")),
        gateway=GatewayConfig(port=0),
        cache=CacheNodeConfig(dram_mib=1024, ssd_mib=4096, http_port=None, ssd_dir=str(run_dir / "tiers-ssd")))
    st = loop.run(_make_stack(cfg))
    loop.run(st.start(wait=True))
    node = st.cache_node
    if node is None:
        raise RuntimeError("the stack started no cache node")

    def evict() -> None:
        loop.run(node.store.evict_dram())
        if node.store.disk is not None:
            _drop_page_cache([node.store.disk.path(k) for k in node.store.ssd])

    try:
        url = st.engines[0].url
        with httpx.Client(timeout=300) as http:  # warm-up: the connector's first save, DRAM load, SSD load
            w = tier_prompts(1)[0][::-1]
            cached_timing(http, url, MODEL, w)
            for from_ssd in (False, True):
                reset_prefix_cache(url)
                if from_ssd:
                    evict()
                cached_timing(http, url, MODEL, w)
        rows = tier_sequence(url, prompts, evict)
        return rows, measure_ssd(loop, node.store, evict)
    finally:
        loop.run(st.stop())


async def _make_stack(cfg: StackConfig) -> Stack:
    return Stack(cfg)


def sim_tiers(model: pathlib.Path, prof: TimingProfile, prompts: list[list[int]], loop: asyncio.AbstractEventLoop,
              figures: TierProfile) -> dict[str, list[list[float]]]:
    """The same sequence on a simulated engine whose machine has a node (DRAM over SSD) with ``figures``."""
    system = TierSystem(TierConfig(engines_per_machine=1, dram_bytes=1024 << 20, ssd_bytes=4096 << 20), figures,
                        1, 128, 128 * prof.kv_bytes_per_token)
    sim = SimServer(str(model), MODEL, prof, port=18123, block_size=128)
    sim.core.tier = MachineView(system, 0)
    loop.run_until_complete(sim.start())
    try:
        rows = loop.run_until_complete(asyncio.to_thread(tier_sequence, sim.url, prompts,
                                                         system.nodes[0].evict_dram))
    finally:
        loop.run_until_complete(sim.stop())
    return rows


def tier_metrics(real: dict[str, list[list[float]]], sim: dict[str, list[list[float]]],
                 figures: TierProfile, ssd_samples: list[list[float]]) -> dict[str, Any]:
    """Mean TTFT per kind (real, simulated) and the relative errors; the headline is the larger of the
    DRAM-hit and SSD-hit errors."""
    out: dict[str, Any] = {}
    for kind in TIER_KINDS:
        r, s = (float(np.mean([row[0] for row in x[kind]])) for x in (real, sim))
        out[kind] = {"real_ms": round(r * 1000, 1), "sim_ms": round(s * 1000, 1),
                     "error_pct": round((s - r) / r * 100, 1),
                     "real_each_ms": [round(row[0] * 1000, 1) for row in real[kind]],
                     "sim_each_ms": [round(row[0] * 1000, 1) for row in sim[kind]],
                     "real_cached_tokens": [int(row[1]) for row in real[kind]],
                     "sim_cached_tokens": [int(row[1]) for row in sim[kind]]}
    dram, ssd = out["dram_hit"]["error_pct"], out["ssd_hit"]["error_pct"]
    return {"tier_hit_ttft_error_pct": max(abs(dram), abs(ssd)), "tier_dram_hit_ttft_error_pct": dram,
            "tier_ssd_hit_ttft_error_pct": ssd, "tier_prompt_lengths": list(TIER_LENGTHS), "tier_cases": out,
            "tier_figures": {"host_gbps": figures.host.gbps, "host_latency_s": figures.host.latency_s,
                             "ssd_gbps": figures.ssd.gbps, "ssd_latency_s": figures.ssd.latency_s,
                             "ssd_source": "measured in this run (ssd_probe)",
                             "builtin_ssd_gbps": tier_profile("cpu-demo-small").ssd.gbps,
                             "builtin_ssd_latency_s": tier_profile("cpu-demo-small").ssd.latency_s},
            "ssd_probe": [{"mib": round(b / (1 << 20), 1), "ms": round(t * 1000, 2)} for b, t in ssd_samples]}


def real_engine(model: pathlib.Path, run_dir: pathlib.Path, prompts: list[list[int]],
                tpot: bool) -> tuple[TimingProfile, list[float], list[float]]:
    """Calibrate on one real engine (no connector), then its held-out TTFTs and TPOT-under-batch cases."""
    eng = VllmEngine("real", VllmEngineConfig(model=str(model), served_model_name=MODEL, port=18120, cpu_bind="0",
                                              kv_cache_gib=2, max_model_len=8192, kv_events=False), run_dir)
    sup = Supervisor([eng], SupervisorConfig(replicas=1, run_dir=str(run_dir)))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(sup.start(wait=True))
    try:
        prof = calibrate_here(eng.url, get_profile("cpu-demo-small"))
        real = measure(eng.url, prompts)
        real_tpot = tpot_cases(eng.url) if tpot else []
        if tpot:
            prof = fit_decode(prof, real_tpot)
    finally:
        loop.run_until_complete(sup.stop())
        loop.close()
    return prof, real, real_tpot


def ttft_tpot_metrics(prof: TimingProfile, prompts: list[list[int]], real: list[float], simulated: list[float],
                      real_tpot: list[float], sim_tpot: list[float]) -> dict[str, Any]:
    err = (np.mean(simulated) - np.mean(real)) / np.mean(real) * 100
    print(f"held-out ({len(prompts)} requests): mean TTFT real {np.mean(real) * 1000:.1f} ms, "
          f"sim {np.mean(simulated) * 1000:.1f} ms, error {err:+.1f}%")
    out: dict[str, Any] = {
        "sim_ttft_error_pct": round(float(err), 2), "real_ttft_mean_ms": round(float(np.mean(real)) * 1000, 1),
        "sim_ttft_mean_ms": round(float(np.mean(simulated)) * 1000, 1), "requests": len(prompts),
        "calibrated_profile": {"prefill_tps": round(prof.prefill_tps, 1), "attn_s_per_token2": prof.attn_s_per_token2,
                               "overhead_s": prof.overhead_s, "request_overhead_s": prof.request_overhead_s,
                               "decode_s_per_seq": prof.decode_s_per_seq,
                               "decode_s_per_ctx_token": prof.decode_s_per_ctx_token,
                               "kv_bytes_per_token": prof.kv_bytes_per_token}}
    if real_tpot:
        out["tpot_cases"] = [{"batch": b, "context": c, "real_ms": round(r * 1000, 1), "sim_ms": round(x * 1000, 1)}
                             for (b, c), r, x in zip(BATCH_CASES, real_tpot, sim_tpot, strict=True)]
        out["sim_tpot_error_pct"] = round(float(np.mean([abs(x - r) / r for r, x in zip(real_tpot, sim_tpot,
                                                                                            strict=True)])) * 100, 1)
        for case in out["tpot_cases"]:
            print(f"TPOT batch {case['batch']:2} x {case['context']:4} tokens: real {case['real_ms']:6.1f} ms, "
                  f"sim {case['sim_ms']:6.1f} ms")
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tier-reps", type=int, default=2, help="prompts per length in the tier case")
    ap.add_argument("--only-tiers", action="store_true",
                    help="skip calibration, TTFT and TPOT: the tier case with the built-in profile")
    ap.add_argument("--skip-tpot", action="store_true", help="skip the TPOT-under-batch cases")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    root = pathlib.Path(__file__).resolve().parent.parent
    model = root / "models" / "demo-small"
    if not demo.is_complete(model):
        demo.generate("small", model)
    run_dir = root / "run" / "bench-fidelity"
    load_before = os.getloadavg()
    metrics: dict[str, Any] = {}
    prof = get_profile("cpu-demo-small")
    loop = asyncio.new_event_loop()
    if not args.only_tiers:
        prompts = held_out()
        prof, real, real_tpot = real_engine(model, run_dir, prompts, not args.skip_tpot)
        print(f"calibrated: prefill {prof.prefill_tps:,.0f} tok/s, attention {prof.attn_s_per_token2:.2e} s/tok^2, "
              f"step overhead {prof.overhead_s * 1000:.1f} ms, "
              f"request overhead {prof.request_overhead_s * 1000:.1f} ms, "
              f"decode {prof.decode_s_per_seq * 1000:.1f} ms/seq")
        sim = SimServer(str(model), MODEL, prof, port=18121, block_size=128)
        loop.run_until_complete(sim.start())
        try:
            simulated = loop.run_until_complete(asyncio.to_thread(measure, sim.url, prompts))
            sim_tpot = loop.run_until_complete(asyncio.to_thread(tpot_cases, sim.url)) if real_tpot else []
        finally:
            loop.run_until_complete(sim.stop())
        metrics |= ttft_tpot_metrics(prof, prompts, real, simulated, real_tpot, sim_tpot)
    tprompts = tier_prompts(args.tier_reps)
    real_rows, ssd_samples = real_tiers(model, run_dir, tprompts)
    figures = dataclasses.replace(tier_profile("cpu-demo-small"), ssd=fit_link(ssd_samples))
    print(f"SSD reads measured on the node: {figures.ssd.gbps:.2f} GB/s + {figures.ssd.latency_s * 1000:.2f} ms")
    sim_rows = sim_tiers(model, prof, tprompts, loop, figures)
    metrics |= tier_metrics(real_rows, sim_rows, figures, ssd_samples)
    for kind in TIER_KINDS:
        c = metrics["tier_cases"][kind]
        print(f"tiers {kind:>10}: real {c['real_ms']:7.1f} ms, sim {c['sim_ms']:7.1f} ms ({c['error_pct']:+.1f}%)")
    metrics["load_average"] = {"before": [round(x, 2) for x in load_before],
                               "after": [round(x, 2) for x in os.getloadavg()]}
    print(f"wrote {write_result('sim_fidelity', metrics)}")


if __name__ == "__main__":
    main()
