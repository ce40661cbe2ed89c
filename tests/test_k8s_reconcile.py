"""Reconcile as a pure function: spec + observed objects → desired objects, deletions, status, events."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from kvmesh.k8s.api import ModelService
from kvmesh.k8s.reconcile import Observed, ObservedPod, ObservedWorkload, Result, Settings, reconcile, rfc3339
from kvmesh.sim.server import DRAIN_S as SIM_DRAIN_S

T0 = 1_700_000_000.0
BASE: dict[str, Any] = {"model": {"name": "m", "source": "pvc://models/m"}, "roles": {"aggregated": {"replicas": 2}}}


def ms(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, deleting: bool = False,
       generation: int = 1) -> ModelService:
    meta: dict[str, Any] = {"name": "m", "namespace": "ml", "uid": "u", "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return ModelService.from_object({"metadata": meta, "spec": spec or BASE, "status": status or {}})


def kinds(r: Result) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in r.apply]


def cond(r: Result, t: str) -> tuple[str, str, str]:
    c = next(c for c in r.status.conditions if c.type == t)
    return c.status, c.reason, c.message


def test_fresh_model_service_creates_everything_owned_and_is_idempotent() -> None:
    r1 = reconcile(ms(), Observed(), T0)
    assert ("Deployment", "m-engine") in kinds(r1) and ("DaemonSet", "m-cache") in kinds(r1)
    assert ("Deployment", "m-gateway") in kinds(r1) and ("PodDisruptionBudget", "m-gateway") in kinds(r1)
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "u" for o in r1.apply)
    assert r1.delete == []
    assert cond(r1, "Ready")[:2] == ("False", "GatewayNotReady")
    # restarted operator, objects half created: the same full set is applied again (SSA creates no duplicates)
    half = Observed(owned=frozenset(kinds(r1)[:4]))
    r2 = reconcile(ms(), half, T0 + 5)
    assert r2.apply == r1.apply and r2.delete == []


def test_ready_when_engines_and_gateway_are() -> None:
    obs = Observed(workloads=(ObservedWorkload("Deployment", "m-engine", 2),
                              ObservedWorkload("Deployment", "m-gateway", 2)))
    r = reconcile(ms(), obs, T0)
    assert cond(r, "Ready")[:2] == ("True", "AllReplicasReady")
    assert cond(r, "Progressing")[:2] == ("False", "Complete")
    assert cond(r, "Degraded")[:2] == ("False", "AsExpected")
    assert (r.status.replicas, r.status.ready_replicas, r.status.observed_generation) == (2, 2, 1)
    assert r.status.gateway_endpoint == "http://m-gateway.ml.svc:80"
    # a second run keeps lastTransitionTime and emits no new events
    again = reconcile(ms(status=r.status.model_dump(by_alias=True)), obs, T0 + 60)
    assert again.status.conditions == r.status.conditions and again.events == []


def test_gpu_shortage_is_a_condition_and_an_event() -> None:
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available"
    pods = tuple(ObservedPod(f"p{i}", scheduled=i < 2, ready=i < 2, unschedulable=None if i < 2 else msg)
                 for i in range(4))
    spec = {**BASE, "roles": {"aggregated": {"replicas": 4}}}
    r = reconcile(ms(spec), Observed(workloads=(ObservedWorkload("Deployment", "m-engine", 2),), pods=pods), T0)
    assert cond(r, "Degraded") == ("True", "InsufficientResources",
                                   "2 of 4 replicas Pending: insufficient nvidia.com/gpu")
    assert cond(r, "Progressing")[:2] == ("False", "Stalled")
    assert [e.reason for e in r.events if e.type == "Warning"] == ["InsufficientResources"]


def test_spec_changes_follow_through() -> None:
    r = reconcile(ms({**BASE, "roles": {"aggregated": {"replicas": 5}}, "gateway": {"replicas": 3}}), Observed(), T0)
    by = {(o["kind"], o["metadata"]["name"]): o for o in r.apply}
    assert by[("Deployment", "m-engine")]["spec"]["replicas"] == 5
    assert by[("Deployment", "m-gateway")]["spec"]["replicas"] == 3
    # cache disabled: its DaemonSet and Service, once owned, are deleted
    owned = frozenset({("DaemonSet", "m-cache"), ("Service", "m-cache"), ("Deployment", "m-engine")})
    r2 = reconcile(ms({**BASE, "cache": {"enabled": False}}), Observed(owned=owned), T0)
    assert r2.delete == [("DaemonSet", "m-cache"), ("Service", "m-cache")]


def test_deletion_leaves_it_to_garbage_collection() -> None:
    r = reconcile(ms(deleting=True), Observed(owned=frozenset({("Deployment", "m-engine")})), T0)
    assert r.apply == [] and r.delete == []


GROUPED = {**BASE, "engine": {"gpus": 4, "tensorParallelSize": 8, "podsPerReplica": 2},
           "roles": {"aggregated": {"replicas": 2}}}
CFG = Settings(group_timeout_s=300, rollback_backoff_s=60)


def sts(r: Result) -> list[str]:
    return [n for k, n in kinds(r) if k == "StatefulSet"]


def test_groups_are_placed_one_at_a_time() -> None:
    r = reconcile(ms(GROUPED), Observed(), T0, CFG)
    assert sts(r) == ["m-engine-g0"]  # g1 waits until g0 is whole
    assert [(g.index, g.phase) for g in r.status.groups] == [(0, "Placing")]
    placed = Observed(workloads=(ObservedWorkload("StatefulSet", "m-engine-g0", 2, T0, group=0),),
                      pods=(ObservedPod("a", 0, True, True), ObservedPod("b", 0, True, True)))
    r2 = reconcile(ms(GROUPED, r.status.model_dump(by_alias=True)), placed, T0 + 30, CFG)
    assert sts(r2) == ["m-engine-g0", "m-engine-g1"]
    assert [(g.index, g.phase) for g in r2.status.groups] == [(0, "Placed"), (1, "Placing")]
    assert r2.status.ready_replicas == 1


def test_a_group_not_bound_in_time_is_rolled_back_whole_then_retried() -> None:
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    half = Observed(owned=frozenset({("StatefulSet", "m-engine-g0")}),
                    workloads=(ObservedWorkload("StatefulSet", "m-engine-g0", 0, T0, group=0),),
                    pods=(ObservedPod("a", 0, False, True), ObservedPod("b", 0, False, False, msg)))
    early = reconcile(ms(GROUPED), half, T0 + 100, CFG)
    assert sts(early) == ["m-engine-g0"] and early.delete == [] and early.requeue_after_s == 200
    late = reconcile(ms(GROUPED), half, T0 + 300, CFG)
    assert ("StatefulSet", "m-engine-g0") in late.delete and sts(late) == []
    assert late.status.groups[0].phase == "RolledBack" and late.status.groups[0].rollbacks == 1
    assert any(e.reason == "GroupRolledBack" and "1 of 2 pods bound (insufficient nvidia.com/gpu)" in e.message
               for e in late.events)
    # within the backoff nothing is recreated; after it the group is tried again
    gone = Observed()
    st = late.status.model_dump(by_alias=True)
    assert sts(reconcile(ms(GROUPED, st), gone, T0 + 330, CFG)) == []
    retry = reconcile(ms(GROUPED, st), gone, T0 + 361, CFG)
    assert sts(retry) == ["m-engine-g0"] and retry.status.groups[0].rollbacks == 1


def test_scaling_groups_down_deletes_the_extra_groups() -> None:
    obs = Observed(workloads=tuple(ObservedWorkload("StatefulSet", f"m-engine-g{i}", 2, T0, group=i)
                                   for i in range(2)),
                   pods=tuple(ObservedPod(f"p{i}{j}", i, True, True) for i in range(2) for j in range(2)))
    spec = {**GROUPED, "roles": {"aggregated": {"replicas": 1}}}
    r = reconcile(ms(spec), obs, T0 + 10, CFG)
    assert ("StatefulSet", "m-engine-g1") in r.delete and sts(r) == ["m-engine-g0"]


def _flag(args: list[str], name: str) -> int:
    return int(args[args.index(name) + 1])


@pytest.mark.parametrize("spec", [BASE, GROUPED, {**BASE, "engine": {"kind": "sim", "gpus": 0}}],
                         ids=["vllm", "vllm-group", "sim"])
def test_engine_pods_drain_in_flight_requests_on_termination(spec: dict[str, Any]) -> None:
    # scale-in/rollout: preStop sleeps while gateways see the endpoint terminate, then SIGTERM makes vLLM drain
    # (--shutdown-timeout; its default 0 aborts every stream) — all within the pod's grace period
    r = reconcile(ms(spec), Observed(), T0, CFG)
    workload = next(o for o in r.apply if o["kind"] in ("Deployment", "StatefulSet") and "-engine" in
                    o["metadata"]["name"])
    for version in ("1.29.0", "1.37.0"):  # oldest and newest supported, as in test_k8s_schema
        kubernetes_validate.validate(workload, version, strict=True)
    pod = workload["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 1
    if spec.get("engine", {}).get("kind") == "sim":
        drain = SIM_DRAIN_S
        assert "--shutdown-timeout" not in c["args"]  # not a flag of the simulated engine: it drains by itself
    else:
        drain = _flag(c["args"], "--shutdown-timeout")
        assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + drain


def test_status_times_are_rfc3339() -> None:
    assert rfc3339(T0) == "2023-11-14T22:13:20Z"
