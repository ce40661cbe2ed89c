"""CLI options take their defaults from the config: for every command, each option's effective default is
the default of the config field it maps to (``kvmesh.cli_options``).  A new option must be listed here,
either with its field or as one that no config field describes."""

from __future__ import annotations

from typing import Any

import pytest
import typer
import typer.core
import typer.main
from pydantic import BaseModel
from typer.testing import CliRunner

from kvmesh import cli
from kvmesh.config import (
    CacheNodeConfig,
    GatewayConfig,
    KubernetesEndpoints,
    SimEngineConfig,
    StackConfig,
    SupervisorConfig,
    VllmEngineConfig,
)

Field = tuple[type[BaseModel], str]
_CACHE = {n: (CacheNodeConfig, n) for n in ("socket", "dram_mib", "ssd_dir", "ssd_mib", "eviction", "ttl_s",
                                            "admit_after", "http_port", "http_host", "node_id", "peer_port",
                                            "peer_host", "replicas", "etcd", "etcd_ttl_s", "remote",
                                            "remote_ttl_s")}
_K8S = {f"k8s_{n}": (KubernetesEndpoints, n) for n in ("namespace", "service", "selector", "api_server", "port")}
CONFIG_OPTIONS: dict[str, dict[str, Field]] = {
    "up": {"model_size": (StackConfig, "model_size"), "replicas": (SupervisorConfig, "replicas"),
           "port": (GatewayConfig, "port"), "host": (GatewayConfig, "host"), "policy": (GatewayConfig, "policy"),
           "engine_kind": (StackConfig, "engine_kind"), "dtype": (StackConfig, "engine_dtype"),
           "prefill": (SupervisorConfig, "prefill"), "decode": (SupervisorConfig, "decode")},
    "gateway": {**{n: (GatewayConfig, n) for n in ("tokenizer", "host", "port", "policy", "max_body_bytes")},
                "tenants": (GatewayConfig, "tenants_file"), "discovery": (GatewayConfig, "discovery"), **_K8S},
    "engine": {**{n: (VllmEngineConfig, n) for n in ("model", "kind", "port", "served_model_name", "cpu_bind",
                                                     "kv_cache_gib", "dtype")},
               "kv_events": (VllmEngineConfig, "kv_events_endpoint"), "host": (VllmEngineConfig, "host"),
               **{n: (SimEngineConfig, n) for n in ("profile", "time_scale", "block_size")},
               "run_dir": (SupervisorConfig, "run_dir")},
    "cache-node": {**_CACHE, "peer": (CacheNodeConfig, "peers"), "run_dir": (SupervisorConfig, "run_dir"),
                   "discovery": (CacheNodeConfig, "discovery"), **_K8S},
    "cache status": {"socket": (CacheNodeConfig, "socket")},
}
NOT_CONFIG = {"up": {"config", "verbose",
                     # --autoscale settings are the local actuator's (kvmesh.autoscale.local.LocalConfig)
                     "autoscale", "autoscale_policy", "min_replicas", "max_replicas", "autoscale_set"},
              "gateway": {"backend", "kv_events", "config", "verbose"},
              "engine": {"config", "verbose"}, "cache-node": {"config", "verbose"}, "cache status": {"as_json"}}
# Options for a required field that the command's --config file may give instead (the command checks for one).
FROM_CONFIG_FILE = {("engine", "model")}
# Commands whose options are run parameters (a trace, a load), not settings of a configured component.
NO_CONFIG_COMMANDS = {"sim", "plan", "bench run", "bench compare", "calibrate", "model demo", "operator",
                      "k8s manifests", "top", "tenants hash-key"}


def commands(group: typer.core.TyperGroup, prefix: str = "") -> dict[str, Any]:
    """Every leaf command, by its full name (typer builds on its own copy of click)."""
    out: dict[str, Any] = {}
    for name, cmd in group.commands.items():
        if isinstance(cmd, typer.core.TyperGroup):
            out |= commands(cmd, f"{prefix}{name} ")
        else:
            out[f"{prefix}{name}"] = cmd
    return out


ALL = commands(typer.main.get_command(cli.app))  # type: ignore[arg-type]


def test_every_command_is_classified() -> None:
    assert set(ALL) == set(CONFIG_OPTIONS) | NO_CONFIG_COMMANDS


@pytest.mark.parametrize("name", sorted(CONFIG_OPTIONS))
def test_option_defaults_are_the_config_defaults(name: str) -> None:
    options = {p.name: p for p in ALL[name].params if isinstance(p, typer.core.TyperOption)}
    assert set(options) == set(CONFIG_OPTIONS[name]) | NOT_CONFIG[name], "classify every option above"
    for opt, (model, field) in CONFIG_OPTIONS[name].items():
        p, f = options[opt], model.model_fields[field]
        if f.is_required():
            assert p.required != ((name, opt) in FROM_CONFIG_FILE), opt
            continue
        default = f.get_default(call_default_factory=True)
        # the option itself supplies nothing: the config's default applies when the flag is absent ...
        assert p.default is None, f"{name} --{opt} re-declares a default ({p.default!r}); use config_option()"
        # ... and --help shows that default
        assert p.show_default == (False if default in (None, (), {}) else str(default)), (name, opt)
        assert p.help, f"{name} --{opt} has no help (give the config field a description)"


class _Parsed(Exception):
    pass


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """What each command hands the config, instead of running it."""
    calls: list[tuple[Any, dict[str, Any]]] = []

    def record(schema: Any, flag_names: Any = None, **fields: Any) -> Any:
        calls.append((schema, {k: v for k, v in fields.items() if v is not None}))
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "_parse", record)
    return calls


@pytest.mark.parametrize(("args", "expected"), [
    (["up"], StackConfig().model_dump(exclude_unset=True)),
    (["gateway", "--backend", "http://e:1"], {"backends": ({"url": "http://e:1", "kv_events": None},)}),
    (["engine", "--model", "/m"], {"model": "/m"}),
    (["cache-node"], {}),
])
def test_absent_flags_leave_the_config_defaults(parsed: list[tuple[Any, dict[str, Any]]], args: list[str],
                                                expected: dict[str, Any]) -> None:
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert parsed[0][1] == expected


def test_given_flags_reach_the_config(parsed: list[tuple[Any, dict[str, Any]]]) -> None:
    r = CliRunner().invoke(cli.app, ["up", "--replicas", "3", "--dtype", "float32", "--policy", "kv-aware"])
    assert r.exit_code == 0, r.output
    assert parsed[0][1] == {"supervisor": {"replicas": 3}, "engine_dtype": "float32",
                            "gateway": {"policy": "kv-aware"}}
