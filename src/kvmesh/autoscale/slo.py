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
   streams per replica, fitted on the intervals' (streams, TPOT p50) pairs, and capped by what the KV cache
   holds — streams per replica over the engines' KV usage, at ``kv_fill`` (a cache that fills makes new
   requests wait for blocks whatever the step time: Azure conv x4 at 3 replicas sat at 100 % KV with TPOT
   well under target and met 50 % of its SLO).  Learned figures stay within [``min_factor``,
   ``max_factor``] of the prior.
4. **Scale out**: replicas = ceil(demand / ``utilisation``).  **Panic on a predicted breach**: when the
   queued prefill tokens would take the ready fleet longer than ``backlog_s`` (default: the TTFT target) to
   drain, every request behind them misses its TTFT — order at least one more replica at once (none already
   starting).  An *observed* TTFT p90 over target is not a trigger by itself: a prompt too long to prefill
   within the target on an idle replica breaches at any fleet size, and reacting to it ratchets the fleet to
   its maximum (the first version did, on Mooncake's 100k-token prompts).
5. **Scale in slowly, with hysteresis** (and not at all for the first ``scale_down_window_s``: the output
   length is learned from finished requests, and the first to finish are the short ones — on Azure conv
   the policy read a third of the load and drained two of five warm replicas in its second minute):
   below the current count the policy recommends only what fits at
   ``scale_in_utilisation`` (lower than ``utilisation``), the scaler keeps the highest recommendation of
   ``scale_down_window_s`` and removes one replica at a time — so the forecast must stay below n-1 replicas'
   capacity with headroom for a whole window.  The load is judged **on the smaller fleet**: its steps are
   longer, so each stream lives longer and more of them hold KV at once
   (:meth:`CapacityModel.per_token_at`: from the fitted TPOT line, or at the TPOT target where there is no
   line).  Judged at the larger fleet's TPOT, Azure conv x4 looked to fit 3 replicas at 75 % and then sat
   at the KV cliff (3 replicas meet ~50 % there, 4 meet 99.8 %).
6. **Miss feedback** (:class:`MissFeedback`): what rates cannot predict, the gateway's SLO miss counts can.
   On Azure code a replica's mean load is ~0.2, yet a third of the answers (median 13 tokens) miss the
   TPOT target — decoded beside the prefill chunks of a clump of prompts that arrived within a second.
   When TPOT misses exceed ``1 - attainment_target`` of the requests finished over ``feedback_window_s``,
   a replica floor rises to one more than exist; each raise is judged a cold start plus a window later, and
   one that did not cut the misses by ``futile_ratio`` over two windows running is given back and not
   repeated for a while (one window is not enough: on Azure code a single clump put 26 % of one window's
   answers over target at a fleet that met 97 % over the hour) (Mooncake's
   last TPOT misses come from 100k-token prefills, which more replicas barely dilute).  A floor whose
   misses stay under half the budget for ``feedback_decay_s`` drops by one; a drop that has to be undone
   doubles that wait.  TTFT misses do not feed it: queued prefill has its own predictive trigger (4), and a
   prompt too long for the target on an idle replica is no capacity problem.

``Slo.decide`` is pure given the observed history; nothing reads a clock.
"""

from __future__ import annotations

import collections
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
    kv_fill: float = 0.9  # the KV cache share streams may hold (their contexts grow while they decode)
    prefill_tps: float = 0.0
    kv_streams: float = 0.0  # learned streams per replica the KV cache holds (0: not yet seen a filling cache)
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
        kv = s.kv_usage_sum / ready
        if kv >= 0.5 and s.running > 0:  # streams a full cache holds, at the fill a decoding fleet sustains
            full = self.kv_fill * s.running / ready / kv
            self.kv_streams = full if not self.kv_streams else self.kv_streams + self.smoothing * (
                full - self.kv_streams)
        if g.tpot_p50_s > 0 and s.running > 0:
            x, y, k = s.running / ready, g.tpot_p50_s, 1 - self.smoothing / 4
            self._n, self._x, self._y = k * self._n + 1, k * self._x + x, k * self._y + y
            self._xx, self._xy = k * self._xx + x * x, k * self._xy + x * y

    def decode_concurrency(self, tpot_s: float) -> float:
        """Streams per replica at ``tpot_s`` (from the fitted line when the samples spread, else the prior)
        and within what the KV cache holds (learned from the engines' KV usage once a cache fills)."""
        conc = self._tpot_concurrency(tpot_s)
        if self.kv_streams > 0:
            conc = min(conc, self._bound(self.kv_streams, self.prior.decode_concurrency))
        return conc

    def tpot_line(self) -> tuple[float, float] | None:
        """The fitted TPOT = a + b x streams per replica, or None while the samples cannot tell a slope (too
        few, too little spread in load, or a line with no positive intercept and slope)."""
        n = self._n
        if n < 3:
            return None
        mx, my = self._x / n, self._y / n
        var = self._xx / n - mx * mx
        if var < max(1.0, 0.01 * mx * mx):  # too little spread in load to tell a slope
            return None
        b = (self._xy / n - mx * my) / var
        a = my - b * mx
        return (a, b) if a > 0 and b > 0 else None

    def _tpot_concurrency(self, tpot_s: float) -> float:
        line = self.tpot_line()
        if line is None:
            return self.prior.decode_concurrency
        a, b = line
        return self._bound((tpot_s - a) / b, self.prior.decode_concurrency)

    def per_token_at(self, replicas: int, ready: int, token_rate: float, observed: float, ceiling: float) -> float:
        """Seconds per output token on a fleet of ``replicas`` that decodes ``token_rate`` tokens/s, now
        served by ``ready`` at ``observed`` s/token.  A larger fleet is taken at the observed figure (it is
        faster: sizing stays on the safe side); a smaller one is slower, and its streams live longer — more
        of them hold KV at once.  From the fitted line, streams S = token_rate x t and t = a + b S / n give
        t = a / (1 - token_rate b / n); without a line, the slowest the SLO allows (``ceiling``).  Within
        [``observed``, ``ceiling``]."""
        if replicas >= ready:
            return observed
        line = self.tpot_line()
        if line is None or token_rate * line[1] >= replicas:
            return ceiling
        a, b = line
        return min(ceiling, max(observed, a / (1 - token_rate * b / replicas)))


@dataclass(slots=True)
class MissFeedback:
    """A replica floor driven by the SLO misses the gateway counts — the part of the SLO that rates cannot
    predict (see the module docstring, step 6).  ``budget`` is the miss share allowed (1 - the attainment
    target); the share is judged over every request finished since one cold start after the last change
    (the replica it ordered serves by then; at least ``window_s`` of them, at most ``memory_s``): misses come
    in clumps, and a floor held longer is judged on more evidence."""

    budget: float
    window_s: float
    start_s: float
    decay_s: float
    min_finished: int = 50
    futile_ratio: float = 0.7  # a raise that leaves more than this share of the misses is given back
    memory_s: float = 3600.0   # the longest stretch a share is judged over
    floor: int = 0
    samples: collections.deque[tuple[float, int, int]] = field(default_factory=collections.deque)
    _changed_at: float = -math.inf
    _raised: bool = False
    _share_before: float = 1.0          # the miss share that ordered the last raise
    _cap: int = 0                       # a raise to this floor did not help: none again until ``_cap_until``
    _cap_until: float = -math.inf
    _lowered_from: int = 0
    _replicas: int = 0
    _doubt: bool = False                # the last raise looked futile over one window
    share: float = 0.0                  # the miss share last judged (shown with each decision)

    def observe(self, now: float, finished: int, missed: int) -> None:
        if self._changed_at == -math.inf:  # the first judgement waits for a whole window too
            self._changed_at = now - self.start_s
        self.samples.append((now, finished, missed))
        while self.samples[0][0] <= now - self.memory_s:
            self.samples.popleft()

    def update(self, now: float, replicas: int) -> int:
        """The floor after this decision (0: none).  Any scale-up (this floor's or the rate model's) restarts
        the judgement: misses from before it are being fixed already."""
        if replicas > self._replicas and self._replicas:
            self._changed_at = max(self._changed_at, now)
        self._replicas = replicas
        judge_from = self._changed_at + self.start_s
        if now < judge_from + self.window_s:
            return self.floor
        done = sum(f for t, f, _ in self.samples if t > judge_from)
        if done < self.min_finished:
            return self.floor
        share = self.share = sum(m for t, _, m in self.samples if t > judge_from) / done
        if share > self.budget:
            if self._raised and share > self.futile_ratio * self._share_before:  # the last replica did not help
                if not self._doubt:  # one window of clumped arrivals proves nothing: judge a second one
                    self._doubt, self._changed_at = True, now - self.start_s
                    return self.floor
                self._cap, self._cap_until = self.floor, now + 4 * self.decay_s
                self._set(now, self.floor - 1, raised=False)
            elif not (self.floor + 1 >= self._cap > 0 and now < self._cap_until):
                if max(self.floor, replicas) + 1 == self._lowered_from:  # lowering was wrong: wait longer next time
                    self.decay_s = min(2 * self.decay_s, 3600.0)
                self._share_before = share
                self._set(now, max(self.floor, replicas) + 1, raised=True)
        elif self.floor and share < self.budget / 2 and now - self._changed_at >= self.decay_s:
            self._lowered_from = self.floor
            self._set(now, self.floor - 1, raised=False)
        return self.floor

    def _set(self, now: float, floor: int, raised: bool) -> None:
        self.floor, self._changed_at, self._raised, self._doubt = max(0, floor), now, raised, False


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
    attainment_target: float = 0.99  # miss feedback: TPOT misses over 1 - this raise a replica floor ...
    feedback_window_s: float = 240.0  # ... judged over this window (0: no feedback) ...
    feedback_decay_s: float = 1200.0  # ... and lowered one replica after this long with half the budget
    feedback_futile_ratio: float = 0.7  # a raise that leaves more than this share of the misses is given back
    floor_follows_load: bool = True  # a miss floor is so many replicas over the rate model's count when it
    # was raised, not a fixed count: as the load falls the floor falls with it (Azure conv: a floor of 4
    # raised at a load of 3 replicas held 4 for 20 minutes after the load fell to 2)


@dataclass(slots=True)
class _RoleState:
    capacity: CapacityModel
    rate: Holt = field(default_factory=Holt)
    prompt: Holt = field(default_factory=Holt)
    osl: float = 0.0
    tpot: float = 0.0  # smoothed TPOT p50 of finished requests: how long a stream holds its slot per token
    feedback: MissFeedback | None = None
    floor_seen: int = 0   # the miss floor last decided
    floor_base: int = 0   # the rate model's count when it was last raised


class SloPolicy(Policy):
    name = "slo"

    def __init__(self, cfg: SloConfig) -> None:
        self.cfg = cfg
        self.period_s = cfg.period_s
        self.behaviour = Behaviour(scale_down_window_s=cfg.scale_down_window_s, max_down_pods=1)
        self._roles: dict[str, _RoleState] = {}
        self._ready: dict[str, int] = {}
        self._since = math.inf  # the first observation: no scale-in while the model is still warming up

    def _state(self, role: str) -> _RoleState:
        st = self._roles.get(role)
        if st is None:
            c = self.cfg
            fb = MissFeedback(1 - c.attainment_target, c.feedback_window_s, c.start_s, c.feedback_decay_s,
                              futile_ratio=c.feedback_futile_ratio) if (
                c.feedback_window_s > 0 and role != "prefill") else None
            st = self._roles[role] = _RoleState(CapacityModel(c.prior), feedback=fb)
        return st

    def observe(self, signals: Signals) -> None:
        self._since = min(self._since, signals.now)
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
            if g.tpot_p50_s > 0:
                st.tpot = g.tpot_p50_s if st.tpot == 0 else 0.9 * st.tpot + 0.1 * g.tpot_p50_s
            if self.cfg.learn:
                st.capacity.learn(s, len(s.engines))
            if st.feedback is not None:
                st.feedback.observe(signals.now, g.finished, g.slo_missed_tpot)

    def decide(self, now: float, signals: Signals, current: Mapping[str, Fleet]) -> Decision:
        desired: dict[str, int] = {}
        inputs: dict[str, float] = {}
        reasons: list[str] = []
        for role, fleet in current.items():
            n, why, figures = self._role(now, role, signals.role(role), fleet)
            desired[role] = n
            reasons.append(f"{role}: {why}")
            inputs |= {f"{role}.{k}": v for k, v in figures.items()}
        return Decision(desired, "; ".join(reasons), inputs)

    def _role(self, now: float, role: str, s: RoleSignals, fleet: Fleet) -> tuple[int, str, dict[str, float]]:
        c, st, g = self.cfg, self._state(role), s.gateway
        horizon = c.horizon_s if c.horizon_s is not None else c.start_s + c.period_s
        steps = horizon / c.period_s
        rate = max(st.rate.forecast(0), st.rate.forecast(steps))
        prompt_tps = max(st.prompt.forecast(0), st.prompt.forecast(steps))
        cap = st.capacity.prefill_tps
        drain = g.queued_prefill_tokens / max(horizon, c.ttft_s) / cap
        prefill = prompt_tps / cap + drain
        conc_cap = st.capacity.decode_concurrency(c.tpot_s)
        # Little's law: streams = arrivals/s x tokens each x seconds per token — the observed TPOT, within
        # [half, all] of the target (sizing every stream at the target overstated conv's streams by ~40 %)
        per_token = min(c.tpot_s, max(st.tpot, 0.5 * c.tpot_s)) if st.tpot else c.tpot_s
        token_rate = rate * st.osl

        def load_at(k: int) -> float:  # replicas' worth of work on a fleet of k (decode slows on a smaller one)
            t = st.capacity.per_token_at(k, fleet.ready, token_rate, per_token, c.tpot_s)
            dec = token_rate * t / conc_cap
            return {"prefill": prefill, "decode": dec}.get(role, prefill + dec)

        decode = token_rate * per_token / conc_cap
        load = {"prefill": prefill, "decode": decode}.get(role, prefill + decode)
        n = max(1, math.ceil(load / c.utilisation - 1e-9))
        why = f"load {load:.2f} replicas (prefill {prefill:.2f}, decode {decode:.2f}) at {c.utilisation:.0%}"
        if n < fleet.replicas:  # hysteresis: scale in only to a count that carries its own (slower) load with headroom
            n = next(k for k in range(1, fleet.replicas + 1)
                     if k == fleet.replicas or load_at(k) <= c.scale_in_utilisation * k)
            why = f"load {load:.2f} replicas ({load_at(n):.2f} on {n}): {n} carry it at {c.scale_in_utilisation:.0%}"
            if now - self._since < c.scale_down_window_s:  # rates and output lengths are still warming up
                n, why = fleet.replicas, f"{why}; warming up: no scale-in"
        n_rate = n
        backlog = g.queued_prefill_tokens / (max(fleet.ready, 1) * cap)
        if role != "decode" and backlog > (c.backlog_s or c.ttft_s) and fleet.starting == 0:
            n = max(n, fleet.replicas + 1)
            why = f"predicted TTFT breach: {backlog:.1f} s of queued prefill on {fleet.ready} ready: +1"
        floor = self._floor(now, st, fleet, n_rate)
        if floor > n:
            n, why = floor, f"{why}; TPOT misses over {1 - c.attainment_target:.1%}: floor {floor}"
        figures = {"rate_forecast": rate, "miss_floor": floor, "prompt_tps_forecast": prompt_tps,
                   "tpot_miss_share": st.feedback.share if st.feedback is not None else 0.0,
                   "prefill_load": prefill, "decode_load": decode, "drain_load": drain, "backlog_s": backlog,
                   "prefill_tps_per_replica": cap, "decode_concurrency_per_replica": conc_cap, "osl": st.osl,
                   "tpot_observed": st.tpot}
        return n, why, figures

    def _floor(self, now: float, st: _RoleState, fleet: Fleet, n_rate: int) -> int:
        """The miss feedback's replica floor (0: none); with ``floor_follows_load``, at most the rate model's
        count now plus what the floor stood over it when it was raised."""
        if st.feedback is None:
            return 0
        floor = st.feedback.update(now, fleet.replicas)
        if floor > st.floor_seen:
            st.floor_base = n_rate
        st.floor_seen = floor
        if floor and self.cfg.floor_follows_load:
            floor = min(floor, n_rate + floor - st.floor_base)
        return floor
