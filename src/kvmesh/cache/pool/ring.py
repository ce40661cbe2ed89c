"""Consistent hashing of chunk keys onto cache nodes, with virtual nodes weighted by capacity.

Each node gets points on a 64-bit ring in proportion to its capacity (the largest node gets ``vnodes``, at
least one each); a key's owners are the
first R distinct nodes clockwise from the key's hash.  Adding or removing a node moves only the keys whose
owner set contains it: ~1/N of them.  Immutable: membership changes build a new ring.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

import xxhash


@dataclass(frozen=True, slots=True)
class Ring:
    points: tuple[int, ...]
    owners_at: tuple[str, ...]
    nodes: frozenset[str]

    @classmethod
    def build(cls, capacities: Mapping[str, int], vnodes: int = 160) -> Ring:
        """``capacities``: node id → bytes it offers."""
        pts: list[tuple[int, str]] = []
        biggest = max(capacities.values(), default=1) or 1
        for node, cap in capacities.items():
            n = max(1, round(vnodes * cap / biggest))
            pts += [(xxhash.xxh3_64_intdigest(f"{node}#{i}".encode()), node) for i in range(n)]
        pts.sort()
        return cls(tuple(p for p, _ in pts), tuple(n for _, n in pts), frozenset(capacities))

    def owners(self, key: bytes, r: int = 1) -> list[str]:
        """The first ``r`` distinct nodes clockwise from ``key`` (fewer when the ring has fewer nodes)."""
        if not self.points:
            return []
        want = min(r, len(self.nodes))
        i = bisect.bisect_left(self.points, xxhash.xxh3_64_intdigest(key))
        out: list[str] = []
        n = len(self.points)
        for j in range(n):
            node = self.owners_at[(i + j) % n]
            if node not in out:
                out.append(node)
                if len(out) == want:
                    break
        return out
