"""The local stack behind ``kvmesh up``: a demo model, N supervised vLLM replicas and a gateway.

``Stack`` is importable so tests and benchmarks run exactly what the CLI runs.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence

from kvmesh.cache.node import CacheNode
from kvmesh.config import CacheNodeSpec, EngineConfig, SimEngineConfig, StackConfig, VllmEngineConfig
from kvmesh.engines import Engine, SimEngine, Supervisor, VllmEngine
from kvmesh.engines.vllm import resolved_dtype
from kvmesh.gateway import Gateway
from kvmesh.gateway.app import ENGINE_EXITED
from kvmesh.models import demo

log = logging.getLogger(__name__)
DEMO_MODEL_NAME = "kvmesh-demo"


def ensure_demo_model(cfg: StackConfig) -> pathlib.Path:
    path = pathlib.Path(cfg.models_dir) / f"demo-{cfg.model_size}"
    if not demo.is_complete(path):
        log.info("generating the %s demo model in %s", cfg.model_size, path)
        demo.generate(cfg.model_size, path)
    return path


def engine_template(cfg: StackConfig) -> EngineConfig:
    """The ``[engine]`` table, or the demo model served by ``engine_kind`` replicas."""
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


def replica_configs(template: EngineConfig, replicas: int, base_port: int, bind_cores: bool,
                    run_dir: pathlib.Path) -> Sequence[tuple[str, EngineConfig]]:
    """Derive N replica configs from one template: own port, own event socket, own core (vLLM)."""
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


class Stack:
    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        run_dir = pathlib.Path(cfg.supervisor.run_dir)
        template = engine_template(cfg)
        self.cache_node: CacheNode | None = None
        self.template = template
        if cfg.cache.enabled and isinstance(template, VllmEngineConfig):
            run_dir.mkdir(parents=True, exist_ok=True)
            self.cache_node = CacheNode(cfg.cache, run_dir)
            template = template.model_copy(update={"cache_node_socket": str(self.cache_node.socket_path.resolve())})
        sup = cfg.supervisor
        self.engines: list[Engine] = [
            make_engine(name, c, run_dir)
            for name, c in replica_configs(template, sup.replicas, sup.base_port, sup.bind_cores, run_dir)
        ]
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
        for e in self.engines:
            replay = e.cfg.replay_endpoint if isinstance(e, VllmEngine) else None  # sim: no replay buffer
            self.gateway.pool.add(e.name, e.url, e.kv_events_endpoint, replay)
        self.supervisor.on_change(self._engine_changed)

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

    async def start(self, wait: bool = True) -> None:
        """Start the gateway first (it answers 503 until a replica is ready), then the engines."""
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

    async def stop(self) -> None:
        await self.gateway.stop()
        await self.supervisor.stop()
        if self.cache_node is not None:
            await self.cache_node.stop()
