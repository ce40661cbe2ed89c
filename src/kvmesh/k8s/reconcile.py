"""Reconcile, as a pure function: a ModelService and the objects observed → desired objects, deletions, status.

Level-triggered: :func:`reconcile` reads only its arguments — never which event woke the operator — so
running it twice on the same observation gives the same result, and an operator restarted with objects half
created simply applies the rest (server-side apply of the full desired set creates nothing twice).

**Group placement (built by the operator, not LeaderWorkerSet/Volcano).**  A replica spanning several pods
(``podsPerReplica > 1``) is a group, one StatefulSet with parallel pod start.  All-or-nothing: a group whose
pods are not all scheduled within ``group_timeout_s`` of its creation is rolled back whole (its StatefulSet
deleted, freeing the GPUs its bound pods held) and retried after ``rollback_backoff_s``.  At most one group is
being placed at a time, so two half-placed groups can never hold each other's GPUs.  Status records each
group's phase and when it began, which is all the memory the reconcile needs between runs.

Conditions say what to do: ``Degraded`` with reason ``InsufficientResources`` names the resource the scheduler
lacked ("2 of 4 replicas Pending: insufficient nvidia.com/gpu"); events are emitted on transitions only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kvmesh.k8s import naming as n
from kvmesh.k8s.api import Condition, GroupStatus, ModelService, ModelServiceStatus, RoleStatus
from kvmesh.k8s.objects import Images, model_service_objects

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ObservedPod:
    name: str
    group: int | None = None
    ready: bool = False
    scheduled: bool = False
    unschedulable: str | None = None  # the scheduler's message when PodScheduled is False/Unschedulable


@dataclass(frozen=True, slots=True)
class ObservedWorkload:
    kind: str  # Deployment, StatefulSet, DaemonSet
    name: str
    ready_replicas: int = 0
    created_at: float = 0.0  # epoch seconds
    group: int | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """What the operator found owned by one ModelService (all of it; missing means absent)."""

    owned: frozenset[tuple[str, str]] = frozenset()  # (kind, name)
    workloads: tuple[ObservedWorkload, ...] = ()
    pods: tuple[ObservedPod, ...] = ()  # engine pods

    def workload(self, kind: str, name: str) -> ObservedWorkload | None:
        return next((w for w in self.workloads if w.kind == kind and w.name == name), None)


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(slots=True)
class Result:
    apply: list[Obj]
    delete: list[tuple[str, str]]  # (kind, name)
    status: ModelServiceStatus
    events: list[Event] = field(default_factory=list)
    requeue_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    images: Images = field(default_factory=Images)
    group_timeout_s: float = 300.0
    rollback_backoff_s: float = 60.0


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() if s else 0.0


@dataclass(slots=True)
class _Groups:
    render: list[int] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    status: list[GroupStatus] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after_s: float | None = None
    ready: int = 0

    def wake(self, after: float) -> None:
        self.requeue_after_s = after if self.requeue_after_s is None else min(self.requeue_after_s, after)


def plan_groups(ms: ModelService, obs: Observed, now: float, cfg: Settings) -> _Groups:
    """Which groups to keep, create, roll back or delete (see the module docstring)."""
    out, size = _Groups(), ms.spec.engine.pods_per_replica
    prev = {g.index: g for g in ms.status.groups}
    existing = {w.group: w for w in obs.workloads if w.kind == "StatefulSet" and w.group is not None}
    placing = False
    for i in range(ms.spec.roles.aggregated.replicas):
        w, last = existing.get(i), prev.get(i)
        pods = [p for p in obs.pods if p.group == i]
        if w is not None:
            if sum(p.scheduled for p in pods) >= size:
                out.render.append(i)
                out.status.append(_phase(last, i, "Placed", now))
                out.ready += w.ready_replicas >= size
            elif now - w.created_at >= cfg.group_timeout_s:
                out.delete.append(w.name)
                rb = (last.rollbacks if last else 0) + 1
                out.status.append(GroupStatus(index=i, phase="RolledBack", since=rfc3339(now), rollbacks=rb))
                out.events.append(Event("Warning", "GroupRolledBack", f"group {i}: {_why(pods, size)} after "
                                        f"{cfg.group_timeout_s:.0f}s; rolled back, retry in "
                                        f"{cfg.rollback_backoff_s:.0f}s"))
                out.wake(cfg.rollback_backoff_s)
                placing = True  # the freed GPUs wait out the backoff too: no other group starts meanwhile
            else:
                placing = True
                out.render.append(i)
                out.status.append(_phase(last, i, "Placing", now))
                out.wake(max(1.0, w.created_at + cfg.group_timeout_s - now))
        elif last is not None and last.phase == "RolledBack" and now < parse_time(last.since) + cfg.rollback_backoff_s:
            placing = True
            out.status.append(last)
            out.wake(parse_time(last.since) + cfg.rollback_backoff_s - now)
        elif not placing:  # one group in flight at a time: half-placed groups cannot deadlock on GPUs
            placing = True
            out.render.append(i)
            out.status.append(GroupStatus(index=i, phase="Placing", since=rfc3339(now),
                                          rollbacks=last.rollbacks if last else 0))
            out.wake(cfg.group_timeout_s)
        elif last is not None:
            out.status.append(last)
    out.delete += [w.name for g, w in existing.items() if g >= ms.spec.roles.aggregated.replicas]
    return out


def _phase(last: GroupStatus | None, i: int, phase: str, now: float) -> GroupStatus:
    if last is not None and last.phase == phase:
        return last
    return GroupStatus(index=i, phase=phase, since=rfc3339(now),  # type: ignore[arg-type]
                       rollbacks=last.rollbacks if last else 0)


def _why(pods: list[ObservedPod], size: int) -> str:
    bound = sum(p.scheduled for p in pods)
    lacking = _insufficient(pods)
    return f"{bound} of {size} pods bound" + (f" (insufficient {lacking})" if lacking else "")


_INSUFFICIENT = re.compile(r"Insufficient ([\w./-]*\w)")


def _insufficient(pods: list[ObservedPod]) -> str:
    found = sorted({m for p in pods if p.unschedulable for m in _INSUFFICIENT.findall(p.unschedulable)})
    return ", ".join(found)


def reconcile(ms: ModelService, obs: Observed, now: float, cfg: Settings = Settings()) -> Result:
    """Desired objects, deletions and status for ``ms`` given what was observed at ``now``."""
    if ms.deleting:  # ownerReferences let garbage collection delete everything; nothing to write
        return Result(apply=[], delete=[], status=ms.status)
    grouped = ms.spec.engine.pods_per_replica > 1
    groups = plan_groups(ms, obs, now, cfg) if grouped else _Groups()
    desired = model_service_objects(ms, cfg.images, groups=groups.render if grouped else None)
    names = {(o["kind"], o["metadata"]["name"]) for o in desired}
    stale = sorted(k for k in obs.owned if k not in names)
    delete = sorted({*stale, *(("StatefulSet", g) for g in groups.delete)})
    status, events = _status(ms, obs, now, groups)
    return Result(apply=desired, delete=delete, status=status, events=groups.events + events,
                  requeue_after_s=groups.requeue_after_s)


def _ready_replicas(ms: ModelService, obs: Observed, groups: _Groups) -> int:
    if ms.spec.engine.pods_per_replica > 1:
        return groups.ready
    w = obs.workload("Deployment", n.engine_name(ms.name))
    return min(w.ready_replicas, ms.spec.roles.aggregated.replicas) if w else 0


def _status(ms: ModelService, obs: Observed, now: float, groups: _Groups) -> tuple[ModelServiceStatus, list[Event]]:
    desired = ms.spec.roles.aggregated.replicas
    ready = _ready_replicas(ms, obs, groups)
    gw = obs.workload("Deployment", n.gateway_name(ms.name))
    gw_ready = gw.ready_replicas if gw else 0
    conds = _conditions(ms, obs, desired, ready, gw_ready, groups)
    old = {c.type: c for c in ms.status.conditions}
    stamped = [_stamp(c, old.get(c.type), ms.generation, now) for c in conds]
    events = [Event("Warning" if c.type == "Degraded" else "Normal", c.reason, c.message)
              for c in stamped if c.status == "True" and (c.type not in old or old[c.type].reason != c.reason
                                                          or old[c.type].status != c.status)]
    sel = ",".join(f"{k}={v}" for k, v in n.selector(ms.name, "engine").items())
    status = ModelServiceStatus(
        observed_generation=ms.generation, conditions=stamped,
        roles={"aggregated": RoleStatus(desired=desired, ready=ready)}, replicas=desired, ready_replicas=ready,
        selector=sel, groups=groups.status,
        gateway_endpoint=f"http://{n.gateway_name(ms.name)}.{ms.namespace}.svc:{ms.spec.gateway.port}")
    return status, events


def _conditions(ms: ModelService, obs: Observed, desired: int, ready: int, gw_ready: int,
                groups: _Groups) -> list[Condition]:
    pending = [p for p in obs.pods if not p.scheduled and p.unschedulable]
    lacking = _insufficient(pending)
    rolled = [g for g in groups.status if g.phase == "RolledBack"]
    if pending:
        what = f"insufficient {lacking}" if lacking else (pending[0].unschedulable or "unschedulable")
        unit = "replicas" if ms.spec.engine.pods_per_replica == 1 else "pods"
        degraded = _c("Degraded", "True", "InsufficientResources", f"{len(pending)} of "
                      f"{desired * ms.spec.engine.pods_per_replica} {unit} Pending: {what}")
    elif rolled:
        degraded = _c("Degraded", "True", "GroupRolledBack", f"{len(rolled)} group(s) could not be placed whole "
                      "and were rolled back; retrying")
    else:
        degraded = _c("Degraded", "False", "AsExpected", "")
    if ready >= desired and gw_ready > 0:
        ok = _c("Ready", "True", "AllReplicasReady", f"{ready}/{desired} replicas ready, gateway serving")
    elif gw_ready == 0:
        ok = _c("Ready", "False", "GatewayNotReady", f"{ready}/{desired} replicas ready; no gateway pod ready")
    else:
        ok = _c("Ready", "False", "ReplicasNotReady", f"{ready}/{desired} replicas ready")
    if ready == desired:
        progressing = _c("Progressing", "False", "Complete", f"{desired} replicas")
    elif pending:
        progressing = _c("Progressing", "False", "Stalled", degraded.message)
    else:
        progressing = _c("Progressing", "True", "ScalingUp" if ready < desired else "ScalingDown",
                         f"{ready} ready, {desired} desired")
    return [ok, progressing, degraded]


def _c(type_: str, status: str, reason: str, message: str) -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message)  # type: ignore[arg-type]


def _stamp(c: Condition, old: Condition | None, generation: int, now: float) -> Condition:
    """lastTransitionTime moves only when the status does (Kubernetes' convention)."""
    since = old.last_transition_time if old is not None and old.status == c.status else rfc3339(now)
    return c.model_copy(update={"observed_generation": generation, "last_transition_time": since})


def invalid_spec_status(ms_status: dict[str, Any], generation: int, error: str, now: float) -> ModelServiceStatus:
    """The status of a ModelService whose spec does not validate: nothing is applied, Degraded says why."""
    old = ModelServiceStatus.model_validate(ms_status or {})
    bad = _stamp(_c("Degraded", "True", "InvalidSpec", error[:1000]),
                 next((c for c in old.conditions if c.type == "Degraded"), None), generation, now)
    return old.model_copy(update={"observed_generation": generation,
                                  "conditions": [c for c in old.conditions if c.type != "Degraded"] + [bad]})
