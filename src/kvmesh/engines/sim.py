"""The simulated engine behind the :class:`Engine` interface, in-process (many per process).

``kill()`` stops the server abruptly and reports exit code -9, so the supervisor restarts it exactly as it
would a crashed vLLM process (the new instance starts with an empty cache and a fresh event sequence).
"""

from __future__ import annotations

import asyncio

from kvmesh.engines.base import Engine, EngineState
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.server import SimServer


class SimEngine(Engine):
    def __init__(self, name: str, model_dir: str, served_name: str, port: int, profile: str = "cpu-demo-small",
                 host: str = "127.0.0.1", block_size: int = 16, time_scale: float = 1.0,
                 kv_events_endpoint: str | None = None) -> None:
        self.name = name
        self.url = f"http://{host}:{port}"
        self.kv_events_endpoint = kv_events_endpoint
        self.state = EngineState.STOPPED
        self._args = (model_dir, served_name, get_profile(profile), host, port, block_size, time_scale,
                      kv_events_endpoint)
        self.server: SimServer | None = None
        self._exit: asyncio.Future[int] | None = None

    async def start(self) -> None:
        if self.server is not None:
            return
        self.server = SimServer(*self._args)
        await self.server.start()
        self._exit = asyncio.get_running_loop().create_future()
        self.state = EngineState.STARTING

    def exited(self) -> int | None:
        if self._exit is None:
            return None
        return self._exit.result() if self._exit.done() else None

    async def wait_exit(self) -> int:
        if self._exit is None:
            return 0
        return await asyncio.shield(self._exit)

    async def _end(self, code: int, grace_s: float = 0.0) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop(crash=code != 0, drain_s=grace_s)  # open requests finish within the grace
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)

    async def stop(self, grace_s: float = 10.0) -> None:
        await self._end(0, grace_s)
        self.state = EngineState.STOPPED

    async def kill(self) -> None:
        """Crash: the server goes away at once, in-flight requests are cut."""
        await self._end(-9)
