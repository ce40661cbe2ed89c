"""Feeds the :class:`KvIndex` from each engine's ZMQ KV-event publisher.

One asyncio task per engine with a SUB socket connected to the engine's ``ipc://`` (or tcp) endpoint.
Ordering and loss: every batch carries a sequence number.  A jump forward means we missed batches: if the
engine has a replay endpoint we ask it for the missing ones (ROUTER/DEALER, as vLLM implements it), else
we drop that engine's entries, since a missed removal would leave stale ones.  A jump backwards means the
engine restarted: its cache is empty, so its entries are dropped too.  Metrics count both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmesh.index.events import AllBlocksCleared, EventBatch, EventDecodeError, decode_batch
from kvmesh.index.index import TIERS, KvIndex

log = logging.getLogger(__name__)
_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class IndexMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter("kvmesh_index_event_batches", "KV event batches applied", ["engine"],
                               registry=registry)
        self.blocks = Counter("kvmesh_index_event_blocks", "Blocks stored/removed by events", ["engine"],
                              registry=registry)
        self.gaps = Counter("kvmesh_index_gaps", "Sequence gaps and restarts by how they were handled",
                            ["engine", "action"], registry=registry)
        self.errors = Counter("kvmesh_index_decode_errors", "Undecodable event frames", ["engine"],
                              registry=registry)
        self.lag = Histogram("kvmesh_index_event_lag_seconds", "Event timestamp to applied",
                             buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=registry)


class EventSubscriber:
    """Subscribes to one engine.  ``run()`` loops until cancelled; never raises for bad frames."""

    def __init__(self, index: KvIndex, engine: str, endpoint: str, metrics: IndexMetrics,
                 replay_endpoint: str | None = None, ctx: zmq.asyncio.Context | None = None) -> None:
        self.index = index
        self.engine = engine
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.metrics = metrics
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.connected = asyncio.Event()
        self._replayed_upto = -1

    async def run(self) -> None:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        if self.replay_endpoint is not None:
            # Catch up on what the engine published before we subscribed (its replay buffer).
            await self._replay(0, None)
        self.connected.set()
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    self.metrics.errors.labels(self.engine).inc()
                    continue
                await self._handle(int.from_bytes(frames[1], "big"), frames[2])
        finally:
            sock.close(0)

    # ---- what a subscriber feeds (an engine's own cache; see NodeSubscriber for a cache node's tiers) ----
    @property
    def last_seq(self) -> int:
        return self.index.engine(self.engine).last_seq

    @last_seq.setter
    def last_seq(self, seq: int) -> None:
        self.index.engine(self.engine).last_seq = seq

    def _drop(self) -> int:
        # Everything the engine reported of its own (GPU, and CPU/disk of an in-process offload): it is gone
        # with the process.  What its cache node holds is under the node's name (NodeSubscriber): untouched.
        return self.index.clear_engine(self.engine)

    def _apply_batch(self, batch: EventBatch) -> int:
        return self.index.apply(self.engine, batch)

    async def _handle(self, seq: int, payload: bytes) -> None:
        last = self.last_seq
        if self._replayed_upto >= 0:
            if seq <= self._replayed_upto and seq <= last:
                return  # already applied from the replay buffer
            self._replayed_upto = -1  # caught up with the live stream
        if last >= 0 and seq <= last:
            # The publisher's counter went back: the engine restarted with an empty cache.
            n = self._drop()
            log.info("%s restarted (seq %d after %d); dropped %d blocks", self.engine, seq, last, n)
            self.metrics.gaps.labels(self.engine, "restart").inc()
        elif seq > last + 1 and _starts_fresh(payload):
            self.metrics.gaps.labels(self.engine, "fresh_start").inc()  # it clears: nothing missed matters
        elif seq > last + 1 and not await self._replay(last + 1, seq):
            n = self._drop()
            log.warning("%s: missed events %d..%d; dropped %d blocks", self.engine, last + 1, seq - 1, n)
            self.metrics.gaps.labels(self.engine, "dropped").inc()
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except EventDecodeError as err:
            self.metrics.errors.labels(self.engine).inc()
            log.warning("%s: %s", self.engine, err)
            return
        try:
            n = self._apply_batch(batch)
        except Exception:  # one bad batch must not end this engine's feed (and switch its routing off)
            self.metrics.errors.labels(self.engine).inc()
            log.exception("%s: KV event batch %d not applied; dropping what the index held", self.engine, seq)
            n = self._drop()
        self.last_seq = seq
        self.metrics.batches.labels(self.engine).inc()
        self.metrics.blocks.labels(self.engine).inc(n)
        self.metrics.lag.observe(max(0.0, time.time() - batch.ts))

    async def _replay(self, start: int, upto: int | None) -> bool:
        """Fetch batches [start, upto) (or everything buffered from ``start`` when ``upto`` is None) from
        the replay endpoint; False if unavailable or incomplete.  A hole — batches the publisher no longer
        buffers — makes a gap repair incomplete (a missed removal would leave stale entries), unless the
        batch after it starts with ``AllBlocksCleared`` (a fresh start: nothing before it matters)."""
        if self.replay_endpoint is None:
            return False
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.replay_endpoint)
        got, complete = start, True
        try:
            await sock.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), 2.0)
                if len(frames) < 4 or frames[2] == _END_SEQ:
                    break
                seq = int.from_bytes(frames[2], "big")
                if seq < got or (upto is not None and seq >= upto):
                    continue
                if seq > got and upto is not None and not _starts_fresh(frames[3]):
                    complete = False
                    break
                self._apply(seq, frames[3])
                got = seq + 1
                self._replayed_upto = seq
        except TimeoutError:
            pass
        finally:
            sock.close(0)
        if upto is None:
            return True
        ok = complete and got >= upto
        self.metrics.gaps.labels(self.engine, "replayed" if ok else "replay_failed").inc()
        return ok


def _starts_fresh(payload: bytes) -> bool:
    try:
        events = decode_batch(payload).events
    except EventDecodeError:
        return False
    return bool(events) and isinstance(events[0], AllBlocksCleared)


class NodeSubscriber(EventSubscriber):
    """Subscribes to a cache node's tier events (``medium`` CPU/STORAGE) and applies them once, under the node's
    own name; every engine the node serves reads them (:meth:`KvIndex.serve`): a block in the node's DRAM is
    loadable by each of them.  (Credited to each engine instead, a node of N blocks serving E engines cost N×E
    entries, and an engine added later — autoscaled, discovered — got none.)  A node restart or lost events
    clear the node's entries only; the engines' own (GPU) entries are untouched.

    A node starts its sequence numbers at its start time (µs), so a restarted node always continues *above*
    the old one, with ``AllBlocksCleared`` then its SSD inventory first: the forward jump is replayed from
    the node's buffer, the clear drops the old tiers and the inventory re-adds what survived on disk."""

    def __init__(self, index: KvIndex, node: str, endpoint: str, engines: list[str], metrics: IndexMetrics,
                 replay_endpoint: str | None = None, ctx: zmq.asyncio.Context | None = None,
                 serves_new: bool = False) -> None:
        super().__init__(index, node, endpoint, metrics, replay_endpoint, ctx)
        self.serves_new = serves_new  # engines added later read this node too (it serves every backend)
        self._seq = -1
        self.serve(engines)

    def serve(self, engines: list[str]) -> None:
        self.index.serve(self.engine, engines)

    @property
    def last_seq(self) -> int:
        return self._seq

    @last_seq.setter
    def last_seq(self, seq: int) -> None:
        self._seq = seq

    def _drop(self) -> int:
        return self.index.clear_engine(self.engine)

    def _apply_batch(self, batch: EventBatch) -> int:
        evs = batch.events
        cleared = [i for i, ev in enumerate(evs) if isinstance(ev, AllBlocksCleared)]
        n = 0
        if cleared:  # the node restarted: its tiers are gone (never the engines' own GPU entries)
            n = self._drop()
            batch = EventBatch(batch.ts, evs[cleared[-1] + 1:], batch.data_parallel_rank)
        return n + self.index.apply(self.engine, batch)


