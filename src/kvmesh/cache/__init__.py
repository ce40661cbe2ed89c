"""kvmesh's tiered KV cache: the per-machine cache node (DRAM arena → SSD → remote) and its client.

This package imports nothing on purpose: its engine-side half (``client``, ``protocol``, ``keys``, ``chunk``,
``arena``, ``pool.direct``) is loaded inside every vLLM worker, which must not pay for the node daemon, the
pool server or the remote tiers.  Import names from their defining modules (``kvmesh.cache.client.NodeClient``,
``kvmesh.cache.node.CacheNode``); ``tests/test_layers.py`` checks what the connector loads.
"""
