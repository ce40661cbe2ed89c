"""Test helpers: a background event loop for in-process servers, free ports, polling with a deadline, and a
virtual clock for code whose behaviour depends on elapsed time (rate limits)."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread, so sync tests (and the sync openai client) can drive servers
    that live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-loop")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrap() -> T:
            return fn()

        return self.run(wrap())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int) -> int:
    """First port of ``n`` consecutive free ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)  # below the ephemeral range (32768+)
        if all(port_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block")


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class VirtualClock:
    """A clock the test sets by hand, installed as ``time.monotonic`` of one module only: the event loop and
    everything else keep the real clock, so a 30 s window takes 30 virtual seconds however loaded the
    machine is.  It starts at the real clock's reading, so state stamped before installing stays valid."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def install(self, monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> None:
        monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=self.monotonic))
