"""kvmesh's own autoscaling policy: size the fleet for the SLO a cold start from now, from a capacity model
learned online and a short-horizon forecast of the load.

Per role, every tick:

1. **Forecast.**  Holt's smoothing (level + damped trend) of the arrival rate and of prompt tokens/s, read
   ``horizon_s`` ahead — by default the cold start plus one decision period, the earliest moment a replica
   ordered now can serve.  The policy sizes for the larger of now and then: it never plans for a fall.  The
   smoothing is slow on purpose (``alpha`` 0.1 on 5 s samples: a ~50 s memory): one noisy interval must not
   order a replica that then sits out a whole stabilisation window.
2. **Demand**, in replicas' time.  Prefill: the forecast prompt tokens/s over the prefill capacity, plus a
   drain term — the queued prefill tokens drained within the horizon.  Decode: concurrent streams by
   Little's law — arrival rate x mean output tokens (learned from finished requests) x the TPOT target —
   over the streams one replica holds at the TPOT target.  An aggregated replica does both in the same
   steps, so its load is the sum; a prefill or decode role takes its own.
3. **Capacity per replica** (:class:`CapacityModel`), starting from a profiled prior and learned from what
   the fleet does: prefill tokens/s rises towards any observed per-replica throughput, and is set (smoothed)
   to the observed throughput when the fleet was saturated (prompt tokens still queued at the interval's
   end); decode concurrency at the TPOT target comes from a smoothed least-squares line TPOT = a + b x
   streams per replica, fitted on the intervals' (streams, TPOT p50) pairs.  Learned figures stay within
   [``min_factor``, ``max_factor``] of the prior.
4. **Scale out**: replicas = ceil(demand / ``utilisation``).  **Panic on a predicted breach**: when the
   queued prefill tokens would take the ready fleet longer than ``backlog_s`` (default: the TTFT target) to
   drain, every request behind them misses its TTFT — order at least one more replica at once (none already
   starting).  An *observed* TTFT p90 over target is not a trigger by itself: a prompt too long to prefill
   within the target on an idle replica breaches at any fleet size, and reacting to it ratchets the fleet to
   its maximum (the first version did, on Mooncake's 100k-token prompts).
5. **Scale in slowly, with hysteresis**: below the current count the policy recommends only what fits at
   ``scale_in_utilisation`` (lower than ``utilisation``), the scaler keeps the highest recommendation of
   ``scale_down_window_s`` and removes one replica at a time — so the forecast must stay below n-1 replicas'
   capacity with headroom for a whole window.

``Slo.decide`` is pure given the observed history; nothing reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvmesh.autoscale.core import Behaviour, Capacity, Decision, Fleet, Policy
from kvmesh.autoscale.signals import RoleSignals, Signals


@dataclass(slots=True)
class Holt:
    """Holt's exponential smoothing with a damped trend (Gardner & McKenzie) over evenly spaced samples (one
    per tick).  Damping (``phi`` < 1) bounds how far a trend is extrapolated: an undamped trend learned on a
    ramp kept forecasting ~30 % above the load for minutes after the ramp ended (Azure conv's first minute),
    and the fleet was sized for that."""

    alpha: float = 0.3
    beta: float = 0.1
    phi: float = 1.0
    level: float | None = None
    trend: float = 0.0
    samples: int = 0

    def update(self, x: float) -> None:
        """Add one sample.  Warm-up: the first ``1 / alpha`` samples are averaged (weight ``1 / n``) and no
        trend is learned — a first noisy interval must not stand for the level, nor two for a trend."""
        self.samples += 1
        if self.level is None:
            self.level = x
            return
        prev, a = self.level, max(self.alpha, 1.0 / self.samples)
        self.level = a * x + (1 - a) * (prev + self.phi * self.trend)
        if a <= self.alpha:
            self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.phi * self.trend

    def forecast(self, steps: float) -> float:
        """The value ``steps`` samples ahead (0 before any sample; never negative)."""
        phi = self.phi
        reach = steps if phi >= 1.0 else phi * (1 - phi ** steps) / (1 - phi)
        return max(0.0, (self.level or 0.0) + reach * self.trend)


@dataclass(slots=True)
class CapacityModel:
    """One role's per-replica capacity, learned from the intervals the fleet served (see module docstring)."""

    prior: Capacity
    smoothing: float = 0.2
    min_factor: float = 0.5
    max_factor: float = 2.0
    prefill_tps: float = 0.0
    # exponentially weighted sums for TPOT = a + b * streams
    _n: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def __post_init__(self) -> None:
        self.prefill_tps = self.prefill_tps or self.prior.prefill_tps

    def _bound(self, value: float, prior: float) -> float:
        return min(max(value, self.min_factor * prior), self.max_factor * prior)

    def learn(self, s: RoleSignals, ready: int) -> None:
        g = s.gateway
        if ready <= 0 or g.interval_s <= 0:
            return
        observed = g.prefill_tokens_done / g.interval_s / ready
        saturated = g.queued_prefill_tokens > 0.5 * self.prefill_tps * ready * g.interval_s
        if saturated or observed > self.prefill_tps:  # smoothed: a prompt is counted whole when it answers
            self.prefill_tps += self.smoothing * (observed - self.prefill_tps)
        self.prefill_tps = self._bound(self.prefill_tps, self.prior.prefill_tps)
        if g.tpot_p50_s > 0 and s.running > 0:
            x, y, k = s.running / ready, g.tpot_p50_s, 1 - self.smoothing / 4
            self._n, self._x, self._y = k * self._n + 1, k * self._x + x, k * self._y + y
            self._xx, self._xy = k * self._xx + x * x, k * self._xy + x * y

    def decode_concurrency(self, tpot_s: float) -> float:
        """Streams per replica at ``tpot_s``: from the fitted line when the samples spread, else the prior."""
        n = self._n
        if n < 3:
            return self.prior.decode_concurrency
        mx, my = self._x / n, self._y / n
        var = self._xx / n - mx * mx
        if var < max(1.0, 0.01 * mx * mx):  # too little spread in load to tell a slope
            return self.prior.decode_concurrency
        b = (self._xy / n - mx * my) / var
        a = my - b * mx
        if b <= 0:
            return self.prior.decode_concurrency
        return self._bound((tpot_s - a) / b, self.prior.decode_concurrency)


@dataclass(frozen=True, slots=True)
class SloConfig:
    prior: Capacity
    ttft_s: float = 2.0
    tpot_s: float = 0.05
    start_s: float = 60.0
    period_s: float = 5.0
    horizon_s: float | None = None   # default: start_s + period_s
    utilisation: float = 0.85        # scale out above this share of the capacity (bursts within a tick)
    scale_in_utilisation: float = 0.75  # scale in only to a count that carries the load at this share
    scale_down_window_s: float = 120.0
    backlog_s: float | None = None   # predicted breach: queued prefill drains slower than this (default ttft_s)
    learn: bool = True
    alpha: float = 0.1
    beta: float = 0.05
    phi: float = 0.95                # trend damping per tick: a trend reaches at most phi / (1 - phi) ticks ahead


@dataclass(slots=True)
class _RoleState:
    capacity: CapacityModel
    rate: Holt = field(default_factory=Holt)
    prompt: Holt = field(default_factory=Holt)
    osl: float = 0.0


class SloPolicy(Policy):
    name = "slo"

    def __init__(self, cfg: SloConfig) -> None:
        self.cfg = cfg
        self.period_s = cfg.period_s
        self.behaviour = Behaviour(scale_down_window_s=cfg.scale_down_window_s, max_down_pods=1)
        self._roles: dict[str, _RoleState] = {}
        self._ready: dict[str, int] = {}

    def _state(self, role: str) -> _RoleState:
        st = self._roles.get(role)
        if st is None:
            st = self._roles[role] = _RoleState(CapacityModel(self.cfg.prior))
        return st

    def observe(self, signals: Signals) -> None:
        for role, s in signals.roles.items():
            st, g = self._state(role), s.gateway
            if g.interval_s <= 0:
                continue
            st.rate.alpha = st.prompt.alpha = self.cfg.alpha
            st.rate.beta = st.prompt.beta = self.cfg.beta
            st.rate.phi = st.prompt.phi = self.cfg.phi
            st.rate.update(g.arrival_rate)
            st.prompt.update(g.prompt_tps)
            if g.finished:
                mean = g.output_tokens / g.finished
                st.osl = mean if st.osl == 0 else 0.9 * st.osl + 0.1 * mean
            if self.cfg.learn:
                st.capacity.learn(s, len(s.engines))

    def decide(self, now: float, signals: Signals, current: Mapping[str, Fleet]) -> Decision:
        desired: dict[str, int] = {}
        inputs: dict[str, float] = {}
        reasons: list[str] = []
        for role, fleet in current.items():
            n, why, figures = self._role(role, signals.role(role), fleet)
            desired[role] = n
            reasons.append(f"{role}: {why}")
            inputs |= {f"{role}.{k}": v for k, v in figures.items()}
        return Decision(desired, "; ".join(reasons), inputs)

    def _role(self, role: str, s: RoleSignals, fleet: Fleet) -> tuple[int, str, dict[str, float]]:
        c, st, g = self.cfg, self._state(role), s.gateway
        horizon = c.horizon_s if c.horizon_s is not None else c.start_s + c.period_s
        steps = horizon / c.period_s
        rate = max(st.rate.forecast(0), st.rate.forecast(steps))
        prompt_tps = max(st.prompt.forecast(0), st.prompt.forecast(steps))
        cap = st.capacity.prefill_tps
        drain = g.queued_prefill_tokens / max(horizon, c.ttft_s) / cap
        prefill = prompt_tps / cap + drain
        conc_cap = st.capacity.decode_concurrency(c.tpot_s)
        decode = rate * st.osl * c.tpot_s / conc_cap
        load = {"prefill": prefill, "decode": decode}.get(role, prefill + decode)
        n = max(1, math.ceil(load / c.utilisation - 1e-9))
        why = f"load {load:.2f} replicas (prefill {prefill:.2f}, decode {decode:.2f}) at {c.utilisation:.0%}"
        if n < fleet.replicas:  # hysteresis: scale in only to a count with headroom
            n = min(fleet.replicas, max(1, math.ceil(load / c.scale_in_utilisation - 1e-9)))
            why = f"load {load:.2f} replicas: {n} carry it at {c.scale_in_utilisation:.0%}"
        backlog = g.queued_prefill_tokens / (max(fleet.ready, 1) * cap)
        if role != "decode" and backlog > (c.backlog_s or c.ttft_s) and fleet.starting == 0:
            n = max(n, fleet.replicas + 1)
            why = f"predicted TTFT breach: {backlog:.1f} s of queued prefill on {fleet.ready} ready: +1"
        figures = {"rate_forecast": rate, "prompt_tps_forecast": prompt_tps,
                   "prefill_load": prefill, "decode_load": decode, "drain_load": drain, "backlog_s": backlog,
                   "prefill_tps_per_replica": cap, "decode_concurrency_per_replica": conc_cap, "osl": st.osl}
        return n, why, figures