class IndexCollector(Collector):
    """Index size per engine and tier (per-engine counters kept as events apply)."""

    def __init__(self, index: KvIndex) -> None:
        self.index = index

    def collect(self) -> Iterator[Metric]:
        blocks = GaugeMetricFamily("kvmesh_index_blocks", "Blocks the index holds per engine and tier",
                                   labels=["engine", "medium"])
        for name, e in self.index.engines.items():  # counted as events apply: a scrape walks no entries
            for t, medium in enumerate(TIERS):
                blocks.add_metric([name, medium], e.counts[t])
        yield blocks
        yield GaugeMetricFamily("kvmesh_index_keys", "Distinct block keys in the index (all tiers)",
                                value=self.index.size())
        yield GaugeMetricFamily("kvmesh_index_pending_blocks", "Speculative (routed, not yet reported) entries",
                                value=self.index.pending_size())


class IndexFeed:
    """All subscribers of one index; start/stop them together, add engines as they appear."""

    def __init__(self, index: KvIndex, registry: CollectorRegistry) -> None:
        self.index = index
        self.metrics = IndexMetrics(registry)
        registry.register(IndexCollector(index))
        self.subs: dict[str, EventSubscriber] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, engine: str, endpoint: str, replay_endpoint: str | None = None) -> EventSubscriber:
        sub = EventSubscriber(self.index, engine, endpoint, self.metrics, replay_endpoint)
        self.subs[engine] = sub
        self._tasks[engine] = asyncio.create_task(sub.run(), name=f"kv-events-{engine}")
        return sub

    def add_node(self, node: str, endpoint: str, engines: list[str], replay_endpoint: str | None = None,
                 serves_new: bool = False) -> NodeSubscriber:
        sub = NodeSubscriber(self.index, node, endpoint, engines, self.metrics, replay_endpoint,
                             serves_new=serves_new)
        self.subs[node] = sub
        self._tasks[node] = asyncio.create_task(sub.run(), name=f"kv-events-{node}")
        return sub

    def remove(self, name: str) -> None:
        """Stop following ``name`` (an engine that is gone); its socket closes as the cancelled task unwinds."""
        self.subs.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
