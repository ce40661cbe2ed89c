"""A cache node's tier changes as vLLM-format KV events, with a replay buffer.

PUB socket: topic ``b""``, 8-byte big-endian sequence number, msgpack ``EventBatch`` — what vLLM's engines
publish, so the gateway's subscriber code is shared.  ``medium`` is CPU for DRAM and STORAGE for SSD.

Replay (ROUTER, vLLM's protocol): a subscriber sends ``(b"", start_seq)`` and gets every buffered batch with
``seq >= start_seq`` as ``(b"", topic, seq, payload)``, then ``(b"", b"", END_SEQ, b"")``.  PUB drops what
is published before a subscriber connects, so this is how a gateway that (re)connects learns what the node
already holds — above all the SSD inventory announced when a restarted node re-indexes its disk.
Runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence

import zmq
import zmq.asyncio

from kvmesh.cache.chunk import ObjectMeta
from kvmesh.cache.keys import event_hash
from kvmesh.cache.store import DRAM
from kvmesh.index.events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    encode_batch,
)

log = logging.getLogger(__name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)
ANNOUNCE_BATCH = 512  # blocks per batch when announcing an inventory


def parent_first(metas: Iterable[ObjectMeta]) -> list[ObjectMeta]:
    """The chunks whose whole chain back to a first block is present, each after its parent — the order an
    index needs to key them (a chunk whose parent is gone can never be part of a matched prefix)."""
    by_key = {m.key: m for m in metas}
    depth: dict[bytes, int | None] = {}  # None: the chain is broken below this chunk
    for key in by_key:
        chain: list[bytes] = []
        k: bytes | None = key
        while k is not None and k not in depth and k in by_key:
            chain.append(k)
            k = by_key[k].parent
        base: int | None = -1 if k is None else depth.get(k)  # a parent not held: broken
        for c in reversed(chain):
            base = None if base is None else base + 1
            depth[c] = base
    held = sorted((d, k) for k, d in depth.items() if d is not None)
    return [by_key[k] for _, k in held]


class EventPublisher:
    """Batches tier changes per loop tick into one event batch; keeps the last ``buffer`` batches for replay."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, buffer: int = 10_000,
                 heartbeat_s: float = 1.0) -> None:
        ctx = zmq.asyncio.Context.instance()
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.replay: zmq.asyncio.Socket | None = None
        if replay_endpoint is not None:
            self.replay = ctx.socket(zmq.ROUTER)
            self.replay.setsockopt(zmq.LINGER, 0)
            self.replay.bind(replay_endpoint)
        # above anything an earlier run of this node published, so subscribers see a restart as a forward
        # gap and replay it (see kvmesh.index.subscriber.NodeSubscriber)
        self.seq = time.time_ns() // 1000
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer)
        self._pending: list[BlockStored | BlockRemoved] = []
        self._scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self.heartbeat_s = heartbeat_s
        self._last_sent = 0.0

    def start(self) -> None:
        """Serve replays and publish ``AllBlocksCleared``: whatever an earlier run of this node held is gone."""
        loop = asyncio.get_running_loop()
        if self.replay is not None:
            self._tasks.append(loop.create_task(self._serve_replay()))
        self._tasks.append(loop.create_task(self._heartbeat()))
        self._send([AllBlocksCleared()])

    async def _heartbeat(self) -> None:
        # An idle node publishes nothing, and PUB drops what was sent before a subscriber (re)connected: an
        # empty batch now and then shows a subscriber the sequence gap it must replay (e.g. the inventory).
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if time.monotonic() - self._last_sent >= self.heartbeat_s:
                self._send([])

    def stored(self, tier: str, meta: ObjectMeta) -> None:
        self._add(_stored(tier, meta))

    def removed(self, tier: str, key: bytes) -> None:
        self._add(BlockRemoved(block_hashes=[event_hash(key)],
                               medium=MEDIUM_CPU if tier == DRAM else MEDIUM_STORAGE))

    def announce(self, tier: str, metas: list[ObjectMeta]) -> None:
        """Publish what a tier already holds (parents first), in batches of :data:`ANNOUNCE_BATCH`."""
        for i in range(0, len(metas), ANNOUNCE_BATCH):
            self._send([_stored(tier, m) for m in metas[i:i + ANNOUNCE_BATCH]])

    def _add(self, ev: BlockStored | BlockRemoved) -> None:
        self._pending.append(ev)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            self._send(batch)

    def _send(self, events: Sequence[BlockStored | BlockRemoved | AllBlocksCleared]) -> None:
        payload = encode_batch(EventBatch(time.time(), list(events), None))
        seq = self.seq.to_bytes(8, "big")
        self.buffer.append((self.seq, payload))
        self.sock.send_multipart([b"", seq, payload], zmq.NOBLOCK)
        self.seq += 1
        self._last_sent = time.monotonic()

    async def _serve_replay(self) -> None:
        assert self.replay is not None  # start() only runs this with a replay socket
        while True:
            frames = await self.replay.recv_multipart()
            if len(frames) != 3:
                log.warning("cache node events: bad replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= first:
                    await self.replay.send_multipart([client, b"", b"", seq.to_bytes(8, "big"), payload])
            await self.replay.send_multipart([client, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.sock.close(0)
        if self.replay is not None:
            self.replay.close(0)


def _stored(tier: str, meta: ObjectMeta) -> BlockStored:
    return BlockStored(block_hashes=[event_hash(meta.key)],
                       parent_block_hash=event_hash(meta.parent) if meta.parent else None,
                       token_ids=meta.token_ids, block_size=meta.block_size,
                       medium=MEDIUM_CPU if tier == DRAM else MEDIUM_STORAGE,
                       extra_keys=[[meta.salt]] if meta.salt and not meta.parent else None)
