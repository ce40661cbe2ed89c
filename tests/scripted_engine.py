"""A scripted OpenAI-compatible upstream for gateway tests that need exact control over timing.

It implements the endpoints the gateway calls on vLLM (``/health``, ``/v1/models``, streaming and
non-streaming ``/v1/completions``), but each stream emits its events only when the test releases them.
Real vLLM engines cover the same gateway paths in the other test files; this server exists to make
"the first event reaches the client before the second exists" assertable without timing.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web


class ScriptedEngine:
    def __init__(self, name: str, model: str = "kvmesh-demo", hang: bool = False) -> None:
        self.name = name
        self.hang = hang  # accept requests but never answer them (a hung engine)
        self.break_streams = False  # send a stream's headers, then drop the connection (an engine that dies)
        self.received = 0  # completion requests that reached the engine
        self.stopped = asyncio.Event()
        self.model = model
        self.gates: list[asyncio.Event] = []
        self.open_streams = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.stopped.set()
        for g in self.gates:
            g.set()
        if self.runner:
            await self.runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received += 1
        if self.hang:
            await self.stopped.wait()
            raise web.HTTPServiceUnavailable()
        n = int(body.get("max_tokens", 2))
        if not body.get("stream"):
            return web.json_response({"object": "text_completion", "choices": [{"text": "x" * n}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.break_streams:  # dies during prefill: headers sent, no event, connection gone
            assert request.transport is not None
            request.transport.close()
            return resp
        gate = asyncio.Event()
        self.gates.append(gate)
        self.open_streams += 1
        try:
            for i in range(n):
                if i:
                    await gate.wait()  # the test releases everything after the first event
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f"t{i}"}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        finally:
            self.open_streams -= 1
        return resp
