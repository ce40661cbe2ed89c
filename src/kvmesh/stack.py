"""The local stack behind ``kvmesh up``: a demo model, N supervised vLLM replicas and a gateway.

With ``[supervisor] prefill``/``decode`` (``kvmesh up --prefill 1 --decode 1``) the first replicas serve as
prefill engines and the next as decode engines (:mod:`kvmesh.routing.disagg`); the engines themselves are
started alike (with the cache node, every one runs the KvmeshConnector as ``kv_both``), the gateway's
backends carry the roles.

``Stack`` is importable so tests and benchmarks run exactly what the CLI runs.  Before it starts anything
(:meth:`Stack.preflight`) it locks its run directory and checks every port it will bind, so a second stack
on the same machine fails with one line instead of adopting the first one's engines.  Each vLLM replica gets
its own GPUs (:mod:`kvmesh.engines.gpus`), shown per backend in the gateway's ``/health``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from kvmesh.autoscale.local import LocalAutoscaler, LocalConfig
from kvmesh.cache.node import CacheNode
from kvmesh.config import CacheNodeSpec, EngineConfig, SimEngineConfig, StackConfig, VllmEngineConfig
from kvmesh.engines import Engine, SimEngine, Supervisor, VllmEngine
from kvmesh.engines.base import EngineDied
from kvmesh.engines.gpus import GpuError, assign, available_gpus
from kvmesh.engines.vllm import resolved_dtype
from kvmesh.gateway import Gateway
from kvmesh.gateway.app import ENGINE_EXITED
from kvmesh.models import demo
from kvmesh.preflight import PortUse, PreflightError, RunDirLock, check_ports

log = logging.getLogger(__name__)
DEMO_MODEL_NAME = "kvmesh-demo"


def ensure_demo_model(cfg: StackConfig) -> pathlib.Path:
    path = pathlib.Path(cfg.models_dir) / f"demo-{cfg.model_size}"
    if not demo.is_complete(path):
        log.info("generating the %s demo model in %s", cfg.model_size, path)
        demo.generate(cfg.model_size, path)
    return path


def engine_template(cfg: StackConfig) -> EngineConfig:
    """The ``[engine]`` table, or the demo model served by ``engine_kind`` replicas; with the gateway's
    ``queue_order = "uncached-first"``, vLLM engines schedule by the priority it sends (else they reject it)."""
    template = _template(cfg)
    if cfg.gateway.queue_order == "uncached-first" and isinstance(template, VllmEngineConfig) \
            and "--scheduling-policy" not in template.extra_args:
        return with_engine_args(template, ("--scheduling-policy", "priority"))
    return template


def _template(cfg: StackConfig) -> EngineConfig:
    if cfg.engine is not None:
        return cfg.engine
    model = ensure_demo_model(cfg)
    if cfg.engine_kind == "sim":
        return SimEngineConfig(kind="sim", model=str(model), served_model_name=DEMO_MODEL_NAME)
    return VllmEngineConfig(model=str(model), served_model_name=DEMO_MODEL_NAME, dtype=cfg.engine_dtype,
                            max_model_len=demo.SPECS[cfg.model_size].max_positions)


def make_engine(name: str, c: EngineConfig, run_dir: pathlib.Path) -> Engine:
    if isinstance(c, SimEngineConfig):
        return SimEngine(name, c.model, c.served_model_name or c.model, c.port, c.profile, c.host,
                         c.block_size, c.time_scale, c.kv_events_endpoint)
    return VllmEngine(name, c, run_dir)


def replica_gpus(template: EngineConfig, replicas: int, gpus: str | None) -> list[str | None]:
    """Each replica's ``CUDA_VISIBLE_DEVICES`` (None: left alone): vLLM replicas whose template names no
    devices itself get disjoint sets of ``tensor_parallel_size``; ``GpuError`` when there are too few."""
    if not isinstance(template, VllmEngineConfig) or template.gpus is not None or \
            "CUDA_VISIBLE_DEVICES" in template.env:
        return [None] * replicas
    return assign(available_gpus(gpus), replicas, template.tensor_parallel_size, explicit=gpus is not None)


def replica_configs(template: EngineConfig, replicas: int, base_port: int, bind_cores: bool,
                    run_dir: pathlib.Path, gpus: Sequence[str | None] = ()) -> Sequence[tuple[str, EngineConfig]]:
    """Derive N replica configs from one template: own port, own event socket, own core and GPUs (vLLM)."""
    ncpu = os.cpu_count() or 1
    out = []
    for i in range(replicas):
        name = f"engine-{i}"
        upd: dict[str, object] = {"port": base_port + i}
        if template.kv_events and template.kv_events_endpoint is None:
            upd["kv_events_endpoint"] = f"ipc://{run_dir.resolve()}/{name}-kv.sock"
        if isinstance(template, VllmEngineConfig):
            if bind_cores and template.cpu_bind is None:
                upd["cpu_bind"] = str(i % ncpu)
            if i < len(gpus) and gpus[i] is not None:
                upd["gpus"] = gpus[i]
            if template.kv_events and template.kv_events_endpoint is None:
                upd["replay_endpoint"] = f"ipc://{run_dir.resolve()}/{name}-kv-replay.sock"
        out.append((name, template.model_copy(update=upd)))
    return out


def engine_dtype_line(template: EngineConfig) -> str | None:
    """How the banner says which dtype vLLM engines compute in, and why; None for simulated engines."""
    if not isinstance(template, VllmEngineConfig):
        return None
    choice = resolved_dtype(template)
    return f"engine dtype {choice.dtype} ({choice.reason})"


def with_run_dir(cfg: StackConfig) -> StackConfig:
    """``[supervisor] run_dir`` when set, else ``run/<gateway port>``: two stacks on one machine never share
    logs, sockets or the cache node's socket."""
    if "run_dir" in cfg.supervisor.model_fields_set:
        return cfg
    sup = cfg.supervisor.model_copy(update={"run_dir": f"run/{cfg.gateway.port}"})
    return cfg.model_copy(update={"supervisor": sup})


