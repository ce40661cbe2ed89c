"""Issue 18, "the first hour on a real machine": GPUs per replica, a second stack beside the first, one-line
errors, ordered engine stops that leave nothing in /dev/shm.

Most tests run ``kvmesh up`` against a stand-in for vLLM: a package named ``vllm`` first on ``PYTHONPATH``
whose ``vllm.entrypoints.openai.api_server`` serves ``/health``, ``/v1/models``, ``/v1/completions`` and
``/env`` (its own ``CUDA_VISIBLE_DEVICES``), and forks an "engine core" like vLLM's: it holds a
``/dev/shm/psm_*`` file, and on SIGTERM takes a moment to clean up after the API server has already exited
(the order that leaked files when the stop SIGKILLed the group as soon as the API server was gone).  So the
supervisor's real subprocess path (start, GPU environment, ordered stop) runs in a second instead of a minute.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import free_port_block, wait_until

KVMESH = [sys.executable, "-m", "kvmesh"]
FAKE_SERVER = textwrap.dedent('''
    """A stand-in for vLLM's OpenAI server (tests/test_first_hour.py)."""
    import argparse, asyncio, os, pathlib, signal, subprocess, sys
    from aiohttp import web

    CORE = """
    import os, pathlib, signal, sys, time
    shm = pathlib.Path('/dev/shm/psm_kvmeshfake_%d' % os.getpid())
    shm.write_bytes(b'x' * 4096)
    held = shm.open('rb')  # held open, as vLLM's shared-memory queues are
    def bye(*_):
        time.sleep(0.5)  # vLLM's engine core takes a while to shut down after the API server left
        shm.unlink()
        pathlib.Path(sys.argv[1], 'core-%d.clean' % os.getpid()).write_text('')
        os._exit(0)
    signal.signal(signal.SIGTERM, bye)
    while True:
        time.sleep(1)
    """

    p = argparse.ArgumentParser()
    p.add_argument("--host"); p.add_argument("--port", type=int); p.add_argument("--served-model-name")
    args, _ = p.parse_known_args()
    print("INFO Loading weights took 0.01 seconds", flush=True)  # before binding: the supervisor sees it
    marks = os.environ["FAKE_VLLM_MARKS"]
    pathlib.Path(marks, f"started-{os.getpid()}").write_text(" ".join(sys.argv))
    core = subprocess.Popen([sys.executable, "-c", CORE, marks])

    async def completions(r):
        return web.json_response({"id": "c", "object": "text_completion", "model": args.served_model_name,
                                  "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = web.Application()
    app.router.add_get("/health", lambda r: web.Response(text=""))
    app.router.add_get("/v1/models", lambda r: web.json_response(
        {"object": "list", "data": [{"id": args.served_model_name, "object": "model"}]}))
    app.router.add_get("/env", lambda r: web.json_response(
        {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv}))
    app.router.add_post("/v1/completions", completions)

    def on_term(*_):
        core.send_signal(signal.SIGTERM)  # tell the core, then leave at once (as the real server may)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=False)
''')


@pytest.fixture(scope="session")
def fake_vllm(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A directory to put first on PYTHONPATH: it holds the stand-in ``vllm`` package."""
    root = tmp_path_factory.mktemp("fake-vllm")
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_SERVER)
    return root


def fake_env(fake_vllm: pathlib.Path, marks: pathlib.Path, **extra: str) -> dict[str, str]:
    marks.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return env | {"PYTHONPATH": f"{fake_vllm}{os.pathsep}{env.get('PYTHONPATH', '')}",
                  "FAKE_VLLM_MARKS": str(marks)} | extra


def write_config(path: pathlib.Path, tiny_model: pathlib.Path, base_port: int, replicas: int,
                 extra_engine: str = "", run_dir: str | None = None) -> pathlib.Path:
    run = f'run_dir = "{run_dir}"\n' if run_dir else ""
    path.write_text(f'[engine]\nmodel = "{tiny_model}"\nserved_model_name = "kvmesh-demo"\n{extra_engine}'
                    f'[supervisor]\nreplicas = {replicas}\nbase_port = {base_port}\nstart_timeout_s = 60\n{run}'
                    '[cache]\nenabled = false\n')
    return path


class Up:
    """A ``kvmesh up`` subprocess; ``stop()`` sends SIGTERM and returns its output."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: pathlib.Path) -> None:
        self.proc = subprocess.Popen([*KVMESH, "up", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=cwd)

    def wait_up(self) -> str:
        lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.append(line)
            if "kvmesh is up" in line:
                return "".join(lines)
        raise AssertionError("".join(lines[-40:]))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    made: list[Up] = []
    yield made
    for u in made:
        if u.proc.poll() is None:
            u.stop()


def leftover_fake_shm() -> list[pathlib.Path]:
    return [p for p in pathlib.Path("/dev/shm").glob("psm_kvmeshfake_*")
            if not pathlib.Path(f"/proc/{p.name.rsplit('_', 1)[1]}").exists()]


def test_gpus_per_replica_in_each_engine_and_in_health(tmp_path: pathlib.Path, tiny_model: pathlib.Path,
                                                       fake_vllm: pathlib.Path, ups: list[Up]) -> None:
    """Item 1 (acceptance): 4 replicas x tensor_parallel_size 2 on a faked 8-GPU machine get disjoint devices,
    each engine sees its own CUDA_VISIBLE_DEVICES and vLLM's --tensor-parallel-size, /health shows them."""
    gw, base = free_port_block(1), free_port_block(4)
    conf = write_config(tmp_path / "k.toml", tiny_model, base, 4, "tensor_parallel_size = 2\n")
    env = fake_env(fake_vllm, tmp_path / "marks", KVMESH_GPU_COUNT="8")
    up = Up(["--config", str(conf), "--port", str(gw)], env, tmp_path)
    ups.append(up)
    started = up.wait_up()
    # item 9: each replica's progress, from its log, while the stack starts
    assert "engine engine-3: loading weights (" in started and "engine engine-3: ready (" in started, started
    health = httpx.get(f"http://127.0.0.1:{gw}/health").json()["backends"]
    assert [health[f"engine-{i}"]["gpus"] for i in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    for i in range(4):
        seen = httpx.get(f"http://127.0.0.1:{base + i}/env").json()
        assert seen["CUDA_VISIBLE_DEVICES"] == health[f"engine-{i}"]["gpus"]
        assert "--tensor-parallel-size" in seen["argv"]
    up.stop()
    assert up.proc.returncode == 0


def test_more_gpus_than_the_machine_has_is_one_line(tmp_path: pathlib.Path, tiny_model: pathlib.Path,
                                                     fake_vllm: pathlib.Path) -> None:
    """Item 1: a config that asks for more GPUs than there are is refused before anything starts."""
    conf = write_config(tmp_path / "k.toml", tiny_model, free_port_block(3), 3, "tensor_parallel_size = 2\n")
    env = fake_env(fake_vllm, tmp_path / "marks", KVMESH_GPU_COUNT="4")
    r = subprocess.run([*KVMESH, "up", "--config", str(conf), "--port", str(free_port_block(1))],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "need 6 GPUs, but 4 are available" in r.stderr
    assert not list((tmp_path / "marks").iterdir()), "no engine was started"


def test_two_stacks_side_by_side(tmp_path: pathlib.Path, tiny_model: pathlib.Path, fake_vllm: pathlib.Path,
                                 ups: list[Up]) -> None:
    """Item 6 (acceptance): two stacks on different ports both serve, each in its own run directory
    (run/<port>), and stopping one leaves the other whole; a third asking for the first one's engine port
    fails with one line before starting any engine (checked: no engine process was spawned, not a clock)."""
    env = fake_env(fake_vllm, tmp_path / "marks")
    # each stack's gateway and engine ports from one free block: two separate draws could pick the same port
    # (a fresh-clone CI run drew gateway port == engine base port)
    block_a = free_port_block(3)
    block_b = next(b for b in iter(lambda: free_port_block(3), None) if abs(b - block_a) >= 3)
    (gw_a, base_a), (gw_b, base_b) = (block_a + 2, block_a), (block_b + 2, block_b)
    a = Up(["--config", str(write_config(tmp_path / "a.toml", tiny_model, base_a, 2)), "--port", str(gw_a)],
           env, tmp_path)
    ups.append(a)
    a.wait_up()
    b = Up(["--config", str(write_config(tmp_path / "b.toml", tiny_model, base_b, 2)), "--port", str(gw_b)],
           env, tmp_path)
    ups.append(b)
    b.wait_up()
    body = {"model": "kvmesh-demo", "prompt": "hi", "max_tokens": 1}
    for gw in (gw_a, gw_b):
        assert httpx.post(f"http://127.0.0.1:{gw}/v1/completions", json=body, timeout=30).status_code == 200
    assert (tmp_path / "run" / str(gw_a) / "engine-0.log").is_file()
    assert (tmp_path / "run" / str(gw_b) / "engine-0.log").is_file()

    started = set((tmp_path / "marks").glob("started-*"))
    clash = subprocess.run([*KVMESH, "up", "--config", str(write_config(tmp_path / "c.toml", tiny_model, base_a, 2)),
                            "--port", str(free_port_block(1))], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=60)
    assert clash.returncode == 1 and clash.stderr.count("\n") == 1, clash.stderr
    assert f"port {base_a} ([supervisor] base_port + 0) is already in use" in clash.stderr
    assert set((tmp_path / "marks").glob("started-*")) == started, "the second stack started no engine"

    b.stop()
    assert b.proc.returncode == 0
    assert httpx.post(f"http://127.0.0.1:{gw_a}/v1/completions", json=body, timeout=30).status_code == 200
    health = httpx.get(f"http://127.0.0.1:{gw_a}/health").json()["backends"]
    assert all(x["healthy"] for x in health.values())
    assert (tmp_path / "run" / str(gw_a) / "kvmesh.lock").read_text().strip() == str(a.proc.pid)
    a.stop()
    assert a.proc.returncode == 0


def test_same_run_dir_is_refused(tmp_path: pathlib.Path, tiny_model: pathlib.Path, fake_vllm: pathlib.Path,
                                 ups: list[Up]) -> None:
    """Item 6: a stack never adopts (or deletes) another stack's run directory."""
    env = fake_env(fake_vllm, tmp_path / "marks")
    run = str(tmp_path / "shared-run")
    a = Up(["--config", str(write_config(tmp_path / "a.toml", tiny_model, free_port_block(1), 1, run_dir=run)),
            "--port", str(free_port_block(1))], env, tmp_path)
    ups.append(a)
    a.wait_up()
    r = subprocess.run([*KVMESH, "up", "--config",
                        str(write_config(tmp_path / "b.toml", tiny_model, free_port_block(1), 1, run_dir=run)),
                        "--port", str(free_port_block(1))], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is in use by another kvmesh" in r.stderr, r.stderr
    a.stop()


def test_stop_waits_for_the_engine_core_and_leaves_no_shm(tmp_path: pathlib.Path, tiny_model: pathlib.Path,
                                                          fake_vllm: pathlib.Path, ups: list[Up]) -> None:
    """Item 8: the stop SIGTERMs the API server, waits for the engine core to clean up by itself (it writes
    core-*.clean on the way out), and leaves no /dev/shm file behind."""
    env = fake_env(fake_vllm, tmp_path / "marks")
    up = Up(["--config", str(write_config(tmp_path / "k.toml", tiny_model, free_port_block(2), 2)),
             "--port", str(free_port_block(1))], env, tmp_path)
    ups.append(up)
    up.wait_up()
    out = up.stop()
    assert up.proc.returncode == 0, out
    assert len(list((tmp_path / "marks").glob("core-*.clean"))) == 2, out[-2000:]
    assert not leftover_fake_shm()
    assert "still running" not in out and "shared-memory file" not in out


def test_engine_that_dies_while_starting_is_one_line(tmp_path: pathlib.Path) -> None:
    """Item 7: a model vLLM cannot load (here: a Hugging Face id on an offline machine) ends ``kvmesh up`` with
    one line naming the engine, its error and its log, and no traceback.  The stand-in exits at once."""
    root = tmp_path / "dying"
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text("import sys\nprint('OSError: We could not connect to huggingface.co')\n"
                                       "sys.exit(1)\n")
    conf = tmp_path / "k.toml"
    conf.write_text(f'[engine]\nmodel = "Qwen/Qwen3-0.6B"\n[supervisor]\nreplicas = 1\n'
                    f'base_port = {free_port_block(1)}\n[cache]\nenabled = false\n')
    env = os.environ | {"PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([*KVMESH, "up", "--config", str(conf), "--port", str(free_port_block(1))],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("kvmesh: error:")]
    assert errors and "engine engine-0 exited with 1 while starting" in errors[0] and "huggingface.co" in errors[0]
    assert "Traceback" not in r.stderr and "engine-0.log" in errors[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["up", "--replicas", "0"], "--replicas: must be at least 1"),
    (["up", "--policy", "best"], "--policy"),
    (["cache-node", "--peer", "x"], "--peer: "),
    (["cache-node", "--dram-mib", "0"], "--dram-mib: must be at least 1"),
    (["engine", "--model", "m", "--kind", "sim", "--", "--tensor-parallel-size", "2"], "flags after --"),
])
def test_errors_name_flags_that_exist(args: list[str], needle: str) -> None:
    """Item 7: error messages name the command's own flags and carry no pydantic wording."""
    r = subprocess.run([*KVMESH, *args], capture_output=True, text=True, timeout=60)
    line = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in line and needle in line, line
    for bad in ("--gateway-", "--supervisor-", "--peers", "Value error", "Input should", "Extra inputs"):
        assert bad not in line, line


def test_unknown_config_key_is_plain(tmp_path: pathlib.Path) -> None:
    """Item 7: an unknown key in a config file says so in kvmesh's words."""
    (tmp_path / "k.toml").write_text("[gateway]\nportt = 1\n")
    r = subprocess.run([*KVMESH, "up", "--config", str(tmp_path / "k.toml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "gateway.portt: unknown setting" in r.stderr, r.stderr


@pytest.mark.parametrize("cmd", [["gateway", "--backend", "http://127.0.0.1:1"], ["engine", "--kind", "sim"],
                                 ["cache-node", "--http-port"], ["cache-node", "--peer-port"]])
def test_port_in_use_is_one_line(cmd: list[str], tmp_path: pathlib.Path, tiny_model: pathlib.Path) -> None:
    """Item 7: a port in use is one line naming the port and the flag, for every command that binds one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        flag = cmd[-1] if cmd[-1].startswith("--") and cmd[0] == "cache-node" else "--port"
        args = [*cmd, str(port)] if cmd[0] == "cache-node" else [*cmd, "--port", str(port)]
        if cmd[0] == "engine":
            args += ["--model", str(tiny_model)]
        if cmd[0] == "cache-node":
            args += ["--run-dir", str(tmp_path), "--dram-mib", "1", "--ssd-mib", "0"]
        r = subprocess.run([*KVMESH, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    line = r.stderr.strip()
    assert r.returncode == 1 and "\n" not in line, line
    assert f"port {port} ({flag}) is already in use" in line


def test_engine_passes_vllm_flags_after_double_dash(tmp_path: pathlib.Path, tiny_model: pathlib.Path,
                                                    fake_vllm: pathlib.Path) -> None:
    """Item 2: ``kvmesh engine ... -- --flag value`` reaches vLLM's command line."""
    port = free_port_block(1)
    env = fake_env(fake_vllm, tmp_path / "marks")
    proc = subprocess.Popen([*KVMESH, "engine", "--model", str(tiny_model), "--port", str(port), "--run-dir",
                             str(tmp_path / "run"), "--", "--tensor-parallel-size", "2", "--enforce-eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until(lambda: _get_json(f"http://127.0.0.1:{port}/env") is not None, 60, "the engine")
        argv = (_get_json(f"http://127.0.0.1:{port}/env") or {})["argv"]
        assert argv[-3:] == ["--tensor-parallel-size", "2", "--enforce-eager"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def _get_json(url: str) -> dict[str, object] | None:
    try:
        r = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return json.loads(r.text) if r.status_code == 200 else None


_LEAKY_RUN = """\
import pathlib, subprocess, sys

HOLD = "import mmap, sys, time; f = open(sys.argv[1], 'w+b'); f.write(b'x' * 4096); f.flush(); " \\
       "m = mmap.mmap(f.fileno(), 4096); print('held', flush=True); time.sleep(600)"
child = None

def test_a_process_of_ours_maps_a_file():
    global child
    child = subprocess.Popen([sys.executable, "-c", HOLD, {leak!r}], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"  # mapped: the check samples it after this test

def test_it_dies_without_unlinking():
    child.kill()
    child.wait()
"""


def test_session_end_fails_on_a_shm_leak(tmp_path: pathlib.Path) -> None:
    """Item 8: the suite-wide check (``tests/conftest.py``) fails a run whose own process left a shared-memory
    file behind that nobody holds (and removes nothing itself), and ignores a file it never held."""
    leak = pathlib.Path(f"/dev/shm/psm_kvmeshtest_{os.getpid()}_{tmp_path.name}")
    foreign = pathlib.Path(f"/dev/shm/psm_kvmeshforeign_{os.getpid()}_{tmp_path.name}")
    foreign.write_bytes(b"x")  # another run's leftover: not this run's leak
    (tmp_path / "test_leak.py").write_text(_LEAKY_RUN.format(leak=str(leak)))
    repo = pathlib.Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                            "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_leak.py")],
                           capture_output=True, text=True, cwd=repo, timeout=120,
                           env=os.environ | {"KVMESH_SHM_CHECK": ""})
        assert leak.exists(), "the check must not remove anything"
    finally:
        leak.unlink(missing_ok=True)
        foreign.unlink(missing_ok=True)
    assert r.returncode == 1 and "leaked 1 shared-memory file" in r.stdout and leak.name in r.stdout, r.stdout
    assert foreign.name not in r.stdout


def test_a_named_semaphore_is_seen_as_held() -> None:
    """Item 8: a held ``sem.mp-*`` (mapped under glibc's temporary name) counts as the holder's, so neither the
    stop's verification nor the session check mistakes a live semaphore for a leak."""
    import multiprocessing

    from kvmesh.engines.procs import shm_files

    lock = multiprocessing.get_context("spawn").Lock()
    name = pathlib.Path("/dev/shm", "sem." + lock._semlock.name.lstrip("/"))  # type: ignore[attr-defined]
    assert name.exists() and name in shm_files({os.getpid()})


def test_bench_run_against_nothing_fails(tmp_path: pathlib.Path) -> None:
    """Item 7: ``kvmesh bench run`` against a URL where nothing listens exits 1 with one line, not 0 with NaNs."""
    r = subprocess.run([*KVMESH, "bench", "run", "--url", "http://127.0.0.1:1", "--limit", "2", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "no request to http://127.0.0.1:1 succeeded" in r.stderr and "nan" not in r.stdout.lower()


def test_one_config_file_for_gateway_and_cache_node(tmp_path: pathlib.Path) -> None:
    """Item 3: ``kvmesh gateway --config`` takes the [gateway] table (tenants, routing, admission) and
    ``kvmesh cache-node --config`` the [cache] table and [supervisor] run_dir, from the file ``kvmesh up`` reads."""
    from kvmesh.gateway.tenants import hash_key

    gw_port = free_port_block(1)
    (tmp_path / "tenants.toml").write_text(f'[[tenants]]\nname = "a"\nkey_sha256 = ["{hash_key("sk-a")}"]\n')
    conf = tmp_path / "k.toml"
    conf.write_text(f'[gateway]\nport = {gw_port}\npolicy = "round-robin"\nbackends = ["http://127.0.0.1:1"]\n'
                    f'tenants_file = "{tmp_path / "tenants.toml"}"\nmax_queue = 7\n[gateway.routing]\nkv_high = 0.5\n'
                    f'[cache]\ndram_mib = 4\nssd_mib = 0\nsocket = "{tmp_path / "node.sock"}"\n'
                    f'[supervisor]\nrun_dir = "{tmp_path / "run"}"\n')
    procs = [subprocess.Popen([*KVMESH, cmd, "--config", str(conf)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in ("gateway", "cache-node")]
    try:
        wait_until(lambda: _get_json(f"http://127.0.0.1:{gw_port}/health") is not None, 60, "the gateway")
        assert (_get_json(f"http://127.0.0.1:{gw_port}/health") or {})["policy"] == "round-robin"
        r = httpx.post(f"http://127.0.0.1:{gw_port}/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 401  # the tenants file from the config
        status = [*KVMESH, "cache", "status", "--socket", str(tmp_path / "node.sock"), "--json"]
        wait_until(lambda: subprocess.run(status, capture_output=True, timeout=30).returncode == 0, 60, "the node")
        st = json.loads(subprocess.run(status, capture_output=True, text=True, timeout=30).stdout)
        assert st["dram"]["capacity_bytes"] == 4 << 20
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=60)
    assert [p.returncode for p in procs] == [0, 0]


def test_engine_environment(tmp_path: pathlib.Path) -> None:
    """Items 1 and 9: a replica's GPUs reach its environment; vLLM-CPU starts without AOT compilation (its
    artifact cannot be loaded back, see DEVELOPERS.md), unless ``[engine] env`` says otherwise."""
    from kvmesh.config import VllmEngineConfig
    from kvmesh.engines import VllmEngine
    from kvmesh.engines.vllm import vllm_cpu_build

    env = VllmEngine("e", VllmEngineConfig(model="/m", gpus="2,3", tensor_parallel_size=2), tmp_path).environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env.get("VLLM_USE_AOT_COMPILE") == ("0" if vllm_cpu_build() else os.environ.get("VLLM_USE_AOT_COMPILE"))
    mine = VllmEngine("e", VllmEngineConfig(model="/m", env={"VLLM_USE_AOT_COMPILE": "1"}), tmp_path).environment()
    assert mine["VLLM_USE_AOT_COMPILE"] == "1"
    cmd = VllmEngine("e", VllmEngineConfig(model="/m", tensor_parallel_size=2), tmp_path).command()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
