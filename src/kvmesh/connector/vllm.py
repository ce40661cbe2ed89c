"""``KvmeshConnector``: vLLM's KV connector (v1 API) for the kvmesh cache node.  Works on CPU and CUDA.

Load it with::

    --kv-transfer-config '{"kv_connector": "KvmeshConnector",
                           "kv_connector_module_path": "kvmesh.connector.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"socket": "/path/to/node.sock"}}'

Scheduler side (engine-core process): :meth:`get_num_new_matched_tokens` asks the node how many whole blocks
after the engine's own prefix hit it holds (one Unix-socket round trip; no side effects).  It records the
load plan and, every step, which prompt blocks become fully computed, and sends both to the worker in the
step's metadata.  Worker side, by default (``async_transfers``, :mod:`kvmesh.connector.transfer`) neither
direction stalls the engine's step:

* a load is asynchronous in vLLM's sense: the request waits in ``WAITING_FOR_REMOTE_KVS`` while a load thread
  leases its chunks, verifies their checksums, copies them into the blocks vLLM allocated and releases
  them; the engine meanwhile runs its other requests, and schedules this one once the load is reported
  done (a missing or corrupt chunk is reported through :meth:`get_block_ids_with_load_errors` with it, so
  vLLM recomputes those blocks);
* a save is handed to a save thread after the step (reserve arena space, copy, checksum, commit); the
  request's blocks are held until its saves are done (``request_finished`` answers True; the worker
  reports it in ``finished_sending``), and a preempted request's saves finish before its blocks can be
  reused (``handle_preemptions``).

With ``"async_transfers": false`` loads run before the forward pass and saves before the step returns (the
behaviour before; the figures in docs/benchmarks.md say which ran).  The node does the rest (SSD
write-behind, events) off the engine's path either way.  Node trouble never fails a request: the client
reads it as a miss.

Prefill/decode disaggregation speaks vLLM's ``kv_transfer_params`` handshake (the one ``NixlConnector`` and
every P/D router use), carried over the cache node instead of an engine-to-engine transfer:

* **Prefill side** — a request with ``do_remote_decode``: every full prompt block is saved as usual, but
  committed *synchronously* (one round trip), so the chunks are on the node before the one-token answer
  leaves the engine.  :meth:`request_finished` returns ``{"do_remote_prefill": true, "do_remote_decode":
  false, "remote_engine_id", "remote_block_ids", "remote_host", "remote_port", "kvmesh": {"node",
  "node_id", "chunks", "block_size"}}``; vLLM puts them in the response's ``kv_transfer_params``.
  Blocks are freed at once: the node holds the copy, nothing waits on the decode engine.
* **Decode side** — a request with ``do_remote_prefill`` loads like any prefix hit: keys are
  content-addressed (chained prompt hashes), so the decode engine finds the blocks by prompt alone; the
  params' engine ids and block ids are not needed.  The ``kvmesh`` hint names the node that holds them: when
  the engine's own node (and its pool) holds fewer chunks than the hint says and the hinted node's socket is
  one the engine trusts (``kv_connector_extra_config.nodes``), the engine reads from that node directly.
  Missing or corrupt chunks are recomputed (:meth:`get_block_ids_with_load_errors`), never served.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvmesh.cache.chunk import checksum
from kvmesh.cache.client import NodeClient
from kvmesh.cache.keys import ChunkKey, Namespace, chunk_keys, tenant_of
from kvmesh.cache.protocol import CommitItem
from kvmesh.connector.layout import KvLayout
from kvmesh.connector.transfer import Done, Lane, NodeClients

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvmesh_connector")  # a child of vLLM's logger: its handlers and format
SUPPORTED_VLLM = ("0.32.",)  # the connector API is experimental upstream: pin what CI tests


def check_vllm_version(version: str = vllm.__version__) -> None:
    if os.environ.get("KVMESH_ALLOW_ANY_VLLM") != "1" and not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"kvmesh's KV connector supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
                           f"this is vLLM {version} (set KVMESH_ALLOW_ANY_VLLM=1 to try anyway)")


@dataclass(slots=True)
class LoadSpec:
    block_ids: list[int]
    keys: list[bytes]
    salt: str | None = None  # the tenant's: charges local copies of pool chunks to its quota
    node: str | None = None  # another node's socket (a P/D hint); None: the engine's own node
    req_id: str | None = None  # set: an async load, reported in finished_recving


@dataclass(slots=True)
class SaveSpec:
    block_ids: list[int]
    keys: list[bytes]
    parents: list[bytes | None]
    tokens: list[list[int]]
    salt: str | None = None
    sync: bool = False  # P/D prefill: committed before the answer leaves (the decode engine looks next)
    req_id: str = ""


@dataclass
class KvmeshMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # their blocks were freed: their saves must finish now


@dataclass(slots=True)
class _ReqState:
    tokens: list[int]
    keys: list[ChunkKey]
    salt: str | None = None
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0            # prompt blocks already offered to the node
    load_from: int = 0        # first block to load (after the engine's own hit)
    load_n: int = 0           # blocks to load (0: none)
    load_node: str | None = None  # load from this hinted node instead of the engine's own
    remote_decode: bool = False   # P/D prefill leg: save synchronously, answer with transfer params
    hint: dict[str, Any] = field(default_factory=dict)  # P/D decode leg: the prefill's "kvmesh" hint
    loading: bool = False     # an async load is in flight: its blocks must outlive an abort
    load_blocks: list[int] = field(default_factory=list)  # the blocks that load writes
    load_failed: bool = False  # a load of this request failed: it is not tried again (no endless retries)
    async_saves: bool = False  # saves were handed to the save thread: blocks held until they are done


def _namespace(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> Namespace:
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    layers = sum(len(g.layer_names) for g in kv_cache_config.kv_cache_groups)
    shape = f"{layers}L:{getattr(spec, 'num_kv_heads', '?')}h:{getattr(spec, 'head_size', '?')}d"
    pc = vllm_config.parallel_config
    dtype = str(getattr(spec, "dtype", "?")).removeprefix("torch.")
    return Namespace(model=str(vllm_config.model_config.model), dtype=dtype,
                     layout=shape, block_size=spec.block_size, tp_rank=pc.rank, tp_size=pc.tensor_parallel_size)


def _before_failed(spec: SaveSpec, failed: set[int]) -> SaveSpec:
    """``spec`` cut at its first block whose load failed this step (synchronous loads: the same step plans
    the save).  That block holds no valid KV and every later one attended to it; saved, they would be served
    to every engine under the prompt's keys.  vLLM recomputes them; they are not offered again."""
    if not failed:
        return spec
    cut = next((i for i, b in enumerate(spec.block_ids) if b in failed), None)
    if cut is None:
        return spec
    return SaveSpec(spec.block_ids[:cut], spec.keys[:cut], spec.parents[:cut], spec.tokens[:cut], spec.salt,
                    spec.sync, spec.req_id)


class KvmeshConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        check_vllm_version()
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        assert kv_cache_config is not None
        self._setup(extra, _namespace(vllm_config, kv_cache_config), kv_cache_config.num_blocks,
                    self._kv_transfer_config.engine_id)

    def _setup(self, extra: dict[str, Any], ns: Namespace, num_blocks: int, engine_id: str | None) -> None:
        """The connector's own state, from its extra config (apart from vLLM's base class: the protocol
        tests build a connector this way, against a real cache node, without an engine)."""
        sock = extra.get("socket") or os.environ.get("KVMESH_CACHE_SOCKET")
        if not sock:
            raise ValueError("KvmeshConnector needs kv_connector_extra_config.socket (the cache node's socket)")
        # P/D: other nodes whose hints this engine follows, and the address put in remote_host/port.
        self._trusted = {str(n) for n in extra.get("nodes", ())} - {str(sock)}
        self.clients = NodeClients(sock, self._trusted)
        self.client = self.clients.client
        host, _, port = str(extra.get("advertise", "")).rpartition(":")
        self._advertise = (host or None, int(port) if port.isdigit() else None)
        self.engine_id = engine_id
        self._async = bool(extra.get("async_transfers", True))
        self.ns = ns
        self.block_size = ns.block_size
        self.num_blocks = num_blocks
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._to_load: list[LoadSpec] = []  # async loads planned since the last step's metadata
        # worker side
        self.layout: KvLayout | None = None
        self._failed: set[int] = set()
        self._lanes: tuple[Lane, Lane] | None = None  # (loads, saves), started with the KV caches
        self._saved_reqs: set[str] = set()  # requests with saves handed to the save lane
        self._finishing: set[str] = set()   # of those, finished: reported once their saves are done
        self._load_nodes: dict[str, str | None] = {}  # async loads in flight: the node each reads
        self.stats = {"loaded_blocks": 0, "saved_blocks": 0, "load_failures": 0, "hinted_loads": 0}

    # ================= scheduler side ==================================================================
    def _state(self, request: Request) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            toks = list(request.prompt_token_ids or [])
            salt = getattr(request, "cache_salt", None)
            keys = chunk_keys(self.ns.seed(salt), toks, self.block_size)
            st = self._reqs[request.request_id] = _ReqState(toks, keys, salt)
            params = getattr(request, "kv_transfer_params", None) or {}
            st.remote_decode = bool(params.get("do_remote_decode"))
            hint = params.get("kvmesh") if params.get("do_remote_prefill") else None
            st.hint = hint if isinstance(hint, dict) else {}
        return st

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        first = num_computed_tokens // self.block_size
        # At least one prompt token must be computed by the engine (it needs logits): never load the last one.
        usable = (len(st.tokens) - 1) // self.block_size
        if usable <= first or st.load_failed:
            return 0, False
        held = self.client.lookup(st.keys[first:usable])
        st.load_from, st.load_n, st.load_node = first, held, None
        node = st.hint.get("node")
        if isinstance(node, str) and first + held < min(usable, _int(st.hint.get("chunks"))):
            other = self.clients.for_node(node)
            if other is not self.client:  # own node lacks what the prefill saved: read the hinted node
                n = other.lookup(st.keys[first:usable])
                if n > held:
                    st.load_n, st.load_node, held = n, node, n
        return held * self.block_size, self._async and held > 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens == 0:
            st.load_n = 0
        elif self._async and st.load_n:
            # The request now waits for this load; vLLM allocated its blocks, the engine's own hit first.
            ids = blocks.get_block_ids()[0]
            sl = slice(st.load_from, st.load_from + st.load_n)
            st.load_blocks = list(ids[sl])
            self._to_load.append(LoadSpec(st.load_blocks, list(st.keys[sl]), st.salt, st.load_node,
                                          request.request_id))
            st.load_n, st.loading = 0, True

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        invalid = connector_output.invalid_block_ids
        for rid in connector_output.finished_recving or ():
            st = self._reqs.get(rid)
            if st is not None:
                st.loading = False
                # vLLM recomputes what failed; a request sent back to waiting with nothing computed would
                # otherwise look the node up again and plan the same failing load, step after step.
                st.load_failed |= bool(invalid) and not invalid.isdisjoint(st.load_blocks)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvmeshMetadata(loads=self._to_load, preempted=list(scheduler_output.preempted_req_ids or ()))
        self._to_load = []
        for rid in meta.preempted:  # the worker finishes their saves this step (handle_preemptions): a request
            st = self._reqs.get(rid)  # resumed with a load and then aborted must be released once, by that load
            if st is not None:
                st.async_saves = False
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            if st.load_n:
                sl = slice(st.load_from, st.load_from + st.load_n)
                meta.loads.append(LoadSpec(st.block_ids[sl], list(st.keys[sl]), st.salt, st.load_node))
                st.load_n = 0
            self._plan_save(meta, new.req_id, st, new.num_computed_tokens + sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            nb = cached.new_block_ids[i]
            if nb is not None:
                st.block_ids = list(nb[0]) if rid in cached.resumed_req_ids else st.block_ids + list(nb[0])
            self._plan_save(meta, rid, st, cached.num_computed_tokens[i] + sched.get(rid, 0))
        return meta

    def _plan_save(self, meta: KvmeshMetadata, rid: str, st: _ReqState, computed: int) -> None:
        """Prompt blocks that this step completes (decode blocks are not offered)."""
        upto = min(min(computed, len(st.tokens)) // self.block_size, len(st.keys), len(st.block_ids))
        if upto <= st.saved:
            return
        bs = self.block_size
        rng = range(st.saved, upto)
        meta.saves.append(SaveSpec(
            [st.block_ids[i] for i in rng], [st.keys[i] for i in rng],
            [st.keys[i - 1] if i else None for i in rng], [st.tokens[i * bs:(i + 1) * bs] for i in rng], st.salt,
            st.remote_decode, rid))
        st.saved = upto
        st.async_saves |= self._async and not st.remote_decode

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are held (True) while the save thread may still read them or a load may still write them
        (the worker reports the request in ``finished_sending``/``finished_recving``), else freed at once.
        A P/D prefill leg (saved synchronously) that ran to its end answers with the params its decode leg
        needs; an aborted one answers nothing (the gateway's decode engine then prefills itself)."""
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        if not st.remote_decode or not _finished_normally(request):
            return st.async_saves or st.loading, None
        host, port = self._advertise
        return False, {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
            "remote_block_ids": list(block_ids[:st.saved]), "remote_host": host, "remote_port": port,
            "kvmesh": {"node": self.client.socket_path, "node_id": self.client.node_id, "chunks": st.saved,
                       "block_size": self.block_size},
        }

    # ================= worker side =====================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout = KvLayout(kv_caches, self.num_blocks)
        if self._async:
            sock, dev = self.client.socket_path, self.layout.device
            self._lanes = (Lane("kvmesh-load", sock, self._trusted, dev), Lane("kvmesh-save", sock, set(), dev))
        log.info("kvmesh connector: %d KV tensors, block dim %d, %s, %d bytes per chunk, node %s, %s transfers",
                 len(self.layout.tensors), self.layout.block_dim, self.layout.describe(), self.layout.chunk_bytes,
                 self.client.socket_path, "async" if self._async else "synchronous")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmeshMetadata) or self.layout is None:
            return
        for spec in meta.loads:
            if spec.req_id is not None and self._lanes is not None:
                self._lanes[0].submit(spec.req_id, functools.partial(self._load_job, spec), spec.block_ids)
                self._load_nodes[spec.req_id] = spec.node
            else:
                self._loaded(spec.node, *self._load(spec, self.clients.for_node(spec.node)))

    def _load_job(self, spec: LoadSpec, lane: Lane) -> tuple[int, list[int]]:
        return self._load(spec, lane.clients.for_node(spec.node))

    def _load(self, spec: LoadSpec, client: NodeClient) -> tuple[int, list[int]]:
        """Copy ``spec``'s chunks into its blocks: (blocks loaded, block ids to recompute)."""
        assert self.layout is not None
        # Knowing the chunk size lets the client read chunks only pool peers hold straight from them.
        leases = client.get(spec.keys, fetch_size=self.layout.chunk_bytes, tenant=tenant_of(spec.salt))
        good = 0
        corrupt: list[bytes] = []
        for le in leases:
            if len(le.view) != self.layout.chunk_bytes or not le.verify():
                corrupt.append(le.key)
                break
            good += 1
        try:
            if good:
                self._copy_in(spec.block_ids[:good], leases[:good])
        finally:
            client.release(leases, corrupt)
        if good < len(spec.block_ids):  # missing (evicted, node down) or corrupt: vLLM recomputes these
            log.info("kvmesh connector: %d of %d blocks not loadable (%d corrupt); recomputing",
                     len(spec.block_ids) - good, len(spec.block_ids), len(corrupt))
        return good, spec.block_ids[good:]

    def _loaded(self, node: str | None, good: int, failed: list[int]) -> None:
        self._failed.update(failed)
        self.stats["load_failures"] += len(failed)
        self.stats["loaded_blocks"] += good
        if node is not None and node in self._trusted:
            self.stats["hinted_loads"] += good

    def _copy_in(self, block_ids: list[int], leases: list[Any]) -> None:
        # The tensors over the arena must be gone before the leases' views are released.
        assert self.layout is not None
        self.layout.load(block_ids, [torch.frombuffer(le.view, dtype=torch.uint8) for le in leases])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # a load completes before its request is scheduled (async) or in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved once per step in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmeshMetadata) or self.layout is None or not meta.saves:
            return
        ready = None
        for spec in meta.saves:
            spec = _before_failed(spec, self._failed)
            if not spec.block_ids:
                continue
            if spec.sync or self._lanes is None:
                self.stats["saved_blocks"] += self._save(spec, self.client, wait=spec.sync)
                continue
            if ready is None and self.layout.device.type == "cuda":  # after this step's forward, in stream order
                ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ready.record(torch.cuda.current_stream(self.layout.device))
            self._lanes[1].submit(spec.req_id, functools.partial(self._save_job, spec), [], ready)
            self._saved_reqs.add(spec.req_id)

    def _save_job(self, spec: SaveSpec, lane: Lane) -> tuple[int, list[int]]:
        # Committed before the job reports done (the round trip is off the step here): once vLLM frees the
        # request's blocks, any lookup finds its chunks.
        return self._save(spec, lane.clients.client, wait=True), []

    def _save(self, spec: SaveSpec, client: NodeClient, wait: bool) -> int:
        """Copy ``spec``'s blocks the node lacks into its arena and commit them: the number saved."""
        assert self.layout is not None
        n = self.layout.chunk_bytes
        views = client.reserve([(k, n) for k in spec.keys], tenant_of(spec.salt))
        todo = [i for i, v in enumerate(views) if v is not None]
        if not todo:
            return 0
        try:
            dests = [torch.frombuffer(views[i], dtype=torch.uint8) for i in todo]  # type: ignore[arg-type]
            self.layout.save([spec.block_ids[i] for i in todo], dests)
            items = [CommitItem(spec.keys[i], checksum(views[i]), spec.parents[i], spec.tokens[i],  # type: ignore[arg-type]
                                self.block_size, spec.salt) for i in todo]
            del dests
        except Exception:  # give the reserved space back (it would stay reserved until this client reconnects)
            client.commit([], abort=[spec.keys[i] for i in todo])
            raise
        for i in todo:
            views[i].release()  # type: ignore[union-attr]
        # On the engine's step, nothing to wait for (saves a round trip) unless a decode engine will look for
        # these chunks as soon as the answer is out: another connection's lookup is not ordered after a commit.
        client.commit(items, wait=wait)
        return len(items)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """A preempted request's blocks were freed and may be reused by this step: finish its saves first."""
        if self._lanes is not None and isinstance(kv_connector_metadata, KvmeshMetadata) \
                and kv_connector_metadata.preempted:
            preempted = set(kv_connector_metadata.preempted)
            self._count_saves(self._lanes[1].wait(preempted))
            # Their saves are done and their blocks gone: not reported in finished_sending (the scheduler side
            # forgot them too), or a resumed request still loading would be freed while its load writes.
            self._saved_reqs -= preempted
            self._finishing -= preempted

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose held blocks may be freed: saves done; requests whose async load is done)."""
        if self._lanes is None:
            return None, None
        loads, saves = self._lanes
        recving: set[str] = set()
        for d in loads.collect():
            recving.add(d.req_id)
            self._loaded(self._load_nodes.pop(d.req_id, None), d.blocks, d.failed)
        self._count_saves(saves.collect())
        self._finishing |= finished_req_ids & self._saved_reqs
        sending = {r for r in self._finishing if not saves.pending.get(r)}
        self._finishing -= sending
        self._saved_reqs -= sending
        return sending or None, recving or None

    def _count_saves(self, done: list[Done]) -> None:
        self.stats["saved_blocks"] += sum(d.blocks for d in done)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def shutdown(self) -> None:
        for lane in self._lanes or ():
            lane.close()
        self.clients.close()


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _finished_normally(request: Request) -> bool:
    """Stopped or length-capped (a P/D prefill leg's normal end), not aborted or errored."""
    from vllm.v1.request import RequestStatus  # scheduler side only: the worker never calls this

    return request.status in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
