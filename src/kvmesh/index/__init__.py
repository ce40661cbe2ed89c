"""KV index: which engine (and tier) holds which prefix block, fed by engines' KV events."""

from kvmesh.index.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, decode_batch, encode_batch
from kvmesh.index.hashing import BlockKey, block_keys, root_seed
from kvmesh.index.index import KvIndex, Match
from kvmesh.index.subscriber import EventSubscriber, IndexFeed

__all__ = ["AllBlocksCleared", "BlockKey", "BlockRemoved", "BlockStored", "EventBatch", "EventSubscriber",
           "IndexFeed", "KvIndex", "Match", "block_keys", "decode_batch", "encode_batch", "root_seed"]
