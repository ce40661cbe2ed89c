"""The routing policies kvmesh offers, by name: the one list that config validation, CLI help and error
messages are generated from.

This module imports nothing from kvmesh on purpose: ``kvmesh.config`` validates policy names with it, and
``kvmesh.routing`` (which imports the config) builds the policies — so the names cannot live in the routing
package without an import cycle.  ``kvmesh.routing.factory`` pairs every name here with its builder and
fails at import if one is missing.
"""

from __future__ import annotations

from typing import NamedTuple


class PolicySpec(NamedTuple):
    name: str
    description: str
    needs_tokens: bool  # the gateway must tokenise prompts for this policy
    reads_engine_events: bool  # the gateway's KV index, fed by engine events, is what it scores on


POLICY_SPECS: tuple[PolicySpec, ...] = (
    PolicySpec("random", "uniformly random healthy replica", False, False),
    PolicySpec("round-robin", "healthy replicas in turn", False, False),
    PolicySpec("least-request", "fewest requests in flight", False, False),
    PolicySpec("kv-aware", "lowest estimated TTFT from the cached prefix (engine KV events) and queue", True, True),
    PolicySpec("prefix", "like kv-aware, over an index learned from routed prompts (no engine events)", True,
               False),
    PolicySpec("session", "sticks a session (session header) to one replica unless it is overloaded", False,
               False),
)
POLICIES: tuple[str, ...] = tuple(s.name for s in POLICY_SPECS)
DEFAULT_POLICY = "least-request"
_BY_NAME = {s.name: s for s in POLICY_SPECS}


def policy_spec(name: str) -> PolicySpec:
    """The spec of ``name``; ``ValueError`` naming every choice otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None


def policy_help() -> str:
    """One line per policy, for ``--help``."""
    return "; ".join(f"{s.name}: {s.description}" for s in POLICY_SPECS)
