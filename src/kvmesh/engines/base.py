"""The engine abstraction every replica kind implements (vLLM today; the simulated engine later).

Contract:
- ``start()`` launches the replica and returns once the process exists; it does not wait for readiness.
- ``wait_ready()`` polls the replica's ``/health`` until it answers 200, the process dies (raises
  :class:`EngineDied`) or the timeout passes (raises ``TimeoutError``).
- ``wait_exit()`` returns the exit code when the replica ends for any reason; safe to call concurrently.
- ``stop()`` ends the replica and everything it spawned (no orphans), gracefully first; idempotent.
All methods are coroutines run on the supervisor's event loop; none of them block it.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time

import aiohttp


class EngineState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"


class EngineDied(RuntimeError):
    """The engine process exited while we were waiting for it; the message carries its log tail."""


class Engine(abc.ABC):
    name: str
    url: str
    kv_events_endpoint: str | None
    state: EngineState

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def wait_exit(self) -> int: ...

    @abc.abstractmethod
    async def stop(self, grace_s: float = 10.0) -> None: ...

    @abc.abstractmethod
    def exited(self) -> int | None:
        """Exit code if the replica has ended, else None (a non-blocking poll)."""

    def log_tail(self, lines: int = 20) -> str:
        return ""

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            while True:
                code = self.exited()
                if code is not None:
                    self.state = EngineState.FAILED
                    raise EngineDied(f"engine {self.name} exited with {code} while starting:\n{self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/health") as r:
                        if r.status == 200:
                            self.state = EngineState.READY
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine {self.name} not ready after {timeout_s:.0f}s")
                await asyncio.sleep(0.5)
