"""``kvmesh operator``: the thin layer between the API server and :func:`kvmesh.k8s.reconcile.reconcile`.

**Framework: kubernetes_asyncio (the official client's async twin), not kopf.**  kopf is built around
event handlers (on.create / on.update with diffs) and keeps its own progress in annotations on the object; a
level-triggered reconcile needs neither, only "something changed for ModelService X" → read everything →
apply.  kubernetes_asyncio gives the official models and watch protocol, and its dynamic client does
server-side apply with one field manager, so this file is only: watch → work queue → observe → reconcile →
apply/delete → status → events.  Everything that can be decided without the API server is in ``reconcile``.

Watches: ModelServices, and the workloads/pods labelled ``app.kubernetes.io/managed-by=kvmesh-operator``
(mapped back to their ModelService by label).  A key is queued once however many events arrive; a full
resync every ``resync_s`` catches anything a watch missed.  One operator replica runs at a time (the install
Deployment uses ``Recreate``).  kubernetes_asyncio is imported lazily: it is the ``k8s`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kvmesh.k8s import naming as n
from kvmesh.k8s.api import API_VERSION, KIND, ModelService
from kvmesh.k8s.reconcile import (
    Event,
    Observed,
    ObservedPod,
    ObservedWorkload,
    Settings,
    invalid_spec_status,
    reconcile,
)

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
_API = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1", "Service": "v1",
        "ConfigMap": "v1", "ServiceAccount": "v1", "PodDisruptionBudget": "policy/v1",
        "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1"}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def observe_pod(pod: dict[str, Any]) -> ObservedPod:
    """An engine pod's scheduling and readiness, from its JSON."""
    conds = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    sched = conds.get("PodScheduled", {})
    group = pod["metadata"].get("labels", {}).get(n.LABEL_GROUP)
    return ObservedPod(name=pod["metadata"]["name"], group=int(group) if group is not None else None,
                       ready=conds.get("Ready", {}).get("status") == "True",
                       scheduled=sched.get("status") == "True",
                       unschedulable=sched.get("message") if sched.get("reason") == "Unschedulable" else None)


def observe_workload(kind: str, obj: dict[str, Any]) -> ObservedWorkload:
    meta, status = obj["metadata"], obj.get("status") or {}
    created = meta.get("creationTimestamp") or ""
    group = meta.get("labels", {}).get(n.LABEL_GROUP)
    ready = status.get("numberReady" if kind == "DaemonSet" else "readyReplicas") or 0
    return ObservedWorkload(kind=kind, name=meta["name"], ready_replicas=int(ready),
                            created_at=_epoch(created), group=int(group) if group is not None else None)


def _epoch(ts: str) -> float:
    from kvmesh.k8s.reconcile import parse_time

    return parse_time(ts.replace(".000000", "")) if ts else 0.0


