"""kvmesh's tiered KV cache: the per-machine cache node (DRAM arena → SSD) and its client."""

from kvmesh.cache.client import Lease, NodeClient
from kvmesh.cache.keys import ChunkKey, Namespace, chunk_keys, event_hash
from kvmesh.cache.node import CacheNode, NodeSettings
from kvmesh.cache.store import StoreConfig

__all__ = ["CacheNode", "ChunkKey", "Lease", "Namespace", "NodeClient", "NodeSettings", "StoreConfig",
           "chunk_keys", "event_hash"]
