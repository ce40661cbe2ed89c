"""Routing micro-benchmark: KV-event ingestion rate, kv-aware decision latency, tokenisation of 8k tokens.

- Ingestion: vLLM-format event batches (msgpack, map-encoded BlockStored, 128-token blocks, 16 blocks per
  event as a prefill chunk would produce) decoded and applied on one core until the index holds
  ``--blocks`` blocks spread over ``--engines`` engines.  Payload generation is not timed.
- Decision: ``KvAwarePolicy.choose`` over ``--engines`` candidates for 8k-token prompts (64 blocks), half
  of them extending a cached document, half cold; includes computing the prompt's block keys, excludes
  tokenisation (reported separately).

    python bench/routing_micro.py [--blocks 1000000 --engines 16 --decisions 5000]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import pct, write_result
from kvmesh.index.events import BlockStored, EventBatch, decode_batch, encode_batch
from kvmesh.index.hashing import block_keys
from kvmesh.index.index import KvIndex
from kvmesh.models import demo
from kvmesh.routing import CandidateState as Cand
from kvmesh.routing import RequestContext, make_policy
from kvmesh.tokenize import PromptTokenizer

BS = 128
DOC_BLOCKS = 64  # 8k tokens



def doc_tokens(doc_id: int) -> np.ndarray:
    return np.random.default_rng(doc_id).integers(0, 8192, DOC_BLOCKS * BS, dtype=np.int64)


def ingest(index: KvIndex, n_blocks: int, n_engines: int) -> tuple[float, list[int]]:
    """Fill the index with documents (64-block chains); returns (blocks/s of decode+apply, doc ids)."""
    docs = n_blocks // DOC_BLOCKS
    applied, busy = 0, 0.0
    doc_ids = list(range(docs))
    for d in doc_ids:
        toks = doc_tokens(d).tolist()
        engine = f"e{d % n_engines}"
        parent = None
        for chunk in range(0, DOC_BLOCKS, 16):
            hashes = [d * DOC_BLOCKS + chunk + i + 1 for i in range(16)]
            ev = BlockStored(block_hashes=hashes, parent_block_hash=parent,
                             token_ids=toks[chunk * BS:(chunk + 16) * BS], block_size=BS, medium="GPU")
            payload = encode_batch(EventBatch(time.time(), [ev]))
            t0 = time.perf_counter()
            applied += index.apply(engine, decode_batch(payload))
            busy += time.perf_counter() - t0
            parent = hashes[-1]
    return applied / busy, doc_ids


def decisions(index: KvIndex, doc_ids: list[int], n_engines: int, n: int) -> tuple[list[float], list[float]]:
    """(decision times with block keys precomputed, as the gateway's tokenisation stage does; key hashing
    times of the same prompts)."""
    policy = make_policy("kv-aware", seed=1, index=index)
    cands = [Cand(f"e{i}", in_flight=i % 3, pending_prefill_tokens=(i * 997) % 5000) for i in range(n_engines)]
    rng = random.Random(2)
    prompts = []
    for i in range(200):
        if i % 2:
            base = doc_tokens(rng.choice(doc_ids)).tolist()
            cut = rng.randrange(8, DOC_BLOCKS) * BS  # a cached prefix of varying length, then new tokens
            prompts.append(base[:cut] + [rng.randrange(8192) for _ in range(DOC_BLOCKS * BS - cut)])
        else:
            prompts.append([rng.randrange(8192) for _ in range(DOC_BLOCKS * BS)])
    times, hashing = [], []
    for i in range(n):
        p = prompts[i % len(prompts)]
        t0 = time.perf_counter()
        keys = block_keys(p, BS, index.seed)
        t1 = time.perf_counter()
        ctx = RequestContext(request_id="r", model="m", endpoint="completions", token_ids=p,
                             prompt_tokens_estimate=len(p), block_keys=keys)
        policy.choose(ctx, cands)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t1)
        hashing.append(t1 - t0)
    return times, hashing


def tokenize_8k(n: int) -> list[float]:
    tok = PromptTokenizer(_demo_dir())
    sentence = ("kvmesh routes requests to the replica holding their prefix; the gateway tokenises every "
                "prompt with the served model's tokenizer before it asks the index.")
    words = sentence.split(" ")
    text = " ".join(words[i % len(words)] + str(i % 97) for i in range(3300))
    assert 7000 < len(tok.tok.encode(text).ids) < 9500
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        tok.tok.encode(text)  # uncached, as for a new prompt
        times.append(time.perf_counter() - t0)
    return times


def _demo_dir() -> pathlib.Path:
    path = pathlib.Path(__file__).resolve().parent.parent / "models" / "demo-tiny"
    if not demo.is_complete(path):
        demo.generate("tiny", path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--engines", type=int, default=16)
    ap.add_argument("--decisions", type=int, default=5000)
    args = ap.parse_args()
    index = KvIndex("bench")
    rate, doc_ids = ingest(index, args.blocks, args.engines)
    print(f"ingested {index.size():,} blocks over {args.engines} engines: {rate:,.0f} blocks/s (one core)")
    d, h = decisions(index, doc_ids, args.engines, args.decisions)
    both = [a + b for a, b in zip(d, h, strict=True)]
    t = tokenize_8k(200)
    us = 1e6
    metrics = {"engines": args.engines, "indexed_blocks": index.size(), "prompt_tokens": DOC_BLOCKS * BS,
               "decision_p50_us": round(pct(d, 50) * us, 1), "decision_p99_us": round(pct(d, 99) * us, 1),
               "block_keys_8k_p50_us": round(pct(h, 50) * us, 1), "block_keys_8k_p99_us": round(pct(h, 99) * us, 1),
               "decision_with_keys_p50_us": round(pct(both, 50) * us, 1),
               "decision_with_keys_p99_us": round(pct(both, 99) * us, 1),
               "tokenize_8k_p50_us": round(pct(t, 50) * us, 1), "tokenize_8k_p99_us": round(pct(t, 99) * us, 1),
               "ingest_blocks_per_s": round(rate)}
    print(f"kv-aware decision ({args.engines} engines, 8k-token prompt): p50 {metrics['decision_p50_us']} us, "
          f"p99 {metrics['decision_p99_us']} us (target p99 <= 200 us)")
    print(f"block keys of the 8k-token prompt (tokenisation stage): p50 {metrics['block_keys_8k_p50_us']} us, "
          f"p99 {metrics['block_keys_8k_p99_us']} us; decision + keys: p50 {metrics['decision_with_keys_p50_us']} "
          f"us, p99 {metrics['decision_with_keys_p99_us']} us")
    print(f"tokenise 8k tokens: p50 {metrics['tokenize_8k_p50_us']} us, p99 {metrics['tokenize_8k_p99_us']} us")
    print(f"ingest: {metrics['ingest_blocks_per_s']:,} blocks/s (target >= 100,000)")
    print(f"wrote {write_result('routing', metrics)}")


if __name__ == "__main__":
    main()
