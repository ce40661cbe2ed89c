"""Trace loaders (any path) and the deterministic token content they imply.

Mooncake (FAST'25) conversation trace: one JSON object per line with ``timestamp`` (ms), ``input_length``,
``output_length`` and ``hash_ids`` — prefix-chained ids of 512-token blocks (same id ⇒ same 512 tokens,
and two requests share an id only if they share the whole prefix up to it).  :func:`block_tokens` turns an
id into deterministic token ids; with ``tokens_per_block`` below 512 every length is scaled down by the
same factor, keeping the sharing structure exact.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
from dataclasses import dataclass

MOONCAKE_BLOCK = 512


class TraceError(ValueError):
    """A trace file that cannot be read or parsed; the message names the file and line."""


@dataclass(slots=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_ids: list[int]


def load_mooncake(path: str | pathlib.Path, limit: int | None = None) -> list[TraceRequest]:
    p = pathlib.Path(path)
    out: list[TraceRequest] = []
    try:
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    o = json.loads(line)
                    out.append(TraceRequest(o["timestamp"] / 1000.0, int(o["input_length"]),
                                            int(o["output_length"]), [int(h) for h in o["hash_ids"]]))
                except (ValueError, KeyError, TypeError) as e:
                    raise TraceError(f"{p}:{n}: not a Mooncake trace record ({e})") from None
                if limit is not None and len(out) >= limit:
                    break
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror}") from None
    return out


def block_tokens(block_id: int, n: int, vocab: int = 8192) -> list[int]:
    """``n`` deterministic token ids for a block id (a multiplicative hash walk; no RNG state)."""
    h = (block_id * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    out = []
    for _ in range(n):
        h = (h * 1_103_515_245 + 12_345) & 0x7FFFFFFF
        out.append(h % vocab)
    return out


def mooncake_prompt(req: TraceRequest, tokens_per_block: int) -> list[int]:
    """The request's prompt at ``tokens_per_block`` tokens per 512-token trace block."""
    total = max(1, math.ceil(req.input_tokens * tokens_per_block / MOONCAKE_BLOCK))
    toks: list[int] = []
    for b in req.block_ids:
        toks += block_tokens(b, tokens_per_block)
    return toks[:total] if len(toks) >= total else toks + block_tokens(-1 - len(toks), total - len(toks))


def infinite_cache_hit_rate(reqs: list[TraceRequest]) -> tuple[float, float]:
    """(block, token) hit rates of an unbounded cache shared by everyone: the ceiling for any policy."""
    seen: set[int] = set()
    hit_blocks = total_blocks = hit_tokens = total_tokens = 0
    for r in reqs:
        for i, b in enumerate(r.block_ids):
            size = min(MOONCAKE_BLOCK, r.input_tokens - i * MOONCAKE_BLOCK)
            total_blocks += 1
            total_tokens += max(size, 0)
            if b in seen:
                hit_blocks += 1
                hit_tokens += max(size, 0)
            seen.add(b)
    return hit_blocks / max(total_blocks, 1), hit_tokens / max(total_tokens, 1)


def shared_prefix_groups(groups: int, per_group: int, prefix_blocks: int = 8, suffix_blocks: int = 1,
                         output_tokens: int = 32, interval_s: float = 0.1, seed: int = 0) -> list[TraceRequest]:
    """Synthetic workload: ``groups`` documents of ``prefix_blocks`` blocks, each asked ``per_group`` times
    with its own suffix, interleaved at random, one every ``interval_s``."""
    rng = random.Random(seed)
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    out, next_id = [], 1_000_000
    for i, g in enumerate(order):
        ids = [g * 10_000 + j for j in range(prefix_blocks)] + list(range(next_id, next_id + suffix_blocks))
        next_id += suffix_blocks
        out.append(TraceRequest(i * interval_s, len(ids) * MOONCAKE_BLOCK, output_tokens, ids))
    return out
