"""Small helpers shared by benchmarks: percentiles, free ports and waiting for an HTTP endpoint."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def wait_http(url: str, timeout: float = 300) -> None:
    """Poll ``url`` until it answers 200; raises ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports the kernel just handed out (fixed ports made two benchmarks, or a benchmark
    and a test, collide).  Another process could take one before it is bound again; nothing here guards that."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
