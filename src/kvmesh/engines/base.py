"""The engine abstraction every replica kind implements (vLLM today; the simulated engine later).

Contract:
- ``start()`` launches the replica and returns once the process exists; it does not wait for readiness.
- ``wait_ready()`` polls the replica's ``/health`` until it answers 200 from this replica (``owns_endpoint``:
  not another stack's engine on the same port), the process dies (raises
  :class:`EngineDied`) or the timeout passes (raises ``TimeoutError``).
- ``wait_exit()`` returns the exit code when the replica ends for any reason; safe to call concurrently.
- ``stop()`` ends the replica and everything it spawned (no orphans, no shared-memory files left),
  gracefully first; idempotent.
All methods are coroutines run on the supervisor's event loop; none of them block it.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import time

import aiohttp

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"


class EngineDied(RuntimeError):
    """The engine process exited while we were waiting for it; the message carries its log tail,
    ``summary`` says it in one line (the tail's last error line)."""

    def __init__(self, name: str, code: int, tail: str, log_path: str = "") -> None:
        super().__init__(f"engine {name} exited with {code} while starting:\n{tail}")
        errors = [x.strip() for x in tail.splitlines() if "Error" in x or "error" in x]
        where = f" (log: {log_path})" if log_path else ""
        self.summary = f"engine {name} exited with {code} while starting: {errors[-1] if errors else ''}{where}"


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

    def owns_endpoint(self) -> bool:
        """Whether what answers on ``url`` is this replica (not another stack's engine on the same port);
        checked with every passing ``/health`` while starting."""
        return True

    def phase(self) -> str | None:
        """What the replica is doing while it starts (e.g. "loading weights"), when it can be told."""
        return None

    async def wait_ready(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        deadline, said = t0 + timeout_s, "starting"
        log.info("engine %s: starting", self.name)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            while True:
                now = self.phase()
                if now is not None and now != said:  # start-up takes a minute: say what is happening
                    said = now
                    log.info("engine %s: %s (%.0f s)", self.name, now, time.monotonic() - t0)
                code = self.exited()
                if code is not None:
                    self.state = EngineState.FAILED
                    raise EngineDied(self.name, code, self.log_tail(), str(getattr(self, "log_path", "")))
                try:
                    async with http.get(f"{self.url}/health") as r:
                        if r.status == 200 and self.owns_endpoint():
                            self.state = EngineState.READY
                            log.info("engine %s: ready (%.0f s)", self.name, time.monotonic() - t0)
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine {self.name} not ready after {timeout_s:.0f}s")
                await asyncio.sleep(0.5)
