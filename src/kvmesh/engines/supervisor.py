"""Keeps N engine replicas alive: start them together, restart crashed ones with backoff, stop them all.

Listeners (``on_change``) are called on the supervisor's event loop whenever a replica becomes ready or
goes down, so the gateway's backend pool can take it out of rotation at once instead of waiting for a
failed health check.  ``stop()`` is idempotent and leaves no child processes behind.  The autoscaler
(``kvmesh.autoscale.local``) grows and shrinks the set at run time: ``add()`` starts and watches one more
replica, ``remove()`` stops one for good (no restart; the caller drained it first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from kvmesh.config import SupervisorConfig
from kvmesh.engines.base import Engine, EngineDied, EngineState

log = logging.getLogger(__name__)
Listener = Callable[[Engine, bool], None]
_STABLE_S = 60.0  # a replica up this long has its restart backoff reset


class Supervisor:
    def __init__(self, engines: Sequence[Engine], cfg: SupervisorConfig) -> None:
        self.engines = list(engines)
        self.cfg = cfg
        self.restarts: dict[str, int] = {e.name: 0 for e in self.engines}
        self._listeners: list[Listener] = []
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def on_change(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def _notify(self, engine: Engine, up: bool) -> None:
        for fn in self._listeners:
            try:
                fn(engine, up)
            except Exception:
                log.exception("supervisor listener failed")

    async def start(self, wait: bool = True) -> None:
        """Start every replica; with ``wait``, return when all are ready (raises if one fails to start)."""
        await asyncio.gather(*(e.start() for e in self.engines))
        self._watchers = {e.name: asyncio.create_task(self._watch(e), name=f"watch-{e.name}") for e in self.engines}
        if wait:
            await self.wait_ready()

    async def wait_ready(self) -> None:
        await asyncio.gather(*(e.wait_ready(self.cfg.start_timeout_s) for e in self.engines))

    async def _watch(self, engine: Engine) -> None:
        backoff = self.cfg.restart_backoff_s
        while not self._stopping:
            if engine.state is not EngineState.READY:
                try:
                    await engine.wait_ready(self.cfg.start_timeout_s)
                except (EngineDied, TimeoutError) as e:
                    log.error("%s", e)
                    await engine.stop(self.cfg.stop_grace_s)
                else:
                    self._notify(engine, True)
            up_since = time.monotonic()
            if engine.state is EngineState.READY:
                code = await engine.wait_exit()
                if self._stopping:
                    return
                engine.state = EngineState.FAILED
                log.error("engine %s exited with %s; restarting in %.1fs", engine.name, code, backoff)
                self._notify(engine, False)
            if time.monotonic() - up_since > _STABLE_S:
                backoff = self.cfg.restart_backoff_s
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.cfg.restart_backoff_max_s)
            if self._stopping:
                return
            self.restarts[engine.name] += 1
            await engine.stop(0)  # reap what is left of the old process group
            await engine.start()

    async def add(self, engine: Engine) -> None:
        """Start one more replica, watched (restarted) like the others; returns when it is ready (raises
        ``EngineDied``/``TimeoutError`` after stopping it when it does not get there)."""
        self.engines.append(engine)
        self.restarts.setdefault(engine.name, 0)
        try:
            await engine.start()
            await engine.wait_ready(self.cfg.start_timeout_s)
        except BaseException:
            # this engine, not whichever replica holds its name by now (it has no watcher yet)
            if engine in self.engines:
                self.engines.remove(engine)
            await engine.stop(self.cfg.stop_grace_s)
            raise
        self._watchers[engine.name] = asyncio.create_task(self._watch(engine), name=f"watch-{engine.name}")

    async def remove(self, name: str) -> None:
        """Stop replica ``name`` for good: no restart (scale-in; it was drained first).  No-op if unknown."""
        engine = next((e for e in self.engines if e.name == name), None)
        if engine is None:
            return
        self.engines.remove(engine)
        task = self._watchers.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await engine.stop(self.cfg.stop_grace_s)

    async def stop(self) -> None:
        self._stopping = True
        for t in self._watchers.values():
            t.cancel()
        for t in self._watchers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.gather(*(e.stop(self.cfg.stop_grace_s) for e in self.engines))
