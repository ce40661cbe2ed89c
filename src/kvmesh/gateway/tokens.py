"""The gateway's tokenisation stage for KV-aware policies.

Token ids come from the request itself (a token-id prompt) or from the served model's tokenizer.  The
tokenizer first looks for an already-encoded prefix (:mod:`kvmesh.tokenize.prefix`, exact); what is left to
encode, when long, is encoded on a worker thread, which really frees the event loop because the encode
releases the GIL, so a burst of long prompts neither queues behind one another on the loop nor stalls the
streams being relayed.  Short work runs inline (a thread hop costs more than encoding a few hundred
characters).  For a policy that matches prefixes against engines' caches, a prompt is tokenised only up to
the first block no engine holds, and the rest after the request was sent (:class:`Tokens`.rest).  Any failure
degrades to routing without token ids — counted, never an error for the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.index.hashing import block_keys
from kvmesh.tokenize import PromptTokenizer, TokenizerError

log = logging.getLogger(__name__)
# Work (characters left to encode after the prefix cache) below this runs inline: ~2 ms of encoding.  A hop
# to the worker thread needs the OS to schedule it, which on a busy 2-core host costs more than that
# (measured: tokenise p50 5.8 ms with a 512-character threshold vs 2.3 ms inline, bench/pre_forward.py);
# longer work goes to the workers, where the encode releases the GIL.
_INLINE_CHARS = 4096
_LAZY_INLINE_CHARS = 16384


class Tokens(NamedTuple):
    """The tokenise stage's answer: token ids and block keys (None: route without them), the prompt's token
    count (estimated when tokenised lazily), and, when the stage stopped early, ``rest``: a blocking call
    that returns the whole key chain (run it on a worker thread, after the request was sent)."""

    ids: list[int] | None = None
    keys: Sequence[int] | None = None
    total: int | None = None
    rest: Callable[[], Sequence[int] | None] | None = None


class TokenStage:
    def __init__(self, path: str | None, metrics: GatewayMetrics, prefix_cache: bool = True) -> None:
        self.metrics = metrics
        self.tokenizer: PromptTokenizer | None = None
        if path is not None:
            self.tokenizer = PromptTokenizer(path, prefix_cache=prefix_cache)
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def tokens(self, endpoint: str, req: dict[str, Any], block_size: int | None, seed: int,
                     held: Callable[[int], bool] | None = None) -> Tokens:
        """Token ids and block keys of the request's prompt; keys only once the block size is known.

        Block keys are computed here, next to tokenisation, so the routing decision itself only looks them
        up.  Given ``held`` (does any engine hold this block key?), a text prompt is tokenised only up to the
        first block no engine holds (:meth:`PromptTokenizer.encode_held`): routing matches prefixes, so the
        rest would cost the request time before it is sent and change nothing but its length."""
        if endpoint == "completions":
            p = req["prompt"]
            if isinstance(p, list) and p and isinstance(p[0], list | str):
                p = p[0]  # several prompts: route by the first (one engine serves them all)
            if isinstance(p, list) and p and isinstance(p[0], int):
                return Tokens(p, _keys(p, block_size, seed), len(p))
            if not isinstance(p, str):
                return Tokens()
        if self.tokenizer is None:
            return Tokens()
        t0 = time.perf_counter()
        try:
            tok = self.tokenizer
            text = p if endpoint == "completions" else tok.render_chat(req["messages"])
            out = await self._encode(tok, text, endpoint == "completions", block_size, seed, held)
        except TokenizerError as e:
            self.metrics.errors.labels("tokenize").inc()
            log.warning("tokenisation failed, routing on load only: %s", e)
            return Tokens()
        self.metrics.tokenize.observe(time.perf_counter() - t0)
        return out

    async def _encode(self, tok: PromptTokenizer, text: str, special: bool, block_size: int | None, seed: int,
                      held: Callable[[int], bool] | None) -> Tokens:
        if held is not None and block_size:
            # Bounded work in the common case (a cached prefix costs nothing, then steps of ~130 tokens), so
            # inline below a size where even the worst case (encode it all) stays short.
            if len(text) < _LAZY_INLINE_CHARS:
                part = tok.encode_held(text, special, block_size, seed, held)
            else:
                part = await asyncio.get_running_loop().run_in_executor(
                    self._pool, tok.encode_held, text, special, block_size, seed, held)
            if part.complete:
                return Tokens(part.ids, part.keys, part.total)
            return Tokens(part.ids, part.keys, part.total, lambda: tok.encode(text, special, block_size, seed).keys)
        plan = tok.plan(text)  # hashing only: microseconds
        if plan.work_chars < _INLINE_CHARS:
            out = tok.finish(plan, special, block_size, seed)
        else:
            out = await asyncio.get_running_loop().run_in_executor(
                self._pool, tok.finish, plan, special, block_size, seed)
        return Tokens(out.ids, out.keys, len(out.ids))

    async def complete(self, rest: Callable[[], Sequence[int] | None]) -> Sequence[int] | None:
        """Run a lazy stop's ``rest`` on a worker thread; None when it fails (nothing is lost but hints)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, rest)
        except (TokenizerError, RuntimeError) as e:  # RuntimeError: the pool shut down (gateway stopping)
            log.debug("completing a lazily tokenised prompt failed: %s", e)
            return None


def _keys(ids: list[int], block_size: int | None, seed: int) -> Sequence[int] | None:
    return block_keys(ids, block_size, seed) if block_size else None
