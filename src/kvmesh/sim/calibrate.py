"""Fit a :class:`TimingProfile` to a running engine (``kvmesh calibrate``).

Three kinds of probe, each fitting the terms it can see:

1. **Decode at two batch sizes** (1 and 8 concurrent 64-token streams): a decode step costs
   ``overhead + B * per_seq``, so the two mean inter-token times give the per-step overhead (paid by every
   step, prefill too) and the per-sequence cost.
2. **Cold prompts** of 256..4096 random tokens (nothing cached) and 3. **the same prompt again** right after:
   a prefix hit where the engine computes only the last block over a long cached context.  With each step's
   overhead taken out (a cold prompt longer than ``max_batch_tokens`` is prefilled in several steps), least
   squares over ``TTFT = request_overhead + new / prefill_tps + attn * new * (cached + new / 2)`` gives the
   prefill terms and the per-request overhead.  The fit minimises relative error (rows weighted by 1/TTFT):
   a cold prompt's TTFT is seconds and its noise alone is larger than a 0.1 s intercept, which only the
   short prefix-hit rows pin down — an unweighted cold-only fit put the intercept at zero and left every
   prefix hit ~0.1 s short on vLLM-CPU (bench/sim_fidelity.py).

An engine that reports no cached tokens (no prefix caching, or no usage in streams) gives no hit rows; the
fit then rests on cold prompts alone.  Everything else is kept from ``base``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from kvmesh.sim.profiles import TimingProfile

LENGTHS = (256, 512, 1024, 1536, 2048, 3072, 4096)
DECODE_BATCHES = (1, 8)
DECODE_TOKENS = 64


def _stream(http: httpx.Client, url: str, model: str, prompt: list[int],
            max_tokens: int) -> tuple[list[float], int]:
    """Arrival times (s after sending) of a streamed completion's token events, and the prompt tokens the
    engine reports cached (its closing usage event: not a token)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    cached = 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                stamps.append(time.perf_counter() - t0)
            usage = event.get("usage") or {}
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached)
    if not stamps:
        raise httpx.HTTPError(f"{url}: no token streamed")
    return stamps, cached


def stream_timing(http: httpx.Client, url: str, model: str, prompt: list[int],
                  max_tokens: int = 1) -> tuple[float, float]:
    """(TTFT, mean inter-token time) of one streamed completion."""
    stamps, _ = _stream(http, url, model, prompt, max_tokens)
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return stamps[0], itl


def cached_timing(http: httpx.Client, url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    """(TTFT, prompt tokens the engine reports cached) of one streamed one-token completion."""
    stamps, cached = _stream(http, url, model, prompt, 1)
    return stamps[0], cached


def decode_costs(url: str, model: str, rng: random.Random, vocab: int, base: TimingProfile) -> tuple[float, float]:
    """(per-step overhead, per-sequence cost) of decode steps, from mean inter-token times at two batch sizes
    (the streams start together behind a barrier; base's per-context-token cost is taken out)."""
    itl = []
    for batch in DECODE_BATCHES:
        prompts = [[rng.randrange(100, vocab) for _ in range(DECODE_TOKENS)] for _ in range(batch)]
        gate = threading.Barrier(batch)

        def one(prompt: list[int], gate: threading.Barrier = gate) -> float:
            with httpx.Client(timeout=300) as http:
                gate.wait()
                return stream_timing(http, url, model, prompt, max_tokens=DECODE_TOKENS)[1]

        with ThreadPoolExecutor(batch) as pool:
            mean_itl = float(np.mean(list(pool.map(one, prompts))))
        itl.append(mean_itl - batch * 1.5 * DECODE_TOKENS * base.decode_s_per_ctx_token)
    (lo, hi), (y_lo, y_hi) = DECODE_BATCHES, itl
    per_seq = max((y_hi - y_lo) / (hi - lo), 0.0)
    return max(y_lo - lo * per_seq, 0.0), per_seq


def prefill_rows(http: httpx.Client, url: str, model: str, rng: random.Random, vocab: int, lengths: tuple[int, ...],
                 repeats: int, step_s: float, max_batch: int) -> tuple[list[tuple[float, float, float]], list[float],
                                                                        list[float]]:
    """Rows (1, new tokens, attention) of cold prompts and their repeats (prefix hits), TTFT less each step's
    overhead, and the TTFTs themselves (the fit's weights)."""
    xs, ys, ts = [], [], []
    for n in lengths:
        for _ in range(repeats):
            prompt = [rng.randrange(100, vocab) for _ in range(n)]
            t, _ = cached_timing(http, url, model, prompt)
            xs.append((1.0, float(n), n * n / 2))
            ys.append(t - math.ceil(n / max_batch) * step_s)
            ts.append(t)
            t, cached = cached_timing(http, url, model, prompt)
            if 0 < cached < n:
                new = n - cached
                xs.append((1.0, float(new), new * (cached + new / 2)))
                ys.append(t - step_s)
                ts.append(t)
    return xs, ys, ts


def calibrate(url: str, model: str, base: TimingProfile, vocab: int = 8000, repeats: int = 2,
              lengths: tuple[int, ...] = LENGTHS) -> TimingProfile:
    """Raises ``httpx.HTTPError`` if the engine cannot be reached or rejects a request."""
    rng = random.Random(7)
    with httpx.Client(timeout=300) as http:
        stream_timing(http, url, model, [rng.randrange(100, vocab) for _ in range(64)])  # warm-up
        step_s, per_seq = decode_costs(url, model, rng, vocab, base)
        xs, ys, ts = prefill_rows(http, url, model, rng, vocab, lengths, repeats, step_s, base.max_batch_tokens)
    w = 1.0 / np.array(ts)
    coef, *_ = np.linalg.lstsq(np.array(xs) * w[:, None], np.array(ys) * w, rcond=None)
    request_s, per_token, attn = (max(float(c), 0.0) for c in coef)
    return dataclasses.replace(base, name=f"{base.name}-calibrated", overhead_s=step_s,
                               prefill_tps=1.0 / max(per_token, 1e-7), attn_s_per_token2=attn,
                               decode_s_per_seq=per_seq, request_overhead_s=request_s)


def save_profile(p: TimingProfile, path: pathlib.Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(p), indent=2) + "\n")
