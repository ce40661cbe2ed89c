"""Worker side of ``KvmeshConnector``: loads and saves off the engine's step, each on its own thread.

Runs in the vLLM worker process.  The engine thread submits jobs; once per step (vLLM's ``get_finished``) it
collects what is done.  A job touches only KV blocks that vLLM keeps for it until the connector reports the
request done, which is what makes running it beside the next forward pass safe:

* an async load writes into the blocks allocated to a request in ``WAITING_FOR_REMOTE_KVS``: nothing reads
  them until the request is reported in ``finished_recving``;
* an async save reads the blocks of a request that is still running, or finished with its blocks held
  (``request_finished`` returned True) until it is reported in ``finished_sending``.  A preempted request's
  blocks are freed at once, so vLLM's ``handle_preemptions`` waits for its saves (:meth:`Lane.wait`).

One lane per direction, each with its own node client, so a load never queues behind a step's saves.  On
CUDA each lane copies on its own stream; a save first waits for an event recorded on the compute stream
after the step's forward was launched (the forward writes the KV it reads), so copies overlap compute.  On
CPU the lane's thread copies (torch releases the GIL while copying).  The CUDA path has not run on a GPU in
CI: no GPU is available there.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvmesh.cache.client import NodeClient

log = logging.getLogger("vllm.kvmesh_connector")


@dataclass(slots=True)
class Done:
    req_id: str
    failed: list[int]  # block ids not loaded (loads only): vLLM recomputes them
    blocks: int        # blocks moved


Job = Callable[["Lane"], tuple[int, list[int]]]  # -> (blocks moved, block ids that failed)


class NodeClients:
    """The engine's own node client and, opened lazily, one per trusted node a P/D hint names (hints come
    with the request, so only sockets listed in ``kv_connector_extra_config.nodes`` are ever opened)."""

    def __init__(self, socket: str, trusted: set[str]) -> None:
        self.client = NodeClient(socket)
        self.trusted = trusted
        self._others: dict[str, NodeClient] = {}

    def for_node(self, node: str | None) -> NodeClient:
        if node is None or node not in self.trusted:
            return self.client
        c = self._others.get(node)
        if c is None:
            c = self._others[node] = NodeClient(node)
        return c

    def close(self) -> None:
        self.client.close()
        for c in self._others.values():
            c.close()


class Lane:
    """One thread, its own node clients, jobs run in submission order."""

    def __init__(self, name: str, socket: str, trusted: set[str], device: torch.device) -> None:
        self.name = name
        self.clients = NodeClients(socket, trusted)
        self._jobs: queue.SimpleQueue[tuple[str, Job, list[int], object] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self.pending: collections.Counter[str] = collections.Counter()  # jobs not collected yet, by request
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, req_id: str, job: Job, on_error: list[int], ready: object = None) -> None:
        """Queue ``job`` for ``req_id`` (engine thread).  ``on_error``: the block ids reported as failed if it
        raises; ``ready``: a CUDA event the lane's stream waits for first."""
        self.pending[req_id] += 1
        self._jobs.put((req_id, job, on_error, ready))

    def collect(self, block: bool = False) -> list[Done]:
        """Jobs finished since the last call (engine thread); ``block``: wait for at least one."""
        out: list[Done] = []
        while block and not out:
            try:
                out.append(self._done.get(timeout=1.0))
            except queue.Empty:
                if not self._thread.is_alive():  # never hang the engine on a thread that is gone
                    raise RuntimeError(f"kvmesh connector: the {self.name} thread stopped with jobs pending") from None
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        for d in out:
            self.pending[d.req_id] -= 1
            if self.pending[d.req_id] <= 0:
                del self.pending[d.req_id]
        return out

    def wait(self, req_ids: set[str]) -> list[Done]:
        """Block until no job of ``req_ids`` is pending; returns every job collected meanwhile."""
        out: list[Done] = []
        while any(self.pending.get(r) for r in req_ids):
            out += self.collect(block=True)
        return out

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            req_id, job, on_error, ready = item
            try:
                n, failed = self._call(job, ready)
            except Exception:  # a job must always report, or vLLM would hold the request's blocks forever
                log.exception("kvmesh connector: %s job for %s failed", self.name, req_id)
                n, failed = 0, on_error
            self._done.put(Done(req_id, failed, n))

    def _call(self, job: Job, ready: object) -> tuple[int, list[int]]:
        if self._stream is None:
            return job(self)
        with torch.cuda.stream(self._stream):
            if isinstance(ready, torch.cuda.Event):
                self._stream.wait_event(ready)
            try:
                return job(self)
            finally:  # reported done (even failed) only once every copy it queued has landed: vLLM may then
                self._stream.synchronize()  # free or reuse the blocks

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self.clients.close()
