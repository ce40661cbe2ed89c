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
from typing import Any

MOONCAKE_BLOCK = 512


class TraceError(ValueError):
    """A trace file that cannot be read or parsed; the message names the file and line."""


@dataclass(slots=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_ids: list[int]
    session: str = ""  # conversation id (sent as ``x-session-id``) where the workload has one


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


_M64 = (1 << 64) - 1


def block_tokens(block_id: int, n: int, vocab: int = 8192) -> list[int]:
    """``n`` deterministic token ids for a block id: a splitmix64 seed, then a 64-bit LCG whose *high* bits
    are the tokens.  (The low bits of a power-of-two LCG depend only on the seed's low bits: taking
    ``h % vocab`` made ids 8,192 apart the same block and inflated every simulated hit rate.)"""
    h = (block_id * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
    h ^= h >> 31
    out = []
    for _ in range(n):
        h = (h * 6364136223846793005 + 1442695040888963407) & _M64
        out.append((h >> 33) % vocab)
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


def multi_turn_chat(sessions: int, turns: int, rate: float = 2.0, think_s: float = 5.0, system_blocks: int = 2,
                    user_blocks: int = 1, answer_blocks: int = 1, output_tokens: int = 64,
                    seed: int = 0) -> list[TraceRequest]:
    """Synthetic chat sessions: ``sessions`` conversations start as a Poisson process at ``rate``/s; turn
    ``k`` arrives ``think_s`` (exponential) after turn ``k-1`` and its prompt is the shared system prompt
    (``system_blocks``, the same for everyone), then the whole history — every earlier user message and
    answer — then the new user message.  So each turn extends the previous turn's prompt: the reuse a
    session-aware or KV-aware router should keep on one replica.  Sorted by arrival; ``session`` set."""
    if sessions < 1 or turns < 1 or rate <= 0 or think_s < 0:
        raise ValueError("multi_turn_chat: sessions and turns must be >= 1, rate > 0, think_s >= 0")
    rng = random.Random(seed)
    system = [900_000_000 + j for j in range(system_blocks)]
    out: list[TraceRequest] = []
    start = 0.0
    for s in range(sessions):
        start += rng.expovariate(rate)
        t, history = start, list(system)
        for k in range(turns):
            base = 1_000_000_000 + (s * 1000 + k) * 100
            history += [base + j for j in range(user_blocks)]
            out.append(TraceRequest(t, len(history) * MOONCAKE_BLOCK, output_tokens, list(history), f"chat-{s}"))
            history += [base + 50 + j for j in range(answer_blocks)]
            t += rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0
    out.sort(key=lambda r: r.arrival_s)
    return out


def load_azure(path: str | pathlib.Path, limit: int | None = None) -> list[TraceRequest]:
    """Azure LLM inference trace 2023 (``TIMESTAMP, ContextTokens, GeneratedTokens``): arrivals and lengths
    only; every request gets its own block ids (no prefix information in this trace)."""
    import csv
    import datetime as dt

    p = pathlib.Path(path)
    out: list[TraceRequest] = []
    try:
        with p.open(newline="", encoding="utf-8") as f:
            t0: dt.datetime | None = None
            for n, row in enumerate(csv.DictReader(f), 2):
                try:
                    ts = dt.datetime.fromisoformat(row["TIMESTAMP"][:26])
                    ctx, gen = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                except (KeyError, ValueError, TypeError) as e:
                    raise TraceError(f"{p}:{n}: not an Azure trace row ({e})") from None
                t0 = t0 or ts
                blocks = max(1, math.ceil(ctx / MOONCAKE_BLOCK))
                out.append(TraceRequest((ts - t0).total_seconds(), ctx, gen,
                                        [10_000_000 + len(out) * 1000 + j for j in range(blocks)]))
                if limit is not None and len(out) >= limit:
                    break
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror}") from None
    return out


def load_weka(paths: list[str | pathlib.Path], limit: int | None = None) -> list[TraceRequest]:
    """Weka agentic-coding traces (one conversation per JSON file, 64-token blocks with conversation-local
    ids): conversations run side by side from t=0; ids are made global per file and rescaled to the
    512-token block granularity of :class:`TraceRequest` (8 Weka blocks per id)."""
    out: list[TraceRequest] = []
    for k, path in enumerate(paths):
        p = pathlib.Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            per = MOONCAKE_BLOCK // int(doc.get("block_size", 64))
            for j, r in enumerate(_weka_leaves(doc["requests"], 0.0)):
                ids = [int(h) for h in r.get("hash_ids") or ()]
                if not ids:  # records without block ids (e.g. sub-agent calls): no reuse known
                    ids = [-(j + 1) * 100_000 - i for i in range(max(1, math.ceil(int(r["in"]) / 64)))]
                # a 512-token block is identified by the chain of Weka ids it covers
                merged = [(k + 1) * 1_000_000_000 + hash(tuple(ids[: i + per])) % 1_000_000_000
                          for i in range(0, len(ids), per)]
                out.append(TraceRequest(float(r["t"]), int(r["in"]), int(r["out"]), merged, f"weka-{k}"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TraceError(f"{p}: not a Weka trace ({e})") from None
    out.sort(key=lambda r: r.arrival_s)
    return out[:limit] if limit is not None else out


def _weka_leaves(reqs: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """Model calls of a Weka conversation, sub-agent calls (records with their own ``requests``) flattened;
    a sub-agent's times are taken relative to its start when they precede it."""
    out: list[dict[str, Any]] = []
    for r in reqs:
        t = float(r.get("t", 0.0))
        t = t if t >= t0 else t0 + t
        nested = r.get("requests")
        if isinstance(nested, list):
            out += _weka_leaves(nested, t)
        elif "in" in r:
            out.append({**r, "t": t})
    return out


TRACE_FORMATS = ("mooncake", "azure", "weka")


def load_trace(path: str | pathlib.Path, fmt: str = "mooncake", limit: int | None = None) -> list[TraceRequest]:
    """Any supported trace; a Weka path may be one file or a directory of ``*.json`` conversations."""
    p = pathlib.Path(path)
    if fmt == "mooncake":
        return load_mooncake(p, limit)
    if fmt == "azure":
        return load_azure(p, limit)
    if fmt == "weka":
        files: list[str | pathlib.Path] = list(sorted(p.glob("*.json"))) if p.is_dir() else [p]
        return load_weka(files, limit)
    raise TraceError(f"unknown trace format {fmt!r}; choose one of {', '.join(TRACE_FORMATS)}")
