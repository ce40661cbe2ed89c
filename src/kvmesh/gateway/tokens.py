"""The gateway's tokenisation stage for KV-aware policies.

Token ids come from the request itself (a token-id prompt) or from the served model's tokenizer.  The
tokenizer first looks for an already-encoded prefix (:mod:`kvmesh.tokenize.prefix`, exact); what is left to
encode, when long, is encoded on a worker thread, which really frees the event loop because the encode
releases the GIL, so a burst of long prompts neither queues behind one another on the loop nor stalls the
streams being relayed.  Short work runs inline (a thread hop costs more than encoding a few hundred
characters).  Any failure degrades to routing without token ids — counted, never an error for the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any

from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.index.hashing import block_keys
from kvmesh.tokenize import PromptTokenizer, TokenizerError

log = logging.getLogger(__name__)
# Work (characters left to encode after the prefix cache) below this runs inline: ~2 ms of encoding.  A hop
# to the worker thread needs the OS to schedule it, which on a busy 2-core host costs more than that
# (measured: tokenise p50 5.8 ms with a 512-character threshold vs 2.3 ms inline, bench/pre_forward.py);
# longer work goes to the workers, where the encode releases the GIL.
_INLINE_CHARS = 4096


class TokenStage:
    def __init__(self, path: str | None, metrics: GatewayMetrics, prefix_cache: bool = True) -> None:
        self.metrics = metrics
        self.tokenizer: PromptTokenizer | None = None
        if path is not None:
            self.tokenizer = PromptTokenizer(path, prefix_cache=prefix_cache)
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def tokens(self, endpoint: str, req: dict[str, Any], block_size: int | None,
                     seed: int) -> tuple[list[int] | None, Sequence[int] | None]:
        """(token ids, block keys) of the request's prompt; keys only once the block size is known.

        Block keys are computed here, next to tokenisation (on the worker thread for long prompts),
        so the routing decision itself only looks them up."""
        if endpoint == "completions":
            p = req["prompt"]
            if isinstance(p, list) and p:
                if isinstance(p[0], int):
                    return p, _keys(p, block_size, seed)
                if isinstance(p[0], list):  # several prompts: route by the first (one engine serves all)
                    return p[0], _keys(p[0], block_size, seed)
                p = p[0]
            if not isinstance(p, str):
                return None, None
        if self.tokenizer is None:
            return None, None
        t0 = time.perf_counter()
        try:
            if endpoint == "completions":
                out = await self._text(self.tokenizer, p, True, block_size, seed)
            else:
                out = await self._chat(self.tokenizer, req["messages"], block_size, seed)
        except TokenizerError as e:
            self.metrics.errors.labels("tokenize").inc()
            log.warning("tokenisation failed, routing on load only: %s", e)
            return None, None
        self.metrics.tokenize.observe(time.perf_counter() - t0)
        return out

    async def _text(self, tok: PromptTokenizer, text: str, special: bool, block_size: int | None,
                    seed: int) -> tuple[list[int], Sequence[int] | None]:
        plan = tok.plan(text)  # hashing only: microseconds
        if plan.work_chars < _INLINE_CHARS:
            out = tok.finish(plan, special, block_size, seed)
        else:
            out = await asyncio.get_running_loop().run_in_executor(
                self._pool, tok.finish, plan, special, block_size, seed)
        return out.ids, out.keys

    async def _chat(self, tok: PromptTokenizer, msgs: list[dict[str, Any]], block_size: int | None,
                    seed: int) -> tuple[list[int], Sequence[int] | None]:
        size = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 64 for m in msgs)
        if size < _INLINE_CHARS:
            return await self._text(tok, tok.render_chat(msgs), False, block_size, seed)

        def work() -> tuple[list[int], Sequence[int] | None]:
            # a long history renders on the worker too; the prefix cache still skips its encoded part
            out = tok.encode(tok.render_chat(msgs), False, block_size, seed)
            return out.ids, out.keys

        return await asyncio.get_running_loop().run_in_executor(self._pool, work)


def _keys(ids: list[int], block_size: int | None, seed: int) -> Sequence[int] | None:
    return block_keys(ids, block_size, seed) if block_size else None
