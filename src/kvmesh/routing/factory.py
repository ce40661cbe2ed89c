"""Build a routing policy by name: the registry pairing each name of :mod:`kvmesh.policy_names` (with its
description and what it needs from the gateway) with the function that builds it.

The names and descriptions live in :mod:`kvmesh.policy_names` because the config validates against them and
this module imports the config; the registry below fails at import if a name lacks a builder or a builder
lacks a name, so the two cannot drift.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

from prometheus_client import CollectorRegistry

from kvmesh.config import RoutingConfig
from kvmesh.index.index import KvIndex
from kvmesh.policy_names import POLICIES, POLICY_SPECS, PolicySpec, policy_spec
from kvmesh.routing.base import Policy
from kvmesh.routing.kv_aware import CostModel, KvAwarePolicy, SessionPicker
from kvmesh.routing.policies import HealthyServingModel, least_request_policy, random_policy, round_robin_policy

__all__ = ["POLICIES", "REGISTRY", "make_policy", "policy_spec"]


class _Args(NamedTuple):
    name: str
    rng: random.Random
    kv_index: KvIndex | None
    cfg: RoutingConfig
    registry: CollectorRegistry | None


def _cost_model(cfg: RoutingConfig) -> CostModel:
    return CostModel(prefill_tps=cfg.prefill_tps, decode_penalty_s=cfg.decode_penalty_s,
                     cpu_load_cost=cfg.cpu_load_cost, storage_load_cost=cfg.storage_load_cost,
                     recompute_weight=cfg.recompute_weight, saturation_weight=cfg.saturation_weight,
                     decode_weight=cfg.decode_weight, decode_s_per_seq=cfg.decode_s_per_seq,
                     decode_s_per_ctx_token=cfg.decode_s_per_ctx_token, kv_pressure_s=cfg.kv_pressure_s,
                     kv_high=cfg.kv_high, output_tokens=cfg.output_tokens, session_prior=cfg.session_prior,
                     session_balance=cfg.session_balance, session_live_s=cfg.session_live_s,
                     session_turns=cfg.session_turns,
                     learn=cfg.learn_prefill_tps)


def _kv_aware(a: _Args) -> Policy:
    idx = a.kv_index or KvIndex("kvmesh", a.cfg.max_index_blocks, a.cfg.speculative_ttl_s)
    return KvAwarePolicy(a.name, idx, _cost_model(a.cfg), registry=a.registry, rng=a.rng)


def _prefix(a: _Args) -> Policy:
    c = a.cfg
    idx = KvIndex("kvmesh-prefix", c.max_index_blocks, c.prefix_ttl_s, max_pending=c.max_index_blocks)
    return KvAwarePolicy(a.name, idx, _cost_model(c), learn_from_routing=True, learned_ttl_s=c.prefix_ttl_s,
                         block_size=c.prefix_block_size, registry=a.registry, rng=a.rng)


def _session(a: _Args) -> Policy:
    return Policy(a.name, [HealthyServingModel()], [], SessionPicker(slack=a.cfg.session_slack, rng=a.rng))


_BUILDERS: dict[str, Callable[[_Args], Policy]] = {
    "random": lambda a: random_policy(a.name, a.rng),
    "round-robin": lambda a: round_robin_policy(a.name, a.rng),
    "least-request": lambda a: least_request_policy(a.name, a.rng),
    "kv-aware": _kv_aware, "prefix": _prefix, "session": _session,
}
if set(_BUILDERS) != set(POLICIES):  # a programming error: fail at import, not on the first request
    raise ImportError(f"policy builders {sorted(_BUILDERS)} do not match kvmesh.policy_names {sorted(POLICIES)}")
REGISTRY: dict[str, tuple[PolicySpec, Callable[[_Args], Policy]]] = {s.name: (s, _BUILDERS[s.name])
                                                                      for s in POLICY_SPECS}


def make_policy(name: str, seed: int | None = None, *, index: KvIndex | None = None,
                cfg: RoutingConfig | None = None, registry: CollectorRegistry | None = None) -> Policy:
    """Raises ``ValueError`` ("unknown policy 'x'; choose one of: ...") for an unknown name.  ``kv-aware``
    reads ``index`` (fed by engine events); ``prefix`` builds its own index learned from the prompts it
    routes."""
    spec = policy_spec(name)
    _, build = REGISTRY[spec.name]
    return build(_Args(spec.name, random.Random(seed), index, cfg or RoutingConfig(), registry))
