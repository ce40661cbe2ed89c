"""The Kubernetes objects one ModelService becomes — a pure function of the spec (and the images to use).

:func:`model_service_objects` returns plain dicts in the API server's JSON form, each with the ModelService
as controller owner (garbage collection deletes them with it) and the operator's labels.  They are:

- ``<ms>-engine``: a Deployment of engine pods (``podsPerReplica == 1``), or, for replicas that span several
  pods, one StatefulSet per group ``<ms>-engine-g<i>`` (pods in parallel, rank = ordinal) behind the headless
  Service ``<ms>-engine-group``; which groups exist is the reconcile's decision (group placement), so groups
  are rendered by :func:`group_statefulset` and not here;
- ``<ms>-engine``: a headless Service over the ready engine pods (group leaders only) whose EndpointSlices are
  the gateway's backends: ports ``http``, ``kv-events`` and (vLLM) ``kv-replay``;
- ``<ms>-cache``: the cache-node DaemonSet on the engines' nodes and its headless Service (``peer``,
  ``metrics``), whose EndpointSlices are the pool's membership;
- ``<ms>-gateway``: ConfigMap (``kvmesh.toml``), Deployment, Service and PodDisruptionBudget;
- ``<ms>-discovery``: ServiceAccount + Role + RoleBinding letting gateway and cache nodes read EndpointSlices.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvmesh.k8s import naming as n
from kvmesh.k8s.api import ModelService
from kvmesh.k8s.pods import cache_pod, engine_pod, model_path, model_volumes

Obj = dict[str, Any]
DEFAULT_IMAGE = "ghcr.io/kvmesh/kvmesh:0.1.0"
DEFAULT_VLLM_IMAGE = "ghcr.io/kvmesh/vllm-kvmesh:0.1.0"


@dataclass(frozen=True, slots=True)
class Images:
    """Images the operator fills in: kvmesh's (gateway, cache node, sim engines) and the default vLLM one."""

    kvmesh: str = DEFAULT_IMAGE
    vllm: str = DEFAULT_VLLM_IMAGE


def meta(ms: ModelService, name: str, component: str, **extra: str) -> Obj:
    return {"name": name, "namespace": ms.namespace, "labels": n.labels(ms.name, component, **extra),
            "ownerReferences": [n.owner_reference(ms.name, ms.uid)]}


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string for everything kvmesh writes


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for nested tables of scalars and lists (the standard library only reads TOML)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = (f"[{prefix}]\n" if prefix and lines else "") + "".join(line + "\n" for line in lines)
    for k, v in data.items():
        if isinstance(v, dict):
            out += ("\n" if out else "") + to_toml(v, f"{prefix}.{k}" if prefix else k)
    return out


def gateway_config(ms: ModelService) -> dict[str, Any]:
    """The ``[gateway]`` table of the gateway pods' ``kvmesh.toml`` (a ``kvmesh.config.GatewayConfig``)."""
    s = ms.spec
    gw: dict[str, Any] = {"host": "0.0.0.0", "port": n.GATEWAY_PORT, "policy": s.routing.policy,
                          "discovery": "kubernetes",
                          "kubernetes": {"namespace": ms.namespace, "service": n.engine_name(ms.name),
                                         "port": "http"}}
    if s.model.source.startswith("pvc://") or s.engine.kind == "sim":  # readable from the gateway pod too
        gw["tokenizer"] = model_path(s.model.source)
    if s.tenants is not None:
        gw["tenants_file"] = f"{n.TENANTS_DIR}/tenants.toml"
    knobs = s.routing.knob_values()
    if knobs:
        gw["routing"] = knobs
    return {"gateway": gw}


def _configmap(ms: ModelService) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(ms, n.gateway_name(ms.name), "gateway"),
            "data": {"kvmesh.toml": to_toml(gateway_config(ms))}}


def _gateway_pod(ms: ModelService, images: Images) -> Obj:
    vols, mounts = model_volumes(ms.spec.model.source)
    vols = [{"name": "config", "configMap": {"name": n.gateway_name(ms.name)}}, *vols]
    mounts = [{"name": "config", "mountPath": n.CONFIG_DIR, "readOnly": True}, *mounts]
    if ms.spec.tenants is not None:
        vols.append({"name": "tenants", "secret": {"secretName": ms.spec.tenants.secret_name}})
        mounts.append({"name": "tenants", "mountPath": n.TENANTS_DIR, "readOnly": True})
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}
    container = {"name": "gateway", "image": images.kvmesh, "command": ["kvmesh"],
                 "args": ["gateway", "--config", f"{n.CONFIG_DIR}/kvmesh.toml"],
                 "ports": [{"name": "http", "containerPort": n.GATEWAY_PORT}],
                 "readinessProbe": probe, "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}, "volumeMounts": mounts}
    spec: Obj = {"containers": [container], "serviceAccountName": n.discovery_sa(ms.name), "volumes": vols,
                 "enableServiceLinks": False, "terminationGracePeriodSeconds": 45}  # > drain_timeout_s
    if ms.spec.priority_class_name:
        spec["priorityClassName"] = ms.spec.priority_class_name
    return spec


def gateway_objects(ms: ModelService, images: Images) -> list[Obj]:
    name, g = n.gateway_name(ms.name), ms.spec.gateway
    sel = n.selector(ms.name, "gateway")
    template = {"metadata": {"labels": n.labels(ms.name, "gateway")}, "spec": _gateway_pod(ms, images)}
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(ms, name, "gateway"),
              "spec": {"replicas": g.replicas, "selector": {"matchLabels": sel}, "template": template,
                       "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": meta(ms, name, "gateway"),
           "spec": {"type": g.service_type, "selector": sel,
                    "ports": [{"name": "http", "port": g.port, "targetPort": "http"}]}}
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(ms, name, "gateway"),
           "spec": {"maxUnavailable": 1, "selector": {"matchLabels": sel}}}
    return [_configmap(ms), deploy, svc, pdb]


