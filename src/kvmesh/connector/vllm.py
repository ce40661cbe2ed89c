"""``KvmeshConnector``: vLLM's KV connector (v1 API) for the kvmesh cache node.  Works on CPU and CUDA.

Load it with::

    --kv-transfer-config '{"kv_connector": "KvmeshConnector",
                           "kv_connector_module_path": "kvmesh.connector.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"socket": "/path/to/node.sock"}}'

Scheduler side (engine-core process): :meth:`get_num_new_matched_tokens` asks the node how many whole blocks
after the engine's own prefix hit it holds (one Unix-socket round trip; no side effects).  It records the
load plan and, every step, which prompt blocks become fully computed, and sends both to the worker in the
step's metadata.  Worker side: loads run synchronously before the forward pass (lease → checksum → copy into
the paged KV tensors → release); a missing or corrupt chunk is reported through
:meth:`get_block_ids_with_load_errors`, so vLLM recomputes.  Saves run after the forward pass: reserve arena
space, copy, checksum, commit; the node does the rest (SSD write-behind, events) off the engine's path.
Node trouble never fails a request: the client reads it as a miss.

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

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
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


@dataclass(slots=True)
class SaveSpec:
    block_ids: list[int]
    keys: list[bytes]
    parents: list[bytes | None]
    tokens: list[list[int]]
    salt: str | None = None
    sync: bool = False  # P/D prefill: committed before the answer leaves (the decode engine looks next)


@dataclass
class KvmeshMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


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


def _namespace(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> Namespace:
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    layers = sum(len(g.layer_names) for g in kv_cache_config.kv_cache_groups)
    shape = f"{layers}L:{getattr(spec, 'num_kv_heads', '?')}h:{getattr(spec, 'head_size', '?')}d"
    pc = vllm_config.parallel_config
    dtype = str(getattr(spec, "dtype", "?")).removeprefix("torch.")
    return Namespace(model=str(vllm_config.model_config.model), dtype=dtype,
                     layout=shape, block_size=spec.block_size, tp_rank=pc.rank, tp_size=pc.tensor_parallel_size)


class KvmeshConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        check_vllm_version()
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        sock = extra.get("socket") or os.environ.get("KVMESH_CACHE_SOCKET")
        if not sock:
            raise ValueError("KvmeshConnector needs kv_connector_extra_config.socket (the cache node's socket)")
        self.client = NodeClient(sock)
        # P/D: other nodes whose hints this engine follows (a hint names a socket; only trusted ones are
        # opened, since kv_transfer_params come with the request), and the address put in remote_host/port.
        self._trusted = {str(n) for n in extra.get("nodes", ())} - {str(sock)}
        self._others: dict[str, NodeClient] = {}
        host, _, port = str(extra.get("advertise", "")).rpartition(":")
        self._advertise = (host or None, int(port) if port.isdigit() else None)
        self.engine_id = self._kv_transfer_config.engine_id
        assert kv_cache_config is not None
        self.ns = _namespace(vllm_config, kv_cache_config)
        self.block_size = self.ns.block_size
        self.num_blocks = kv_cache_config.num_blocks
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        # worker side
        self.layout: KvLayout | None = None
        self._failed: set[int] = set()
        self.stats = {"loaded_blocks": 0, "saved_blocks": 0, "load_failures": 0, "hinted_loads": 0}

    def _client(self, node: str | None) -> NodeClient:
        """The engine's own node, or a trusted node a P/D hint named (one client each, opened lazily)."""
        if node is None or node not in self._trusted:
            return self.client
        c = self._others.get(node)
        if c is None:
            c = self._others[node] = NodeClient(node)
        return c

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
        if usable <= first:
            return 0, False
        held = self.client.lookup(st.keys[first:usable])
        st.load_from, st.load_n, st.load_node = first, held, None
        node = st.hint.get("node")
        if isinstance(node, str) and first + held < min(usable, _int(st.hint.get("chunks"))):
            other = self._client(node)
            if other is not self.client:  # own node lacks what the prefill saved: read the hinted node
                n = other.lookup(st.keys[first:usable])
                if n > held:
                    st.load_n, st.load_node, held = n, node, n
        return held * self.block_size, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens == 0:
            st.load_n = 0

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvmeshMetadata()
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
            self._plan_save(meta, st, new.num_computed_tokens + sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            nb = cached.new_block_ids[i]
            if nb is not None:
                st.block_ids = list(nb[0]) if rid in cached.resumed_req_ids else st.block_ids + list(nb[0])
            self._plan_save(meta, st, cached.num_computed_tokens[i] + sched.get(rid, 0))
        return meta

    def _plan_save(self, meta: KvmeshMetadata, st: _ReqState, computed: int) -> None:
        """Prompt blocks that this step completes (decode blocks are not offered)."""
        upto = min(min(computed, len(st.tokens)) // self.block_size, len(st.keys), len(st.block_ids))
        if upto <= st.saved:
            return
        bs = self.block_size
        rng = range(st.saved, upto)
        meta.saves.append(SaveSpec(
            [st.block_ids[i] for i in rng], [st.keys[i] for i in rng],
            [st.keys[i - 1] if i else None for i in rng], [st.tokens[i * bs:(i + 1) * bs] for i in rng], st.salt,
            st.remote_decode))
        st.saved = upto

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are always freed at once (saves are synchronous).  A P/D prefill leg that ran to its end
        answers with the params its decode leg needs; an aborted one answers nothing (the gateway's decode
        engine then prefills itself)."""
        st = self._reqs.pop(request.request_id, None)
        if st is None or not st.remote_decode or not _finished_normally(request):
            return False, None
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
        log.info("kvmesh connector: %d KV tensors, block dim %d, %s, %d bytes per chunk, node %s",
                 len(self.layout.tensors), self.layout.block_dim, self.layout.describe(), self.layout.chunk_bytes,
                 self.client.socket_path)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmeshMetadata) or self.layout is None:
            return
        for spec in meta.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        assert self.layout is not None
        # Knowing the chunk size lets the client read chunks only pool peers hold straight from them.
        client = self._client(spec.node)
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
        if client is not self.client:
            self.stats["hinted_loads"] += good
        if good < len(spec.block_ids):
            # Missing (evicted, node down) or corrupt: vLLM recomputes these blocks.
            self._failed.update(spec.block_ids[good:])
            self.stats["load_failures"] += len(spec.block_ids) - good
            log.info("kvmesh connector: %d of %d blocks not loadable (%d corrupt); recomputing",
                     len(spec.block_ids) - good, len(spec.block_ids), len(corrupt))
        self.stats["loaded_blocks"] += good

    def _copy_in(self, block_ids: list[int], leases: list[Any]) -> None:
        # The tensors over the arena must be gone before the leases' views are released.
        assert self.layout is not None
        self.layout.load(block_ids, [torch.frombuffer(le.view, dtype=torch.uint8) for le in leases])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved once per step in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmeshMetadata) or self.layout is None or not meta.saves:
            return
        for spec in meta.saves:
            self._save(spec)

    def _save(self, spec: SaveSpec) -> None:
        assert self.layout is not None
        n = self.layout.chunk_bytes
        views = self.client.reserve([(k, n) for k in spec.keys], tenant_of(spec.salt))
        todo = [i for i, v in enumerate(views) if v is not None]
        if not todo:
            return
        dests = [torch.frombuffer(views[i], dtype=torch.uint8) for i in todo]  # type: ignore[arg-type]
        self.layout.save([spec.block_ids[i] for i in todo], dests)
        items = [CommitItem(spec.keys[i], checksum(views[i]), spec.parents[i], spec.tokens[i],  # type: ignore[arg-type]
                            self.block_size, spec.salt) for i in todo]
        del dests
        for i in todo:
            views[i].release()  # type: ignore[union-attr]
        # Nothing to wait for (saves a round trip per step) unless a decode engine will look for these chunks
        # as soon as the answer is out: another connection's lookup is not ordered after this commit.
        self.client.commit(items, wait=spec.sync)
        self.stats["saved_blocks"] += len(items)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def shutdown(self) -> None:
        self.client.close()
        for c in self._others.values():
            c.close()


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _finished_normally(request: Request) -> bool:
    """Stopped or length-capped (a P/D prefill leg's normal end), not aborted or errored."""
    from vllm.v1.request import RequestStatus  # scheduler side only: the worker never calls this

    return request.status in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