@contextlib.contextmanager
def up_errors(fail: Callable[[str, int], NoReturn]) -> Iterator[None]:
    """What ``kvmesh up`` says in one line instead of a traceback (exit 2: the config; 1: the machine)."""
    try:
        yield
    except GpuError as e:
        fail(str(e), 2)
    except (PreflightError, TimeoutError) as e:
        fail(str(e), 1)
    except EngineDied as e:
        fail(e.summary, 1)
    except OSError as e:  # a shared-memory arena that does not fit, a run directory that cannot be made, ...
        fail(f"cannot start the stack: {e}", 1)
    except ValueError as e:
        fail(str(e), 2)


def with_engine_args(template: EngineConfig, args: Sequence[str]) -> EngineConfig:
    """The template with vLLM flags (``kvmesh up -- ...``) appended to its ``extra_args``."""
    if not args:
        return template
    if not isinstance(template, VllmEngineConfig):
        raise ValueError(f"flags after -- go to vLLM, but the engines are simulated (kind = {template.kind!r})")
    return template.model_copy(update={"extra_args": (*template.extra_args, *args)})


def warn_unless_local(template: EngineConfig) -> None:
    """A model that is not a directory is a Hugging Face id vLLM must download: say so before it tries."""
    if isinstance(template, VllmEngineConfig) and not pathlib.Path(template.model).is_dir():
        log.warning("[engine] model %r is not a directory here: vLLM will look for it in the Hugging Face "
                    "cache or download it (this machine may be offline)", template.model)


