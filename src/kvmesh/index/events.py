"""vLLM's KV-event wire format, decoded with msgspec.

A publisher sends 3 ZMQ frames: ``topic``, an 8-byte big-endian sequence number, and a msgpack payload
``[ts, events, dp_rank]``.  Events are tagged structs.  Current vLLM encodes each event as a map with a
``"type"`` tag key; older releases (array_like events) encode it as ``[tag, field, field, ...]``.
:func:`decode_batch` accepts both.  Block hashes are ints (or bytes, for sha256 hashes without
conversion); kvmesh never interprets them beyond using them as opaque ids within one engine.
"""

from __future__ import annotations

from typing import Any

import msgspec

EngineHash = int | bytes
MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE = "GPU", "CPU", "STORAGE"


class BlockStored(msgspec.Struct, tag="BlockStored", kw_only=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag="BlockRemoved", kw_only=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", kw_only=True, gc=False):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


class _LooseBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_fast = msgspec.msgpack.Decoder(EventBatch)
_loose = msgspec.msgpack.Decoder(_LooseBatch)
_encoder = msgspec.msgpack.Encoder()


class EventDecodeError(ValueError):
    """The payload is not a KV event batch in any format we know."""


def _from_array(ev: list[Any]) -> Event:
    tag = ev[0]
    if tag == "BlockStored":
        f = ev[1:] + [None] * 8
        return BlockStored(block_hashes=f[0], parent_block_hash=f[1], token_ids=f[2], block_size=f[3],
                           lora_id=f[4], medium=f[5], lora_name=f[6] if isinstance(f[6], str) else None)
    if tag == "BlockRemoved":
        f = [*ev[1:], None]
        return BlockRemoved(block_hashes=f[0], medium=f[1])
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise EventDecodeError(f"unknown event tag {tag!r}")


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one payload frame; raises :class:`EventDecodeError` for anything else."""
    try:
        return _fast.decode(payload)
    except msgspec.DecodeError:
        pass
    try:
        loose = _loose.decode(payload)
        events = [_from_array(e) if isinstance(e, list) else msgspec.convert(e, Event) for e in loose.events]
    except (msgspec.DecodeError, msgspec.ValidationError, IndexError, TypeError) as e:
        raise EventDecodeError(f"undecodable KV event batch: {e}") from None
    return EventBatch(loose.ts, events, loose.data_parallel_rank)


def encode_batch(batch: EventBatch) -> bytes:
    """Encode as current vLLM does (map-encoded events); used by kvmesh's own publishers."""
    return _encoder.encode(batch)
