"""The autoscaler's decision core: a :class:`Policy` recommends, the :class:`Scaler` stabilises, clamps and
applies through an :class:`Actuator`.  One core for the simulator, ``kvmesh up --autoscale`` and Kubernetes.

Control loop (level-triggered, as a Kubernetes controller): every ``interval_s`` the actuator's loop hands
:meth:`Scaler.tick` the interval's :class:`~kvmesh.autoscale.signals.Signals`.  The scaler

1. lets the policy ``observe`` them (every tick: windows and forecasts need every sample);
2. every ``policy.period_s`` asks it to ``decide``: a :class:`Decision` (desired replicas per role, a reason,
   the inputs behind it), given the :class:`Fleet` per role — replicas that exist and those serving;
3. applies the policy's :class:`Behaviour`: a scale-down is stabilised (the desired count is the **highest**
   recommendation of the last ``scale_down_window_s``, so one quiet interval never removes capacity) and
   held off ``scale_down_delay_s`` after any scale-up; a scale-up may be limited to ``max_up_rate`` times
   the current count; then clamps to ``[min_replicas, max_replicas]``;
4. calls ``actuator.scale(role, n, victims)`` when ``n`` differs from the replicas that exist, and records
   the decision (kept for ``/debug/autoscale``, logged, countable as metrics).

Cold start: a started replica serves only ``start_s`` later.  Policies compare what they need with
``Fleet.replicas`` (which counts replicas still starting), never with ``Fleet.ready`` alone — otherwise every
tick of a cold start would order the same replicas again.  Scale-in cancels starting replicas first (they
hold no cache and serve nothing), then drains the ``victims`` the :class:`VictimChooser` ranks first.

Nothing here touches a clock, a process or the network: the actuator owns time and side effects, so the
simulator makes exactly the decisions a deployment makes.
"""

from __future__ import annotations

import collections
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from kvmesh.autoscale.signals import AGGREGATED, Signals

log = logging.getLogger("kvmesh.autoscale")


@dataclass(frozen=True, slots=True)
class Fleet:
    """One role's replicas: ``replicas`` exist (starting or serving; draining ones are gone already),
    ``ready`` of them serve."""

    replicas: int
    ready: int

    @property
    def starting(self) -> int:
        return self.replicas - self.ready


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's recommendation: desired replicas per role, why, and the figures it used."""

    desired: dict[str, int]
    reason: str
    inputs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a policy's recommendations become replica counts (Kubernetes HPA ``behavior`` vocabulary)."""

    scale_down_window_s: float = 0.0  # scale down to the highest recommendation of this window
    scale_down_delay_s: float = 0.0   # no scale-down this long after a scale-up
    max_up_rate: float = 0.0          # > 0: a scale-up goes at most to ceil(rate * replicas) ...
    max_up_pods: int = 1              # ... or replicas + max_up_pods, whichever is more
    max_down_pods: int = 0            # > 0: a scale-down removes at most this many at once


@dataclass(frozen=True, slots=True)
class Capacity:
    """What one replica serves within the SLO: prompt tokens/s (prefill) and concurrent decoding streams
    at the TPOT target.  Profiled offline (``kvmesh calibrate``, the simulator) or learned online."""

    prefill_tps: float
    decode_concurrency: float
    tpot_s: float = 0.05

    @property
    def decode_tps(self) -> float:
        """Tokens/s one replica generates at the TPOT target (Dynamo's decode throughput per replica)."""
        return self.decode_concurrency / self.tpot_s


class Policy(ABC):
    """Recommends replica counts.  Stateful (windows, forecasts, learned capacity); driven by one Scaler.

    ``observe`` is called every tick, ``decide`` every ``period_s`` (after that tick's ``observe``).
    ``decide`` returns a count for each role in ``current`` (a role it omits keeps its count) and must not
    call the actuator.
    """

    name: ClassVar[str] = ""
    period_s: float = 15.0
    behaviour: Behaviour = Behaviour()

    def observe(self, signals: Signals) -> None:  # noqa: B027 - optional hook, most policies need no samples
        """Record one tick's signals (default: nothing)."""

    @abstractmethod
    def decide(self, now: float, signals: Signals, current: Mapping[str, Fleet]) -> Decision: ...


class Actuator(Protocol):
    """Makes replica counts real.  Implementations: ``kvmesh.sim.elastic.ElasticCluster`` (virtual time),
    the local supervisor, Kubernetes (each role's scale subresource).

    Contract: ``scale`` is level-triggered and idempotent (asking for the count that exists does nothing).
    Scaling out starts replicas that serve only after their cold start (and, cache-aware, a pre-warm).
    Scaling in first cancels replicas still starting, then drains ``victims`` in order (then any others):
    a draining replica takes no new request, its in-flight requests finish (streams are never cut), and it
    no longer counts in ``replicas``.  No accepted request may fail because of a scale event.
    """

    def replicas(self, role: str) -> int:
        """Replicas that exist for ``role``: starting or serving, not draining."""
        ...

    def ready(self, role: str) -> int:
        """Replicas of ``role`` that serve (started, pre-warmed)."""
        ...

    def members(self, role: str) -> list[str]:
        """Names of the serving replicas of ``role`` (the candidates a victim is chosen among)."""
        ...

    def scale(self, role: str, n: int, victims: Sequence[str] = ()) -> None:
        """Make ``n`` replicas of ``role`` exist (see the class docstring)."""
        ...


class VictimChooser(Protocol):
    """Ranks serving replicas for scale-in: the first ``k`` of the returned list are drained first."""

    def __call__(self, role: str, members: list[str], k: int) -> list[str]: ...


