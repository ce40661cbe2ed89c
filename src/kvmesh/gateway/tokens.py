"""The gateway's tokenisation stage for KV-aware policies.

Token ids come from the request itself (a token-id prompt) or from the served model's tokenizer.  Long
texts are encoded on a worker thread so the event loop keeps relaying other streams; short ones inline
(a thread hop costs more than encoding a few hundred characters).  Any failure degrades to routing
without token ids — counted, never an error for the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any

from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.index import block_keys
from kvmesh.tokenize import PromptTokenizer, TokenizerError

log = logging.getLogger(__name__)
_INLINE_CHARS = 2048


class TokenStage:
    def __init__(self, path: str | None, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.tokenizer: PromptTokenizer | None = None
        if path is not None:
            self.tokenizer = PromptTokenizer(path)
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
        if self.tokenizer is None:
            return None, None
        t0 = time.perf_counter()
        try:
            if endpoint == "completions":
                out = await self._run(self.tokenizer.encode_prompt, p, len(p), block_size, seed)
            else:
                msgs = req["messages"]
                size = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 64 for m in msgs)
                out = await self._run(self.tokenizer.encode_chat, msgs, size, block_size, seed)
        except TokenizerError as e:
            self.metrics.errors.labels("tokenize").inc()
            log.warning("tokenisation failed, routing on load only: %s", e)
            return None, None
        self.metrics.tokenize.observe(time.perf_counter() - t0)
        return out

    async def _run(self, fn: Any, arg: Any, size: int, block_size: int | None,
                   seed: int) -> tuple[list[int], Sequence[int] | None]:
        def work() -> tuple[list[int], Sequence[int] | None]:
            ids = fn(arg)
            return ids, _keys(ids, block_size, seed)

        if size < _INLINE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)


def _keys(ids: list[int], block_size: int | None, seed: int) -> Sequence[int] | None:
    return block_keys(ids, block_size, seed) if block_size else None