@dataclass
class Operator:
    settings: Settings
    namespace: str | None = None  # None: every namespace
    resync_s: float = 60.0

    async def run(self) -> None:
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import ApiClient
        from kubernetes_asyncio.dynamic import DynamicClient

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config()
        async with ApiClient() as api:
            self.dyn = await DynamicClient(api)
            self.queue: asyncio.Queue[Key] = asyncio.Queue()
            self.queued: set[Key] = set()
            tasks = [asyncio.create_task(self._watch(API_VERSION, KIND, None))]
            tasks += [asyncio.create_task(self._watch(_API[k], k, f"app.kubernetes.io/managed-by={n.MANAGED_BY}"))
                      for k in WORKLOADS]
            tasks += [asyncio.create_task(self._watch("v1", "Pod", f"{n.LABEL_COMPONENT}=engine")),
                      asyncio.create_task(self._resync()), asyncio.create_task(self._worker())]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()

    def enqueue(self, key: Key, after: float = 0.0) -> None:
        if after > 0:
            asyncio.get_running_loop().call_later(after, self.enqueue, key)
        elif key not in self.queued:
            self.queued.add(key)
            self.queue.put_nowait(key)

    async def _resource(self, api_version: str, kind: str) -> Any:
        return await self.dyn.resources.get(api_version=api_version, kind=kind)

    async def _watch(self, api_version: str, kind: str, selector: str | None) -> None:
        res = await self._resource(api_version, kind)
        while True:
            try:
                async for ev in self.dyn.watch(res, namespace=self.namespace, label_selector=selector):
                    obj = ev["raw_object"]
                    meta = obj.get("metadata", {})
                    name = meta.get("name") if kind == KIND else meta.get("labels", {}).get(n.LABEL_MS)
                    if name:
                        self.enqueue((meta.get("namespace", "default"), name))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an expired watch (410) or a dropped connection: watch again
                log.info("watch of %s ended (%s); restarting", kind, e)
                await asyncio.sleep(1.0)

    async def _resync(self) -> None:
        res = await self._resource(API_VERSION, KIND)
        while True:
            items = (await self.dyn.get(res, namespace=self.namespace)).to_dict().get("items", [])
            for obj in items:
                self.enqueue((obj["metadata"]["namespace"], obj["metadata"]["name"]))
            await asyncio.sleep(self.resync_s)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            self.queued.discard(key)
            try:
                await self.reconcile_one(*key)
            except Exception:
                log.exception("reconcile of %s/%s failed; retrying in 10 s", *key)
                self.enqueue(key, 10.0)

    async def reconcile_one(self, namespace: str, name: str) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        res = await self._resource(API_VERSION, KIND)
        try:
            obj = (await self.dyn.get(res, name=name, namespace=namespace)).to_dict()
        except ApiException as e:
            if e.status == 404:
                return  # deleted: garbage collection removes what it owned
            raise
        try:
            ms = ModelService.from_object(obj)
        except ValidationError as e:
            status = invalid_spec_status(obj.get("status") or {}, obj["metadata"].get("generation", 1), str(e),
                                         time.time())
            await self._write_status(namespace, name, status.model_dump(by_alias=True))
            return
        result = reconcile(ms, await self.observe(ms), time.time(), self.settings)
        for o in result.apply:
            await self.dyn.server_side_apply(await self._resource(o["apiVersion"], o["kind"]), body=o,
                                             namespace=namespace, field_manager=n.FIELD_MANAGER,
                                             force_conflicts=True)
        for kind, obj_name in result.delete:
            await self.dyn.delete(await self._resource(_API[kind], kind), name=obj_name, namespace=namespace,
                                  body={"propagationPolicy": "Background"})
        await self._write_status(namespace, name, result.status.model_dump(by_alias=True))
        for ev in result.events:
            await self._event(ms, ev)
        if result.requeue_after_s is not None:
            self.enqueue((namespace, name), result.requeue_after_s)

    async def observe(self, ms: ModelService) -> Observed:
        sel = f"{n.LABEL_MS}={ms.name},app.kubernetes.io/managed-by={n.MANAGED_BY}"
        owned: set[tuple[str, str]] = set()
        workloads = []
        for kind, api_version in _API.items():
            items = (await self.dyn.get(await self._resource(api_version, kind), namespace=ms.namespace,
                                        label_selector=sel)).to_dict().get("items", [])
            for obj in items:
                if any(r.get("uid") == ms.uid for r in obj["metadata"].get("ownerReferences", [])):
                    owned.add((kind, obj["metadata"]["name"]))
                    if kind in WORKLOADS:
                        workloads.append(observe_workload(kind, obj))
        pods = (await self.dyn.get(await self._resource("v1", "Pod"), namespace=ms.namespace,
                                   label_selector=f"{n.LABEL_MS}={ms.name},{n.LABEL_COMPONENT}=engine")).to_dict()
        return Observed(owned=frozenset(owned), workloads=tuple(workloads),
                        pods=tuple(observe_pod(p) for p in pods.get("items", [])))

    async def _write_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        res = await self._resource(API_VERSION, KIND)
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
                "status": status}
        await self.dyn.server_side_apply(res.subresources["status"], body=body, name=name, namespace=namespace,
                                         field_manager=n.FIELD_MANAGER, force_conflicts=True)

    async def _event(self, ms: ModelService, ev: Event) -> None:
        body = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{ms.name}.",
                                                                  "namespace": ms.namespace},
                "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": ms.name,
                                   "namespace": ms.namespace, "uid": ms.uid},
                "type": ev.type, "reason": ev.reason, "message": ev.message, "source": {"component": n.MANAGED_BY}}
        await self.dyn.create(await self._resource("v1", "Event"), body=body, namespace=ms.namespace)
