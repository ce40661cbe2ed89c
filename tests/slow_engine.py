"""A throttled OpenAI-compatible upstream: busy (tokens flowing on some streams) while others wait.

A streaming completion whose prompt is ``"steady"`` emits a token every ``interval_s`` until the engine is
stopped (or ``max_tokens`` is reached): the engine is visibly making progress.  Any other streaming
completion sends nothing until the test sets :attr:`release` (its prefill "takes" that long), then one
token and ``[DONE]``.  ``received`` counts completions that reached the engine (shed requests never do).
``/metrics`` reports vLLM's ``vllm:generation_tokens_total`` over every stream, however it reached the engine.

``python -m tests.slow_engine PORT`` serves it in its own process, which a test can SIGSTOP.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


class SlowEngine:
    def __init__(self, model: str = "kvmesh-demo", interval_s: float = 0.02) -> None:
        self.model = model
        self.interval_s = interval_s
        self.release = asyncio.Event()
        self.stopped = asyncio.Event()
        self.received = 0
        self.generated = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/metrics", lambda r: web.Response(
            text=f'vllm:generation_tokens_total{{model_name="{self.model}"}} {float(self.generated)}\n'))
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.stopped.set()
        self.release.set()
        if self.runner:
            await self.runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    @staticmethod
    def _event(i: int) -> bytes:
        chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f"t{i}"}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received += 1
        if not body.get("stream"):
            await self.release.wait()
            return web.json_response({"object": "text_completion", "choices": [{"text": "x"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body.get("prompt") == "steady":
            for i in range(int(body.get("max_tokens", 100_000))):
                if self.stopped.is_set():
                    break
                await resp.write(self._event(i))
                self.generated += 1
                await asyncio.sleep(self.interval_s)  # the pace of a throttled engine, not a correctness wait
        else:
            await self.release.wait()
            await resp.write(self._event(0))
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _serve(port: int) -> None:
    e = SlowEngine()
    await e.start(port)
    print(e.url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
