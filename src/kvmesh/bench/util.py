"""Small helpers shared by benchmarks: percentiles and waiting for an HTTP endpoint."""

from __future__ import annotations

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
