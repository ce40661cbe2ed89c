"""What the autoscaler sees: one control interval's signals per role, from the gateway and the engines.

Every actuator (the simulator, the local supervisor, Kubernetes) fills the same typed structs, so a policy
cannot tell which one it runs under.  The contract:

- :class:`GatewaySignals` covers the **last interval** (``interval_s`` seconds ending at ``Signals.now``):
  counters (arrivals, prompt tokens arrived, prompt tokens answered, output tokens streamed, requests
  finished) count events inside it; gauges (queued prefill tokens, in-flight) are sampled at its end;
  latency percentiles are over the requests that got their first token / finished inside it (0.0 when none);
  the SLO miss counts are over the requests that finished inside it.
- :class:`EngineSignals` is one serving replica's scrape at the interval's end (vLLM's
  ``num_requests_waiting``, ``num_requests_running``, ``kv_cache_usage_perc``).  Replicas still starting
  or draining are not listed: they neither serve nor take new work.
- A role is ``both`` (aggregated serving), ``prefill`` or ``decode`` (the names of
  ``kvmesh.routing.disagg.Role``; repeated here as strings so this package imports no other kvmesh package).

Structs are frozen: a decision's recorded inputs cannot change after the fact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

AGGREGATED = "both"


@dataclass(frozen=True, slots=True)
class EngineSignals:
    """One serving replica's metrics, scraped at the interval's end."""

    name: str
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # 0..1: blocks held by running requests over the pool


@dataclass(frozen=True, slots=True)
class GatewaySignals:
    """What the gateway saw of one role's traffic over the last ``interval_s`` seconds."""

    interval_s: float
    arrivals: int = 0
    prompt_tokens: int = 0          # prompt tokens of the requests that arrived
    prefill_tokens_done: int = 0    # prompt tokens of the requests whose first token came back (uncached
                                    # tokens computed, as far as the gateway knows)
    output_tokens: int = 0          # tokens streamed back
    finished: int = 0
    queued_prefill_tokens: int = 0  # gauge: prompt tokens sent and not yet answered (every replica)
    in_flight: int = 0              # gauge
    ttft_p50_s: float = 0.0
    ttft_p90_s: float = 0.0
    tpot_p50_s: float = 0.0
    tpot_p90_s: float = 0.0
    shed: int = 0                   # requests refused up front (429/503) for lack of capacity
    slo_missed_ttft: int = 0        # of ``finished``: over the deployment's TTFT / TPOT target (0 where the
    slo_missed_tpot: int = 0        # actuator knows no target: the slo policy's attainment feedback is off)

    @property
    def arrival_rate(self) -> float:
        return self.arrivals / self.interval_s if self.interval_s > 0 else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.interval_s if self.interval_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RoleSignals:
    """One role's interval: the gateway's view and every serving replica's scrape."""

    gateway: GatewaySignals
    engines: tuple[EngineSignals, ...] = ()

    @property
    def waiting(self) -> int:
        return sum(e.waiting for e in self.engines)

    @property
    def running(self) -> int:
        return sum(e.running for e in self.engines)

    @property
    def kv_usage_sum(self) -> float:
        return sum(e.kv_usage for e in self.engines)


@dataclass(frozen=True, slots=True)
class Signals:
    """Everything one control tick sees: ``now`` (seconds, the actuator's clock) and each role's interval."""

    now: float
    roles: dict[str, RoleSignals] = field(default_factory=dict)

    def role(self, name: str) -> RoleSignals:
        """The role's signals; an empty interval (nothing observed) when the actuator reported none."""
        got = self.roles.get(name)
        return got if got is not None else RoleSignals(GatewaySignals(interval_s=0.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
