"""Build a routing policy by name from its config."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from kvmesh.config import RoutingConfig
from kvmesh.index.index import KvIndex
from kvmesh.routing.base import Policy
from kvmesh.routing.kv_aware import CostModel, KvAwarePolicy, SessionPicker
from kvmesh.routing.policies import HealthyServingModel, basic_policy

POLICIES = ("random", "round-robin", "least-request", "kv-aware", "prefix", "session")


def make_policy(name: str, seed: int | None = None, *, index: KvIndex | None = None,
                cfg: RoutingConfig | None = None, registry: CollectorRegistry | None = None) -> Policy:
    """Raises ``ValueError`` for an unknown name.  ``kv-aware`` reads ``index`` (fed by engine events);
    ``prefix`` builds its own index learned from the prompts it routes."""
    cfg = cfg or RoutingConfig()
    rng = random.Random(seed)
    if name in ("kv-aware", "prefix"):
        model = CostModel(prefill_tps=cfg.prefill_tps, decode_penalty_s=cfg.decode_penalty_s,
                          cpu_load_cost=cfg.cpu_load_cost, storage_load_cost=cfg.storage_load_cost,
                          recompute_weight=cfg.recompute_weight,
                          learn=cfg.learn_prefill_tps)
        if name == "kv-aware":
            idx = index or KvIndex("kvmesh", cfg.max_index_blocks, cfg.speculative_ttl_s)
            return KvAwarePolicy(name, idx, model, registry=registry, rng=rng)
        idx = KvIndex("kvmesh-prefix", cfg.max_index_blocks, cfg.prefix_ttl_s, max_pending=cfg.max_index_blocks)
        return KvAwarePolicy(name, idx, model, learn_from_routing=True, learned_ttl_s=cfg.prefix_ttl_s,
                             block_size=cfg.prefix_block_size, registry=registry, rng=rng)
    if name == "session":
        return Policy(name, [HealthyServingModel()], [], SessionPicker(slack=cfg.session_slack, rng=rng))
    return basic_policy(name, rng)
