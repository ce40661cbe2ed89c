"""The 2-minute version of the soak (bench/soak.py): mixed traffic, an engine killed every 30 s.

It asserts correctness only — every request ends in a success, a clear error or the client's own cancel,
and no file descriptors leak.  How many requests the machine got through, and what share succeeded
around the kills, depend on the machine's speed: bench/soak.py reports them (``requests``, ``succeeded``).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_soak_two_minutes() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "120", "--fault-interval",
                        "30", "--out", "-", "--port", "18750", "--engine-port", "18760"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert m["faults"] >= 1 and m["succeeded"] > 0, m  # engines really were killed, traffic really served
    assert m["lost_requests"] == 0, m["errors_by_kind"]
    assert m["fd_growth"] <= 8 and m["rss_growth_pct"] < 25, m
