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
from typing import Any

from kvmesh.gateway.metrics import GatewayMetrics
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

    async def token_ids(self, endpoint: str, req: dict[str, Any]) -> list[int] | None:
        if endpoint == "completions":
            p = req["prompt"]
            if isinstance(p, list) and p:
                if isinstance(p[0], int):
                    return p
                if isinstance(p[0], list):
                    return p[0]  # several prompts: route by the first (vLLM serves them on one engine)
                p = p[0]
        if self.tokenizer is None:
            return None
        t0 = time.perf_counter()
        try:
            if endpoint == "completions":
                ids = await self._run(self.tokenizer.encode_prompt, p, len(p))
            else:
                msgs = req["messages"]
                size = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 64 for m in msgs)
                ids = await self._run(self.tokenizer.encode_chat, msgs, size)
        except TokenizerError as e:
            self.metrics.errors.labels("tokenize").inc()
            log.warning("tokenisation failed, routing on load only: %s", e)
            return None
        self.metrics.tokenize.observe(time.perf_counter() - t0)
        return ids

    async def _run(self, fn: Any, arg: Any, size: int) -> list[int]:
        if size < _INLINE_CHARS:
            return fn(arg)  # type: ignore[no-any-return]
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, arg)  # type: ignore[no-any-return]