class Stack:
    def __init__(self, cfg: StackConfig, engine_args: Sequence[str] = (), autoscale: LocalConfig | None = None) -> None:
        self.cfg = cfg
        run_dir = pathlib.Path(cfg.supervisor.run_dir)
        template = with_engine_args(engine_template(cfg), engine_args)
        warn_unless_local(template)
        sup = cfg.supervisor
        gpus = replica_gpus(template, sup.replicas, sup.gpus)  # before the cache node allocates its arena
        self.cache_node: CacheNode | None = None
        self.template = template
        self._lock = RunDirLock(run_dir)
        self._locked = False
        if cfg.cache.enabled and isinstance(template, VllmEngineConfig):
            run_dir.mkdir(parents=True, exist_ok=True)
            self.cache_node = CacheNode(cfg.cache, run_dir)
            template = template.model_copy(update={"cache_node_socket": str(self.cache_node.socket_path.resolve())})
        # autoscaled: configs for up to max replicas (ports, sockets), the first min of them started now
        n = max(sup.replicas, autoscale.max_replicas) if autoscale else sup.replicas
        self._replica_cfgs = replica_configs(template, n, sup.base_port, sup.bind_cores, run_dir, gpus)
        self._run_dir = run_dir
        self.engines: list[Engine] = [make_engine(name, c, run_dir) for name, c in
                                      self._replica_cfgs[:autoscale.min_replicas if autoscale else n]]
        self.supervisor = Supervisor(self.engines, sup)
        gw_cfg = cfg.gateway
        if gw_cfg.tokenizer is None:  # the served model's own tokenizer, for KV-aware routing
            gw_cfg = gw_cfg.model_copy(update={"tokenizer": template.model})
        if self.cache_node is not None and self.cache_node.events_endpoint:
            # every engine of this stack shares the node: its DRAM/SSD blocks are loadable by all of them
            spec = CacheNodeSpec(name=f"cache-{self.cache_node.node_id}",
                                 kv_events=self.cache_node.events_endpoint,
                                 replay=self.cache_node.events_replay_endpoint)
            gw_cfg = gw_cfg.model_copy(update={"cache_nodes": (*gw_cfg.cache_nodes, spec)})
        self.gateway = Gateway(gw_cfg)
        roles = sup.roles() if autoscale is None else ["both"] * len(self.engines)  # autoscaled: aggregated
        for e, role in zip(self.engines, roles, strict=True):  # P/D: prefill replicas first
            replay = e.cfg.replay_endpoint if isinstance(e, VllmEngine) else None  # sim: no replay buffer
            self.gateway.pool.add(e.name, e.url, e.kv_events_endpoint, replay, role)
            if isinstance(e, VllmEngine) and e.cfg.gpus is not None:
                self.gateway.backend_info[e.name] = {"gpus": e.cfg.gpus}
        self.supervisor.on_change(self._engine_changed)
        self.autoscaler = None if autoscale is None else LocalAutoscaler(
            self.gateway, self.supervisor, self._new_replica, [e.name for e in self.engines], autoscale)

    def _new_replica(self, i: int) -> tuple[Engine, str | None]:
        """Replica ``i`` for the autoscaler (its port and sockets were reserved with the others)."""
        name, c = self._replica_cfgs[i]
        e = make_engine(name, c, self._run_dir)
        return e, e.kv_events_endpoint

    def dtype_line(self) -> str | None:
        """The engines' dtype for the banner (resolved, and logged, when the first engine starts)."""
        return engine_dtype_line(self.template)

    def _engine_changed(self, engine: Engine, up: bool) -> None:
        b = self.gateway.pool.get(engine.name)
        if b is None:
            return
        if up:
            self.gateway.pool.poke()  # let a health check (which also fetches /v1/models) bring it back
        else:
            self.gateway.pool.set_health(b, False, ENGINE_EXITED)

    def port_uses(self) -> list[PortUse]:
        """Every fixed port this stack binds, with the setting that chose it."""
        gw = self.cfg.gateway
        uses = [PortUse(gw.host, gw.port, "--port ([gateway] port)")]
        for i, e in enumerate(self.engines):
            host, _, port = e.url.removeprefix("http://").rpartition(":")
            uses.append(PortUse(host, int(port), f"[supervisor] base_port + {i}"))
        if self.cache_node is not None:
            c = self.cfg.cache
            uses += [PortUse(c.http_host, c.http_port or 0, "[cache] http_port"),
                     PortUse(c.peer_host, c.peer_port or 0, "[cache] peer_port")]
        return uses

    def preflight(self) -> None:
        """Lock the run directory and check every port, before anything starts (``PreflightError``)."""
        if self._locked:
            return
        self._lock.acquire()
        try:
            check_ports(self.port_uses())
        except BaseException:
            self._lock.release()
            raise
        self._locked = True

    async def start(self, wait: bool = True) -> None:
        """Start the gateway first (it answers 503 until a replica is ready), then the engines."""
        self.preflight()
        await self.gateway.start()
        try:
            if self.cache_node is not None:
                await self.cache_node.start()
            await self.supervisor.start(wait=wait)
        except BaseException:
            await self.stop()
            raise
        if wait:
            await self.gateway.refresh_backends()
        if self.autoscaler is not None:
            self.autoscaler.start()

    async def stop(self) -> None:
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        if not self._locked:  # never started: the run directory's files may be another stack's
            if self.cache_node is not None:
                await self.cache_node.store.close()  # the arena it allocated
            return
        await self.gateway.stop()
        await self.supervisor.stop()
        if self.cache_node is not None:
            await self.cache_node.stop()
        self._lock.release()
        self._locked = False


def up_banner(stack: Stack, cfg: StackConfig, pid: int) -> str:
    """What ``kvmesh up`` prints once the stack serves: where, what, a curl to try, how to stop."""
    url = stack.gateway.url
    model = (cfg.engine.served_model_name or cfg.engine.model) if cfg.engine else DEMO_MODEL_NAME
    kind = cfg.engine.kind if cfg.engine else cfg.engine_kind
    dtype_line = f"  {stack.dtype_line()}\n" if stack.dtype_line() else ""
    key = "  -H 'Authorization: Bearer <your API key>'" if stack.gateway.tenants.enabled else ""
    return (f"\nkvmesh is up: {url}  ({len(stack.engines)} {kind} replicas, policy "
            f"{cfg.gateway.policy}, logs in {cfg.supervisor.run_dir}/)\n{dtype_line}"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json'{key} \\\n"
            f"       -d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
            f"  metrics: {url}/metrics\n  stop: press Ctrl-C (or send SIGTERM to pid {pid})\n")
