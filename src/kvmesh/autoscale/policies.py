"""Baseline autoscaling policies, faithful to their published defaults, and the registry of every policy.

- ``kpa`` — AIBrix KPA (Knative's algorithm): the metric averaged over a 180 s stable window and a 60 s
  panic window; desired = ceil(total / target).  Panic mode starts when the panic window asks for at least
  ``panic_threshold`` (2.0) times the ready replicas, and lasts until a whole stable window passes without
  that; while panicking the count never goes down.  Each decision moves at most 2x up or down from the ready
  count; a change within ``tolerance`` (0.1) of the current count is ignored; scale-down waits a 300 s
  delay (the highest recommendation of the last 300 s).  Metric: ``kv_usage`` (``gpu_cache_usage_perc``,
  target 0.5, the AIBrix example) or ``concurrency`` (in-flight requests per replica).
- ``hpa`` — Kubernetes HPA: every 15 s, desired = ceil(ready * average / target) unless within the 0.1
  tolerance; scale-up at most max(2x, +4 pods) per period; scale-down stabilised over 300 s.
- ``queue`` — vLLM production-stack's KEDA scaler: ``vllm:num_requests_waiting`` averaged per replica,
  target 5, polled every 30 s (KEDA's default), HPA's formula and tolerance, cooldown 360 s before scale-down.
- ``dynamo`` — NVIDIA Dynamo planner (SLA mode): every 180 s, the next interval's load predicted (its
  ``constant`` predictor: the last interval's), prefill replicas = predicted prompt tokens/s / profiled
  prefill throughput per replica; decode replicas = predicted output tokens/s / the decode throughput per
  replica that meets the ITL target.  Aggregated replicas do both, so they get the sum of the two loads.
  (Dynamo's correction factors from observed TTFT/ITL are not modelled.)

kvmesh's own ``slo`` policy is in :mod:`kvmesh.autoscale.slo`.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvmesh.autoscale.core import Behaviour, Capacity, Decision, Fleet, Policy
from kvmesh.autoscale.signals import RoleSignals, Signals
from kvmesh.autoscale.slo import SloConfig, SloPolicy

METRICS: dict[str, Callable[[RoleSignals], float]] = {
    "kv_usage": lambda s: s.kv_usage_sum,                  # summed over ready replicas
    "concurrency": lambda s: float(s.waiting + s.running),
    "running": lambda s: float(s.running),
    "waiting": lambda s: float(s.waiting),
}


def _metric(name: str) -> Callable[[RoleSignals], float]:
    if name not in METRICS:
        raise ValueError(f"unknown autoscaling metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]


def hpa_desired(ready: int, total: float, target: float, tolerance: float) -> int:
    """Kubernetes HPA's formula over the ready replicas' total: ceil(total / target) — equivalently
    ceil(ready * average / target) — but ``ready`` itself while the ratio is within ``tolerance`` of 1."""
    if ready > 0 and abs(total / (target * ready) - 1.0) <= tolerance:
        return ready
    return math.ceil(total / target - 1e-9)


@dataclass(frozen=True, slots=True)
class KpaConfig:
    metric: str = "kv_usage"
    target: float = 0.5
    stable_window_s: float = 180.0
    panic_window_s: float = 60.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0
    tolerance: float = 0.1
    scale_down_delay_s: float = 300.0
    tick_s: float = 5.0


class KpaPolicy(Policy):
    name = "kpa"

    def __init__(self, cfg: KpaConfig | None = None) -> None:
        self.cfg = c = cfg or KpaConfig()
        self.period_s = c.tick_s
        self.behaviour = Behaviour(scale_down_window_s=c.scale_down_delay_s)
        self._metric = _metric(c.metric)
        self._samples: dict[str, collections.deque[tuple[float, float]]] = collections.defaultdict(collections.deque)
        self._panic_since: dict[str, float | None] = {}
        self._panic_max: dict[str, int] = {}

    def observe(self, signals: Signals) -> None:
        for role, s in signals.roles.items():
            window = self._samples[role]
            window.append((signals.now, self._metric(s)))
            while window[0][0] <= signals.now - self.cfg.stable_window_s:
                window.popleft()

    def _avg(self, role: str, now: float, span: float) -> float:
        xs = [v for t, v in self._samples[role] if t > now - span]
        return sum(xs) / len(xs) if xs else 0.0

    def decide(self, now: float, signals: Signals, current: Mapping[str, Fleet]) -> Decision:
        desired: dict[str, int] = {}
        inputs: dict[str, float] = {}
        reasons: list[str] = []
        for role, fleet in current.items():
            n, why, stable, panic = self._role(role, now, fleet)
            desired[role] = n
            inputs |= {f"{role}.stable_avg": stable, f"{role}.panic_avg": panic}
            reasons.append(f"{role}: {why}")
        return Decision(desired, "; ".join(reasons), inputs)

    def _role(self, role: str, now: float, fleet: Fleet) -> tuple[int, str, float, float]:
        c = self.cfg
        ready = max(fleet.ready, 1)
        stable, panic = self._avg(role, now, c.stable_window_s), self._avg(role, now, c.panic_window_s)
        want_stable = hpa_desired(fleet.ready, stable, c.target, c.tolerance)
        want_panic = math.ceil(panic / c.target - 1e-9)
        since = self._panic_since.get(role)
        if want_panic / ready >= c.panic_threshold:
            if since is None:
                self._panic_max[role] = fleet.replicas
            since = self._panic_since[role] = now  # (re)arm: panic lasts a stable window past the last trigger
        elif since is not None and now - since >= c.stable_window_s:
            since = self._panic_since[role] = None
        if since is not None:  # panicking: never scale down
            n = self._panic_max[role] = max(self._panic_max[role], want_panic, fleet.replicas)
            why = f"panic (panic avg {panic:.2f} wants {want_panic} >= {c.panic_threshold}x {ready} ready)"
        else:
            n, why = want_stable, f"stable avg {stable:.2f} / target {c.target}"
        n = min(n, math.ceil(c.max_scale_up_rate * ready))
        n = max(n, math.floor(ready / c.max_scale_down_rate))
        return n, why, stable, panic


@dataclass(frozen=True, slots=True)
class HpaConfig:
    metric: str = "kv_usage"
    target: float = 0.5      # per replica
    tolerance: float = 0.1
    period_s: float = 15.0   # the controller's sync period
    scale_down_window_s: float = 300.0


class HpaPolicy(Policy):
    name = "hpa"

    def __init__(self, cfg: HpaConfig | None = None) -> None:
        self.cfg = c = cfg or HpaConfig()
        self.period_s = c.period_s
        self.behaviour = Behaviour(scale_down_window_s=c.scale_down_window_s, max_up_rate=2.0, max_up_pods=4)
        self._metric = _metric(c.metric)

    def decide(self, now: float, signals: Signals, current: Mapping[str, Fleet]) -> Decision:
        desired: dict[str, int] = {}
        inputs: dict[str, float] = {}
        for role, fleet in current.items():
            total = self._metric(signals.role(role))
            desired[role] = hpa_desired(fleet.ready, total, self.cfg.target, self.cfg.tolerance)
            inputs[f"{role}.{self.cfg.metric}"] = total
        return Decision(desired, f"{self.cfg.metric} total / target {self.cfg.target}", inputs)


class QueuePolicy(HpaPolicy):
    """KEDA on ``vllm:num_requests_waiting`` (vLLM production-stack): an HPA with a 30 s polling interval
    and a 360 s cooldown."""

    name = "queue"

    def __init__(self, target: float = 5.0, cooldown_s: float = 360.0, polling_s: float = 30.0) -> None:
        super().__init__(HpaConfig(metric="waiting", target=target, period_s=polling_s,
                                   scale_down_window_s=cooldown_s))


@dataclass(frozen=True, slots=True)
class DynamoConfig:
    capacity: Capacity  # profiled: prefill tokens/s at the TTFT target, decode throughput at the ITL target
    period_s: float = 180.0


class DynamoPolicy(Policy):
    name = "dynamo"

    def __init__(self, cfg: DynamoConfig) -> None:
        self.cfg = cfg
        self.period_s = cfg.period_s
        self._acc: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])

    def observe(self, signals: Signals) -> None:
        for role, s in signals.roles.items():
            g, a = s.gateway, self._acc[role]
            a[0] += g.interval_s
            a[1] += g.arrivals
            a[2] += g.prompt_tokens
            a[3] += g.output_tokens
            a[4] += g.finished

    def decide(self, now: float, signals: Signals, current: Mapping[str, Fleet]) -> Decision:
        cap = self.cfg.capacity
        desired: dict[str, int] = {}
        inputs: dict[str, float] = {}
        for role, fleet in current.items():
            span, arrivals, prompt, output, finished = self._acc.pop(role, [0.0] * 5)
            if span <= 0:
                desired[role] = fleet.replicas
                continue
            osl = output / finished if finished else 0.0
            prefill_load = prompt / span / cap.prefill_tps           # the constant predictor: last interval
            decode_load = arrivals * osl / span / cap.decode_tps
            n = {"prefill": prefill_load, "decode": decode_load}.get(role, prefill_load + decode_load)
            desired[role] = max(1, math.ceil(n - 1e-9))
            inputs |= {f"{role}.prefill_load": prefill_load, f"{role}.decode_load": decode_load,
                       f"{role}.osl": osl}
        return Decision(desired, "predicted load / profiled throughput per replica", inputs)


POLICY_NAMES = ("slo", "kpa", "hpa", "queue", "dynamo")


def make_policy(name: str, capacity: Capacity, *, ttft_s: float = 2.0, tpot_s: float = 0.05,
                start_s: float = 60.0) -> Policy:
    """A policy with its published defaults; ``capacity`` is the profiled per-replica capacity (Dynamo's
    profile; the ``slo`` policy's prior, which it then learns).  Raises ``ValueError`` for an unknown name."""
    if name == "slo":
        return SloPolicy(SloConfig(prior=capacity, ttft_s=ttft_s, tpot_s=tpot_s, start_s=start_s))
    if name == "kpa":
        return KpaPolicy()
    if name == "hpa":
        return HpaPolicy()
    if name == "queue":
        return QueuePolicy()
    if name == "dynamo":
        return DynamoPolicy(DynamoConfig(capacity))
    raise ValueError(f"unknown autoscaling policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
