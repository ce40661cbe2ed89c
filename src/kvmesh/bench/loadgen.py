"""Load generator behind ``kvmesh bench``: replay a workload against any OpenAI-compatible URL.

Open loop (trace timestamps × ``speedup``, or Poisson at ``rate``) or closed loop (``concurrency``
clients back to back).  Every request streams, so TTFT, inter-token latency (ITL, and TPOT = mean ITL per
request) and end-to-end latency are measured at the client; ``usage`` (requested via
``stream_options.include_usage``) gives prompt / cached tokens for the prefix-hit rate.  Outputs: one JSON
line per request, a summary (p50/p90/p99, throughput, goodput under a TTFT/TPOT SLO, hit rate, requests
per replica from the ``x-kvmesh-backend`` header) and a markdown table; PNG plots when matplotlib is
installed (``pip install 'kvmesh[plots]'``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import pathlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress

from kvmesh.workloads import TraceRequest, block_tokens


@dataclass(slots=True)
class Result:
    i: int
    sent_at: float
    ttft_s: float = -1.0
    e2e_s: float = -1.0
    tpot_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    backend: str = ""
    session: str = ""
    error: str = ""


@dataclass(slots=True)
class LoadSpec:
    url: str
    model: str
    mode: str = "trace"            # trace | poisson | closed
    speedup: float = 1.0
    rate: float = 1.0
    concurrency: int = 8
    max_tokens_cap: int = 64
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)


def _prompt_text(r: TraceRequest) -> str:
    # 16 words per 512-token trace block: same id -> same words, so shared prefixes stay shared as text
    return "".join(" ".join(f"w{t % 5000}" for t in block_tokens(h, 16)) + "\n" for h in r.block_ids)


async def _one(http: httpx.AsyncClient, spec: LoadSpec, i: int, r: TraceRequest, res: Result) -> None:
    body = {"model": spec.model, "prompt": _prompt_text(r),
            "max_tokens": max(1, min(r.output_tokens, spec.max_tokens_cap)),
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {**spec.headers, "x-session-id": r.session} if r.session else spec.headers
    t0 = time.perf_counter()
    stamps: list[float] = []
    try:
        async with http.stream("POST", f"{spec.url}/v1/completions", json=body, headers=headers) as resp:
            res.backend = resp.headers.get("x-kvmesh-backend", "")
            if resp.status_code != 200:
                res.error = f"http_{resp.status_code}"
                await resp.aread()
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                obj = json.loads(line[6:])
                if obj.get("choices"):
                    stamps.append(time.perf_counter() - t0)
                usage = obj.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.cached_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                if "error" in obj:
                    res.error = "midstream"
    except httpx.HTTPError as e:
        res.error = type(e).__name__
        return
    res.e2e_s = time.perf_counter() - t0
    if stamps:
        res.ttft_s = stamps[0]
        res.output_tokens = len(stamps)
        res.tpot_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0


async def run_load(spec: LoadSpec, reqs: list[TraceRequest], progress: bool = False) -> list[Result]:
    """Send every request of ``reqs``; never raises for request failures (they are recorded).  ``progress``: a
    bar of finished requests on stderr (``kvmesh bench run`` shows it when stderr is a terminal)."""
    results = [Result(i, 0.0, session=r.session) for i, r in enumerate(reqs)]
    rng = random.Random(spec.seed)
    start = time.perf_counter()
    base = reqs[0].arrival_s if reqs else 0.0
    offsets, t = [], 0.0
    for r in reqs:
        if spec.mode == "poisson":
            t += rng.expovariate(spec.rate)
            offsets.append(t)
        else:
            offsets.append((r.arrival_s - base) / spec.speedup)
    limits = httpx.Limits(max_connections=max(spec.concurrency, 1000))
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
            task = bar.add_task("requests", total=len(reqs))

            async def send(i: int) -> None:
                if spec.mode != "closed":
                    await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - start)))
                results[i].sent_at = time.perf_counter() - start
                await _one(http, spec, i, reqs[i], results[i])
                bar.advance(task)

            if spec.mode == "closed":
                queue = collections.deque(range(len(reqs)))

                async def client() -> None:
                    while queue:
                        await send(queue.popleft())

                await asyncio.gather(*(client() for _ in range(spec.concurrency)))
            else:
                await asyncio.gather(*(send(i) for i in range(len(reqs))))
    return results


def summarize(results: list[Result], spec: LoadSpec, wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if not r.error and r.ttft_s >= 0]

    def pcts(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {}
        a = np.asarray(xs) * 1000
        return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
                "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99))}

    good = [r for r in ok if r.ttft_s <= spec.slo_ttft_s and r.tpot_s <= spec.slo_tpot_s]
    prompt = sum(r.prompt_tokens for r in ok)
    errors = collections.Counter(r.error for r in results if r.error)
    per_backend = collections.Counter(r.backend for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": dict(errors), "wall_s": wall_s,
            "ttft": pcts([r.ttft_s for r in ok]), "tpot": pcts([r.tpot_s for r in ok if r.output_tokens > 1]),
            "e2e": pcts([r.e2e_s for r in ok]),
            "throughput_rps": len(ok) / wall_s if wall_s else 0.0,
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s if wall_s else 0.0,
            "goodput_rps": len(good) / wall_s if wall_s else 0.0,
            "slo": {"ttft_s": spec.slo_ttft_s, "tpot_s": spec.slo_tpot_s},
            "prefix_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else None,
            "per_backend": dict(sorted(per_backend.items()))}


def markdown(s: dict[str, Any]) -> str:
    def row(name: str, m: dict[str, float]) -> str:
        return f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.1f}" for k in ("mean_ms", "p50_ms", "p90_ms",
                                                                                     "p99_ms")) + " |"

    hit = s["prefix_hit_rate"]
    return "\n".join([
        "| metric | mean ms | p50 ms | p90 ms | p99 ms |", "| --- | --- | --- | --- | --- |",
        row("TTFT", s["ttft"]), row("TPOT", s["tpot"]), row("E2E", s["e2e"]), "",
        f"requests {s['requests']}, ok {s['ok']}, errors {s['errors'] or 0}; throughput {s['throughput_rps']:.2f} "
        f"req/s, {s['output_tokens_per_s']:.0f} output tok/s; goodput {s['goodput_rps']:.2f} req/s (TTFT ≤ "
        f"{s['slo']['ttft_s']} s, TPOT ≤ {s['slo']['tpot_s']} s); prefix hit rate "
        f"{'n/a' if hit is None else f'{hit:.3f}'}; per replica {s['per_backend']}"])


def write_outputs(out: pathlib.Path, results: list[Result], summary: dict[str, Any]) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "requests.jsonl", out / "summary.json", out / "summary.md"]
    files[0].write_text("".join(json.dumps(asdict(r)) + "\n" for r in results))
    files[1].write_text(json.dumps(summary, indent=2) + "\n")
    files[2].write_text(markdown(summary) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    ok = sorted(r.ttft_s for r in results if not r.error and r.ttft_s >= 0)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(np.asarray(ok) * 1000, np.linspace(0, 1, len(ok)))
    a.set_xlabel("TTFT (ms)")
    a.set_ylabel("CDF")
    for name in sorted({r.backend for r in results if r.backend}):
        ts = sorted(r.sent_at for r in results if r.backend == name)
        b.plot(ts, range(1, len(ts) + 1), label=name)
    b.set_xlabel("time (s)")
    b.set_ylabel("requests routed (cumulative)")
    b.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "plots.png")
    plt.close(fig)
    return [*files, out / "plots.png"]
