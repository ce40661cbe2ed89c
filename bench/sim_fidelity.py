"""Fidelity of the simulated engine: calibrate on real vLLM-CPU, then compare TTFT on held-out requests.

1. Calibration: cold prompts of 256..4096 tokens and short decodes against one real vLLM-CPU engine
   (small demo model, one core); least squares gives prefill throughput, the attention (quadratic) term and
   the per-step costs — a ``cpu-demo-small`` profile for this machine.
2. Held-out workload (different prompts, half of them sharing a 1,024-token prefix with an earlier one),
   sent one at a time to the real engine and to a simulated engine with the calibrated profile and
   vLLM-CPU's 128-token blocks.  Reported: mean TTFT of each and the relative error.

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
    finally:
        loop.run_until_complete(sup.stop())
    print(f"calibrated: prefill {prof.prefill_tps:,.0f} tok/s, attention {prof.attn_s_per_token2:.2e} s/tok^2, "
          f"step overhead {prof.overhead_s * 1000:.1f} ms, decode {prof.decode_s_per_seq * 1000:.1f} ms/seq")
    sim = SimServer(str(model), MODEL, prof, port=18121, block_size=128)
    loop.run_until_complete(sim.start())
    try:
        simulated = loop.run_until_complete(asyncio.to_thread(measure, sim.url, prompts))
    finally:
        loop.run_until_complete(sim.stop())
    err = (np.mean(simulated) - np.mean(real)) / np.mean(real) * 100
    print(f"held-out ({len(prompts)} requests): mean TTFT real {np.mean(real) * 1000:.1f} ms, "
          f"sim {np.mean(simulated) * 1000:.1f} ms, error {err:+.1f}%")
    metrics = {"sim_ttft_error_pct": round(float(err), 2), "real_ttft_mean_ms": round(float(np.mean(real)) * 1000, 1),
               "sim_ttft_mean_ms": round(float(np.mean(simulated)) * 1000, 1), "requests": len(prompts),
               "calibrated_profile": {"prefill_tps": round(prof.prefill_tps, 1),
                                      "attn_s_per_token2": prof.attn_s_per_token2, "overhead_s": prof.overhead_s,
                                      "decode_s_per_seq": prof.decode_s_per_seq}}
    print(f"wrote {write_result('sim_fidelity', metrics)}")


if __name__ == "__main__":
    main()