def newest_first(role: str, members: list[str], k: int) -> list[str]:
    """The default victim choice (Kubernetes' own preference: the youngest replica goes first)."""
    return list(reversed(members))[:k]


@dataclass(frozen=True, slots=True)
class ScalerConfig:
    min_replicas: int = 1
    max_replicas: int = 4
    roles: tuple[str, ...] = (AGGREGATED,)
    interval_s: float = 5.0  # the control tick (the actuator's loop calls tick this often)
    start_s: float = 60.0    # cold start: a started replica serves this much later

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")
        if self.interval_s <= 0 or self.start_s < 0:
            raise ValueError("interval_s must be > 0 and start_s >= 0")


@dataclass(frozen=True, slots=True)
class Record:
    """One applied decision of one role, as ``/debug/autoscale`` shows it."""

    now: float
    role: str
    replicas: int     # before
    ready: int
    recommended: int  # the policy's figure
    desired: int      # after behaviour and bounds; what the actuator was asked for
    reason: str
    inputs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scaler:
    """Drives one policy against one actuator (see the module docstring).  Not thread-safe."""

    def __init__(self, policy: Policy, actuator: Actuator, cfg: ScalerConfig | None = None,
                 victims: VictimChooser = newest_first, history: int = 512,
                 held: Callable[[str], int] = lambda role: 0) -> None:
        self.policy, self.actuator, self.cfg, self.victims = policy, actuator, cfg or ScalerConfig(), victims
        self.held = held  # requests held for want of a ready replica of the role (scale to zero)
        self.history: collections.deque[Record] = collections.deque(maxlen=history)
        self.scale_events = collections.Counter[str]()  # "up" / "down" -> count
        self._next_decide = -math.inf
        self._recs: dict[str, collections.deque[tuple[float, int]]] = {
            r: collections.deque() for r in self.cfg.roles}
        self._last_up: dict[str, float] = dict.fromkeys(self.cfg.roles, -math.inf)

    def tick(self, signals: Signals) -> list[Record]:
        """Observe; decide if due; apply.  Returns the records of roles whose decision was made this tick."""
        self.policy.observe(signals)
        now = signals.now
        if now < self._next_decide:
            return []
        self._next_decide = now + self.policy.period_s - 1e-9
        current = {r: Fleet(self.actuator.replicas(r), self.actuator.ready(r)) for r in self.cfg.roles}
        decision = self.policy.decide(now, signals, current)
        out = []
        for role, fleet in current.items():
            rec = decision.desired.get(role, fleet.replicas)
            n = self._behave(now, role, rec, fleet.replicas)
            if fleet.ready == 0 and self.held(role):
                # the policies size on the ready replicas' metrics, blind while none is ready: never cancel
                # the replica the held requests wait for (they would time out, and the next one wake it again)
                n = max(n, 1)
            record = Record(now, role, fleet.replicas, fleet.ready, rec, n, decision.reason, dict(decision.inputs))
            self.history.append(record)
            out.append(record)
            if n != fleet.replicas:
                self._apply(now, role, n, fleet)
        return out

    def wake(self, role: str, now: float) -> None:
        """A request is held and ``role`` has no replica at all (scale to zero): start one now, not at the
        next decision — as a scale-up of the scaler's own, so the scale-down window and delay count it."""
        fleet = Fleet(self.actuator.replicas(role), self.actuator.ready(role))
        if fleet.replicas:
            return
        self._recs[role].append((now, 1))
        self.history.append(Record(now, role, 0, 0, 1, 1, "a request is held with no replica", {}))
        self._apply(now, role, 1, fleet)

    def _behave(self, now: float, role: str, rec: int, have: int) -> int:
        b, cfg = self.policy.behaviour, self.cfg
        window = self._recs[role]
        if not window:  # the first decision: the count that exists stands for the window before it
            window.append((now, have))
        window.append((now, rec))
        while window and window[0][0] < now - b.scale_down_window_s - 1e-9:
            window.popleft()
        n = rec
        if n < have:
            n = min(have, max(r for _, r in window))
            if b.max_down_pods:
                n = max(n, have - b.max_down_pods)
            if now - self._last_up[role] < b.scale_down_delay_s:
                n = have
        elif n > have and b.max_up_rate > 0:
            n = min(n, max(have + b.max_up_pods, math.ceil(b.max_up_rate * have)))
        return max(cfg.min_replicas, min(cfg.max_replicas, n))

    def _apply(self, now: float, role: str, n: int, fleet: Fleet) -> None:
        victims: list[str] = []
        if n < fleet.replicas:
            k = fleet.replicas - n - fleet.starting  # starting replicas are cancelled first
            if k > 0:
                victims = self.victims(role, self.actuator.members(role), k)[:k]
            self.scale_events["down"] += 1
        else:
            self._last_up[role] = now
            self.scale_events["up"] += 1
        log.info("autoscale %s: %d -> %d replicas (%s) victims=%s", role, fleet.replicas, n,
                 self.policy.name, victims)
        self.actuator.scale(role, n, victims)

    def snapshot(self, last: int = 50) -> dict[str, Any]:
        """What ``/debug/autoscale`` shows: the policy, bounds, scale events and the latest records."""
        return {"policy": self.policy.name, "period_s": self.policy.period_s,
                "behaviour": asdict(self.policy.behaviour), "config": asdict(self.cfg),
                "scale_events": dict(self.scale_events),
                "decisions": [r.to_dict() for r in list(self.history)[-last:]]}