def engine_labels(ms: ModelService, **extra: str) -> dict[str, str]:
    return n.labels(ms.name, "engine", **{n.LABEL_MODEL: n.label_value(ms.spec.model.name),
                                           n.LABEL_ROLE: "aggregated", **extra})


def engine_deployment(ms: ModelService, images: Images) -> Obj:
    image = ms.spec.engine.image or (images.kvmesh if ms.spec.engine.kind == "sim" else images.vllm)
    template = {"metadata": {"labels": engine_labels(ms)}, "spec": engine_pod(ms, image)}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(ms, n.engine_name(ms.name), "engine", **{n.LABEL_ROLE: "aggregated"}),
            "spec": {"replicas": ms.spec.roles.aggregated.replicas,
                     "selector": {"matchLabels": n.selector(ms.name, "engine")}, "template": template,
                     # a new engine must be ready before an old one goes: capacity never dips on a rollout
                     "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}}}


def group_statefulset(ms: ModelService, index: int, images: Images) -> Obj:
    """Group ``index``: ``podsPerReplica`` pods started together; rank 0 serves and publishes KV events."""
    name, size = n.group_name(ms.name, index), ms.spec.engine.pods_per_replica
    svc = f"{n.engine_name(ms.name)}-group"
    pod = engine_pod(ms, ms.spec.engine.image or images.vllm, size, svc)
    for var in pod["containers"][0]["env"]:
        if var["name"] == "GROUP_NAME":
            var["value"] = name
    group = {n.LABEL_GROUP: str(index)}
    sel = {**n.selector(ms.name, "engine"), **group}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": meta(ms, name, "engine", **{n.LABEL_ROLE: "aggregated", **group}),
            "spec": {"replicas": size, "serviceName": svc, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": sel},
                     "template": {"metadata": {"labels": engine_labels(ms, **group)}, "spec": pod}}}


def _port(name: str, port: int) -> Obj:
    return {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}


def engine_services(ms: ModelService) -> list[Obj]:
    """The discovery Service (group leaders only), and for groups the headless Service naming every pod."""
    sel = n.selector(ms.name, "engine")
    grouped = ms.spec.engine.pods_per_replica > 1
    ports = [_port("http", n.ENGINE_PORT), _port("kv-events", n.KV_EVENTS_PORT)]
    if ms.spec.engine.kind == "vllm":  # the simulated engine serves no replay: no port for discovery to ask
        ports.append(_port("kv-replay", n.KV_REPLAY_PORT))
    disc = {"apiVersion": "v1", "kind": "Service", "metadata": meta(ms, n.engine_name(ms.name), "engine"),
            "spec": {"clusterIP": "None", "selector": {**sel, n.POD_INDEX_LABEL: "0"} if grouped else sel,
                     "ports": ports}}
    if not grouped:
        return [disc]
    group_svc = {"apiVersion": "v1", "kind": "Service",
                 "metadata": meta(ms, f"{n.engine_name(ms.name)}-group", "engine"),
                 "spec": {"clusterIP": "None", "selector": sel, "publishNotReadyAddresses": True,
                          "ports": [_port("http", n.ENGINE_PORT)]}}
    return [disc, group_svc]


def cache_objects(ms: ModelService, images: Images) -> list[Obj]:
    name, sel = n.cache_name(ms.name), n.selector(ms.name, "cache-node")
    ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta(ms, name, "cache-node"),
          "spec": {"selector": {"matchLabels": sel},
                   "template": {"metadata": {"labels": n.labels(ms.name, "cache-node")},
                                "spec": cache_pod(ms, images.kvmesh)},
                   "updateStrategy": {"rollingUpdate": {"maxUnavailable": 1}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": meta(ms, name, "cache-node"),
           "spec": {"clusterIP": "None", "selector": sel,
                    "ports": [_port("peer", n.PEER_PORT), _port("metrics", n.CACHE_HTTP_PORT)]}}
    return [ds, svc]


def discovery_rbac(ms: ModelService) -> list[Obj]:
    """Least privilege for discovery: read EndpointSlices of this namespace, nothing else."""
    name = n.discovery_sa(ms.name)
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(ms, name, "discovery")}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(ms, name, "discovery"),
            "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                       "verbs": ["get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta(ms, name, "discovery"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ms.namespace}]}
    return [sa, role, binding]


def model_service_objects(ms: ModelService, images: Images = Images(),
                          groups: Sequence[int] | None = None) -> list[Obj]:
    """Every object ``ms`` owns, in apply order (config and RBAC before the pods that use them).  For
    multi-pod replicas ``groups`` says which groups to render (all of ``replicas`` when None)."""
    out = [*discovery_rbac(ms), *gateway_objects(ms, images), *engine_services(ms)]
    if ms.spec.cache.enabled:  # sim engines attach no connector, but the nodes and their pool still run
        out += cache_objects(ms, images)
    if ms.spec.engine.pods_per_replica == 1:
        out.append(engine_deployment(ms, images))
    else:
        wanted = range(ms.spec.roles.aggregated.replicas) if groups is None else groups
        out += [group_statefulset(ms, i, images) for i in wanted]
    return out
