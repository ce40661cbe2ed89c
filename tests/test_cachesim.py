"""The pooled-vs-per-node cache model behind bench/cache_pool.py, on a generated trace."""

from __future__ import annotations

from kvmesh.bench.cachesim import LruBlocks, simulate
from kvmesh.workloads import TraceRequest


def test_pool_finds_what_round_robin_scatters() -> None:
    # 3 "conversations", each request re-sending its conversation's growing prefix; round-robin over 4 nodes
    # sends consecutive turns of a conversation to different nodes, so mostly only a shared pool sees it.
    reqs = [TraceRequest(t, 512 * (t // 3 + 1), 1, [c * 100 + i for i in range(t // 3 + 1)])
            for t, c in ((t, t % 3) for t in range(60))]
    h = simulate(reqs, nodes=4, per_node_blocks=100)
    assert h.pooled > 0.85 and h.gain > 1.3  # per-node caches see each conversation only every 12th turn
    small = simulate(reqs, nodes=4, per_node_blocks=1)
    assert small.pooled < h.pooled  # capacity matters


def test_lru_blocks() -> None:
    c = LruBlocks(2)
    c.touch([1, 2])
    assert c.prefix([1, 2, 3]) == 2
    c.touch([3])
    assert c.prefix([1]) == 0 and c.prefix([2, 3]) == 2
