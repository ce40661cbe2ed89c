"""The gateway's view of its engines: health, in-flight counts and the models each one serves.

Backends come from a static URL list or from the engine supervisor.  A background task checks every
backend's ``/health`` (and refreshes ``/v1/models``) at an interval; a connect failure seen while proxying,
or a supervisor notice, takes a backend out of rotation at once, and the next passing check brings it back.
All state is touched only from the gateway's event loop, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Backend:
    name: str
    url: str
    healthy: bool = False
    in_flight: int = 0
    models: frozenset[str] = frozenset()
    model_cards: list[dict[str, Any]] = field(default_factory=list)
    last_error: str = ""
    failures: int = 0


class BackendPool:
    def __init__(self, interval_s: float = 2.0, on_health: Any = None) -> None:
        self.backends: list[Backend] = []
        self.interval_s = interval_s
        self._on_health = on_health  # callable(backend) after a health state change
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, name: str, url: str) -> Backend:
        b = Backend(name, url.rstrip("/"))
        self.backends.append(b)
        self._wake.set()
        return b

    def get(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def set_health(self, b: Backend, healthy: bool, reason: str = "") -> None:
        if b.healthy != healthy:
            log.warning("backend %s is now %s%s", b.name, "healthy" if healthy else "unhealthy",
                        f" ({reason})" if reason else "")
        b.healthy = healthy
        if not healthy:
            b.last_error = reason
            b.failures += 1
        else:
            b.failures = 0
        if self._on_health:
            self._on_health(b)

    def known_models(self) -> set[str]:
        return {m for b in self.backends for m in b.models}

    def model_list(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for b in self.backends:
            if b.healthy:
                for card in b.model_cards:
                    seen.setdefault(str(card.get("id")), card)
        return list(seen.values())

    async def check(self, http: aiohttp.ClientSession, b: Backend) -> None:
        try:
            async with http.get(f"{b.url}/health") as r:
                ok = r.status == 200
            if ok and (not b.models or not b.healthy):
                async with http.get(f"{b.url}/v1/models") as r:
                    cards = (await r.json()).get("data", [])
                b.model_cards = [c for c in cards if isinstance(c, dict)]
                b.models = frozenset(str(c.get("id")) for c in b.model_cards)
            self.set_health(b, ok, "" if ok else "health check failed")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.set_health(b, False, f"health check: {type(e).__name__}")

    async def check_all(self, http: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.check(http, b) for b in self.backends))

    async def run(self, http: aiohttp.ClientSession) -> None:
        """Health-check forever (cancel to stop).  ``poke()`` triggers an early round."""
        while True:
            await self.check_all(http)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass

    def poke(self) -> None:
        self._wake.set()
