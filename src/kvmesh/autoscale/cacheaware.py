"""Cache-aware scaling: which replica to drain, what a new replica loads before it serves, how it ramps in.

A replica's GPU cache is worth what it would cost to lose: the **hot blocks held nowhere else**.  Blocks that
another replica also holds survive the drain; cold blocks would be evicted soon anyway.  So scale-in drains
the replica whose uniquely held hot blocks weigh least (:func:`victim_order`), and its blocks stay reachable
in the cache node/pool (the connector writes every computed block through).

Scale-out pre-warms: before a new replica takes traffic it loads the hottest **chains** from the node/pool
(:func:`prewarm_plan`): a block is only usable behind its whole prefix, so the plan closes every chosen block
over its ancestors and lists parents first.  Then routing ramps its share in (:func:`ramp_share`) instead of
sending it every cold request the moment it looks idle.

Hotness (:class:`Hotness`) is what the gateway's index sees: every routed request touches its prompt's block
keys; a key's weight decays exponentially with ``half_life_s``.  The functions are pure over plain
mappings (per-engine key sets from ``KvIndex.engine_keys``, hotness from :class:`Hotness`), so the
simulator, the gateway and tests share them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence, Set


class Hotness:
    """Exponentially decayed access counts of block keys, with each key's parent (its chain)."""

    def __init__(self, half_life_s: float = 300.0, max_keys: int = 500_000) -> None:
        self.decay = math.log(2) / half_life_s
        self.max_keys = max_keys
        self._w: dict[int, tuple[float, float]] = {}  # key -> (weight at time t, t)
        self.parent: dict[int, int | None] = {}

    def touch(self, keys: Sequence[int], now: float) -> None:
        """One request's prompt blocks (chained: ``keys[i - 1]`` is the parent of ``keys[i]``)."""
        for i, k in enumerate(keys):
            w, t = self._w.get(k, (0.0, now))
            self._w[k] = (w * math.exp(-self.decay * (now - t)) + 1.0, now)
            if k not in self.parent:
                self.parent[k] = keys[i - 1] if i else None
        if len(self._w) > self.max_keys:
            self._prune(now)

    def weight(self, key: int, now: float) -> float:
        w, t = self._w.get(key, (0.0, now))
        return w * math.exp(-self.decay * (now - t))

    def snapshot(self, now: float) -> dict[int, float]:
        return {k: w * math.exp(-self.decay * (now - t)) for k, (w, t) in self._w.items()}

    def _prune(self, now: float) -> None:
        keep = heapq.nlargest(self.max_keys // 2, self.snapshot(now).items(), key=lambda kv: kv[1])
        self._w = {k: (w, now) for k, w in keep}
        self.parent = {k: self.parent.get(k) for k in self._w}


def unique_value(blocks: Mapping[str, Set[int]], hot: Mapping[int, float]) -> dict[str, float]:
    """Each engine's hotness summed over the blocks no other engine holds."""
    count: dict[int, int] = {}
    for keys in blocks.values():
        for k in keys:
            count[k] = count.get(k, 0) + 1
    return {e: sum(hot.get(k, 0.0) for k in keys if count[k] == 1) for e, keys in blocks.items()}


def victim_order(blocks: Mapping[str, Set[int]], hot: Mapping[int, float], candidates: Sequence[str],
                 in_flight: Mapping[str, int] | None = None) -> list[str]:
    """``candidates`` ordered least valuable cache first (ties: fewer in-flight requests, i.e. the shorter
    drain; then the later in ``candidates``, the younger)."""
    value = unique_value({e: blocks.get(e, frozenset()) for e in candidates}, hot)
    load = in_flight or {}
    pos = {e: i for i, e in enumerate(candidates)}
    return sorted(candidates, key=lambda e: (value[e], load.get(e, 0), -pos[e]))


def prewarm_plan(hot: Mapping[int, float], parent: Mapping[int, int | None], budget_blocks: int,
                 held: Set[int] = frozenset()) -> list[int]:
    """The hottest chains within ``budget_blocks``: keys in load order (every key after its parent), each
    chosen block closed over its ancestors; keys in ``held`` (already on the replica) cost nothing."""
    plan: list[int] = []
    chosen: set[int] = set(held)
    for key, _ in sorted(hot.items(), key=lambda kv: -kv[1]):
        if len(plan) >= budget_blocks:
            break
        chain = []
        k: int | None = key
        while k is not None and k not in chosen:
            chain.append(k)
            k = parent.get(k)
        if len(plan) + len(chain) > budget_blocks:
            continue
        chosen.update(chain)
        plan.extend(reversed(chain))
    return plan


def ramp_share(age_s: float, ramp_s: float) -> float:
    """The share of its fair traffic a replica that started serving ``age_s`` ago receives (0 → 1 over
    ``ramp_s``, linear)."""
    if ramp_s <= 0 or age_s >= ramp_s:
        return 1.0
    return max(0.0, age_s / ramp_s)


class CacheAwareVictims:
    """A :class:`kvmesh.autoscale.core.VictimChooser` over live views: ``blocks(engine)`` (e.g.
    ``KvIndex.engine_keys``), ``hotness()`` and optionally ``in_flight(engine)``."""

    def __init__(self, blocks: Callable[[str], Set[int]], hotness: Callable[[], Mapping[int, float]],
                 in_flight: Callable[[str], int] | None = None) -> None:
        self.blocks, self.hotness, self.in_flight = blocks, hotness, in_flight

    def __call__(self, role: str, members: list[str], k: int) -> list[str]:
        load = {e: self.in_flight(e) for e in members} if self.in_flight else None
        return victim_order({e: self.blocks(e) for e in members}, self.hotness(), members, load)[:k]
