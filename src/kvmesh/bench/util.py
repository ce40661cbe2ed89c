"""Small helpers shared by benchmarks: percentiles, free ports, waiting for an HTTP endpoint, resetting an
engine's prefix cache."""

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


def reset_prefix_cache(url: str, timeout: float = 120) -> None:
    """Empty the engine's own prefix cache (vLLM's ``POST /reset_prefix_cache``, dev mode), retrying until it
    succeeds: vLLM answers 200 with ``success: false`` while any block is held — by a running request, or by
    a finished one whose KV is still being saved to a cache node (kvmesh's connector saves asynchronously).
    Raises ``TimeoutError``; an engine that does not say (an older one) counts as reset."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.post(f"{url}/reset_prefix_cache", timeout=60)
        r.raise_for_status()
        try:
            ok = r.json().get("success", True)
        except ValueError:
            ok = True
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: prefix cache not reset after {timeout}s (blocks still held)")
        time.sleep(0.05)  # polling an engine that is finishing its transfers, not a synchronisation


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports the kernel just handed out (fixed ports made two benchmarks, or a benchmark
    and a test, collide).  Another process could take one before it is bound again; nothing here guards that."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
