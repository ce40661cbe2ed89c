"""Config files: valid ones load into typed objects, invalid ones fail with one clear line."""

from __future__ import annotations

import pathlib

import pytest

from kvmesh.config import ConfigError, SimEngineConfig, VllmEngineConfig, engine_config, load_stack_config


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    p = tmp_path / "kvmesh.toml"
    p.write_text(text)
    return p


def test_full_config_loads(tmp_path: pathlib.Path) -> None:
    cfg = load_stack_config(write(tmp_path, """
model_size = "tiny"
[supervisor]
replicas = 3
base_port = 9100
[gateway]
port = 9000
policy = "round-robin"
backends = ["http://127.0.0.1:1234/"]
[engine]
model = "/models/x"
served_model_name = "x"
kv_events_endpoint = "ipc:///tmp/x.sock"
"""))
    assert cfg.supervisor.replicas == 3 and cfg.gateway.policy == "round-robin"
    assert [b.url for b in cfg.gateway.backends] == ["http://127.0.0.1:1234"]
    assert cfg.engine is not None and cfg.engine.served_model_name == "x"


@pytest.mark.parametrize(("text", "needle"), [
    ("[gateway]\npolicy = 'fastest'\n", "gateway.policy: unknown policy 'fastest'; choose one of: random, "
                                          "round-robin, least-request, kv-aware, prefix, session"),
    ("[engine]\nmodel='m'\nkind='gpu'\n", "engine: engine kind must be 'vllm' or 'sim'"),
    ("[engine]\nmodel='m'\nkind='sim'\ncpu_bind='1'\n", "engine.cpu_bind: not a field of kind = 'sim' engines"),
    ("[engine]\nmodel='m'\nblock_size=16\n", "engine.block_size: not a field of kind = 'vllm' engines"),
    ("[engine]\nmodel='m'\ndtype='int4'\n", "engine.dtype"),
    ("[engine]\nkind='sim'\n", "engine.model: required"),
    ("[gateway]\nprt = 1\n", "gateway.prt"),
    ("[supervisor]\nreplicas = 0\n", "supervisor.replicas"),
    ("[engine]\nmodel='m'\nkv_events_endpoint='tcp://127.0.0.1:5557'\n", "ipc://"),
    ("[gateway\n", "not valid TOML"),
    ("[engine]\nmodel='m'\ncpu_affinity='1-x'\n", "not a CPU list"),
    ("[gateway]\nport = 8101\n[supervisor]\nbase_port = 8100\nreplicas = 2\n", "collides with the engine ports"),
])
def test_bad_config_is_one_clear_error(tmp_path: pathlib.Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_stack_config(write(tmp_path, text))
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


def test_engine_table_by_kind(tmp_path: pathlib.Path) -> None:
    """``[engine]`` without ``kind`` is a vLLM engine (as in the README); ``kind = "sim"`` takes sim fields."""
    vllm = load_stack_config(write(tmp_path, "[engine]\nmodel = '/m'\nkv_cache_gib = 4\ndtype = 'float32'\n")).engine
    assert isinstance(vllm, VllmEngineConfig) and vllm.kv_cache_gib == 4 and vllm.dtype == "float32"
    sim = load_stack_config(write(tmp_path, "[engine]\nkind = 'sim'\nmodel = '/m'\nblock_size = 32\n")).engine
    assert isinstance(sim, SimEngineConfig) and sim.block_size == 32 and sim.profile == "cpu-demo-small"
    assert isinstance(engine_config(model="/m"), VllmEngineConfig)
    assert engine_config(kind="sim", model="/m", time_scale=0.5) == SimEngineConfig(kind="sim", model="/m",
                                                                                     time_scale=0.5)


def test_readme_config_example_loads(tmp_path: pathlib.Path) -> None:
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    example = next(b.split("```", 1)[0] for b in readme.split("```toml\n")[1:] if "[engine]" in b)
    cfg = load_stack_config(write(tmp_path, example))
    assert isinstance(cfg.engine, VllmEngineConfig) and cfg.engine.served_model_name == "my-model"


def test_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_stack_config(tmp_path / "absent.toml")


def test_vllm_command_line(tmp_path: pathlib.Path) -> None:
    from kvmesh.engines import VllmEngine

    e = VllmEngine("engine-0", VllmEngineConfig(model="/m", port=8123, cpu_bind="1", replay_endpoint="ipc:///r"),
                   tmp_path)
    cmd = e.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-prefix-caching" in cmd and cmd[cmd.index("--port") + 1] == "8123"
    ev = cmd[cmd.index("--kv-events-config") + 1]
    assert '"endpoint": "ipc://' in ev and '"replay_endpoint": "ipc:///r"' in ev
    assert e.environment()["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_engine_cpu_affinity_applies_to_its_process(tmp_path: pathlib.Path) -> None:
    """The affinity is set between fork and exec, so vLLM and every process it starts inherit it."""
    import asyncio
    import sys

    from kvmesh.engines import VllmEngine

    out = tmp_path / "cpus"

    class Probe(VllmEngine):
        def command(self) -> list[str]:  # the real start() path, with a process that reports its CPUs
            code = f"import os; open({str(out)!r}, 'w').write(str(sorted(os.sched_getaffinity(0))))"
            return [sys.executable, "-c", code]

    async def run(cfg: VllmEngineConfig) -> int:
        e = Probe("engine-0", cfg, tmp_path)
        await e.start()
        return await e.wait_exit()

    assert asyncio.run(run(VllmEngineConfig(model="/m", cpu_affinity="0"))) == 0
    assert out.read_text() == "[0]"
    with pytest.raises(RuntimeError, match="names a CPU this machine lacks"):
        asyncio.run(run(VllmEngineConfig(model="/m", cpu_affinity="4096")))
