"""Issue 18 item 12: where ``kvmesh bench`` writes, what ``bench compare`` and ``kvmesh sim`` print, and their
progress bars (drawn on a terminal, absent otherwise)."""

from __future__ import annotations

import json
import os
import pathlib
import pty
import random
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import free_port_block, wait_until

KVMESH = [sys.executable, "-m", "kvmesh"]
BAR = "━"  # rich's progress bar


@pytest.fixture
def sim_engine(tiny_model: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[str]:
    """``kvmesh engine --kind sim`` (fast: a hundredth of real time); yields its URL."""
    port = free_port_block(1)
    proc = subprocess.Popen([*KVMESH, "engine", "--kind", "sim", "--model", str(tiny_model), "--port", str(port),
                             "--served-model-name", "kvmesh-demo", "--time-scale", "0.01", "--run-dir",
                             str(tmp_path / "engine-run")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "the simulated engine")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_bench_run_writes_under_the_run_directory(sim_engine: str, tmp_path: pathlib.Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([*KVMESH, "bench", "run", "--url", sim_engine, "--limit", "4", "--max-tokens", "2",
                        "--speedup", "100"], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert os.listdir(cwd) == ["run"]  # no bench-out/ in the current directory
    (out,) = (cwd / "run" / "bench").glob("run-*")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 4 and summary["workload"]["limit"] == 4 and summary["workload"]["url"] == sim_engine
    assert f"wrote {out.relative_to(cwd)}" in r.stdout
    assert BAR not in r.stderr  # stderr is not a terminal: no bar
    r2 = subprocess.run([*KVMESH, "bench", "run", "--url", sim_engine, "--limit", "2", "--max-tokens", "1"],
                        capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r2.returncode == 0 and len(list((cwd / "run" / "bench").glob("run-*"))) == 2  # never overwritten


def test_bench_compare_prints_a_table_and_writes_under_the_run_directory(tmp_path: pathlib.Path) -> None:
    r = subprocess.run([*KVMESH, "bench", "compare", "--workload", "chat", "--requests", "8", "--speedup", "16",
                        "--routers", "kvmesh-round-robin,sglang-round_robin", "--repeats", "2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(os.listdir(tmp_path)) <= {"run", "models"}  # no compare.json / compare.png here
    (out,) = (tmp_path / "run" / "bench").glob("compare-*")
    m = json.loads((out / "compare.json").read_text())
    rr = m["routers"]["kvmesh-round-robin"]
    assert rr["ok"] == 16 and rr["runs"] == 2 and len(rr["ttft_mean_ms_runs"]) == 2  # two interleaved runs
    assert rr["router_cpu_s"] > 0  # the gateway's CPU, read from /proc while it served
    assert (out / "router-kvmesh-round-robin.log").is_file()
    assert "{'" not in r.stdout and "'ttft_mean_ms'" not in r.stdout  # not Python dicts
    row = next(line for line in r.stdout.splitlines() if "│ kvmesh-round-robin" in line)
    assert str(m["routers"]["kvmesh-round-robin"]["ttft_mean_ms"]) in row
    assert "not installed: run `make routers`" in r.stdout  # the router that could not run says why


def _trace(tmp_path: pathlib.Path) -> pathlib.Path:
    rng = random.Random(5)
    lines = [json.dumps({"timestamp": i * 100, "input_length": 3 * 512, "output_length": 8,
                         "hash_ids": [0, 100 + rng.randrange(4), 1000 + i]}) for i in range(40)]
    (tmp_path / "trace.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "trace.jsonl"


def test_sim_says_which_profile_and_draws_a_bar_on_a_terminal(tmp_path: pathlib.Path) -> None:
    cmd = [*KVMESH, "sim", "--trace", str(_trace(tmp_path)), "--replicas", "2", "--policy", "round-robin",
           "--policy", "kv-aware", "--profile", "cpu-demo-small"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "simulating 40 requests" in r.stdout and "on 2 replicas, timing profile cpu-demo-small" in r.stdout
    assert "| kv-aware |" in r.stdout and BAR not in r.stderr
    # stderr a terminal: the bar is drawn there (and stdout keeps the table only)
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, text=True,
                            env=os.environ | {"COLUMNS": "120", "TERM": "xterm"})
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        drawn += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 0 and "| kv-aware |" in out and BAR not in out
    assert BAR in drawn.decode(errors="replace") and "policy" in drawn.decode(errors="replace")
