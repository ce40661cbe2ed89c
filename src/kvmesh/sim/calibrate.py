"""Fit a :class:`TimingProfile` to a running engine (``kvmesh calibrate``).

Cold prompts of 256..4096 random tokens (so nothing is cached) and one 64-token decode are streamed to the
engine; least squares over ``TTFT = overhead + n / prefill_tps + attn * n² / 2`` gives the prefill terms,
and the mean inter-token time gives the decode step.  Everything else is kept from ``base``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import time

import httpx
import numpy as np

from kvmesh.sim.profiles import TimingProfile

LENGTHS = (256, 512, 1024, 1536, 2048, 3072, 4096)


def stream_timing(http: httpx.Client, url: str, model: str, prompt: list[int],
                  max_tokens: int = 1) -> tuple[float, float]:
    """(TTFT, mean inter-token time) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter() - t0)
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return stamps[0], itl


def calibrate(url: str, model: str, base: TimingProfile, vocab: int = 8000, repeats: int = 2,
              lengths: tuple[int, ...] = LENGTHS) -> TimingProfile:
    """Raises ``httpx.HTTPError`` if the engine cannot be reached or rejects a request."""
    rng = random.Random(7)
    xs, ys = [], []
    with httpx.Client(timeout=300) as http:
        stream_timing(http, url, model, [rng.randrange(100, vocab) for _ in range(64)])  # warm-up
        for n in lengths:
            for _ in range(repeats):
                t, _ = stream_timing(http, url, model, [rng.randrange(100, vocab) for _ in range(n)])
                xs.append((1.0, n, n * n / 2))
                ys.append(t)
        _, itl = stream_timing(http, url, model, [rng.randrange(100, vocab) for _ in range(64)], max_tokens=64)
    coef, *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    overhead, per_token, attn = (max(float(c), 0.0) for c in coef)
    return dataclasses.replace(base, name=f"{base.name}-calibrated", overhead_s=overhead,
                               prefill_tps=1.0 / max(per_token, 1e-7), attn_s_per_token2=attn,
                               decode_s_per_seq=max(itl - overhead, 0.0))


def save_profile(p: TimingProfile, path: pathlib.Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(p), indent=2) + "\n")
