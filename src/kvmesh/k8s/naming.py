"""Names, labels, ports and paths shared by the objects a ModelService becomes, the operator and discovery.

These are the contract between the manifests and the processes in the pods: the engine Service's port names
(``http``, ``kv-events``, ``kv-replay``) and the cache-node Service's (``peer``, ``metrics``) are what
discovery reads from EndpointSlices; the mount paths are where the gateway finds its config and the engines
their cache node's socket and arena.
"""

from __future__ import annotations

import re
from typing import Any

MANAGED_BY = "kvmesh-operator"
FIELD_MANAGER = "kvmesh-operator"

ENGINE_PORT = 8000
KV_EVENTS_PORT = 5557
KV_REPLAY_PORT = 5558
GATEWAY_PORT = 8080
PEER_PORT = 7400
CACHE_HTTP_PORT = 7401

CONFIG_DIR = "/etc/kvmesh"  # the gateway's ConfigMap
TENANTS_DIR = "/etc/kvmesh/tenants"  # the tenants Secret
CACHE_RUN_DIR = "/run/kvmesh"  # cache node socket, shared with the engines on the machine (hostPath)
SHM_DIR = "/dev/shm"  # the cache node's arena, shared with the engines on the machine (hostPath on tmpfs)
SSD_DIR = "/var/lib/kvmesh/ssd"
SCRATCH_DIR = "/tmp/kvmesh"  # logs and ipc sockets of one pod (emptyDir)
MODELS_DIR = "/models"  # where a pvc:// source is mounted
CACHE_SOCKET = f"{CACHE_RUN_DIR}/cache-node.sock"

LABEL_MS = "kvmesh.io/model-service"
LABEL_MODEL = "kvmesh.io/model"
LABEL_ROLE = "kvmesh.io/role"
LABEL_GROUP = "kvmesh.io/group"
LABEL_COMPONENT = "app.kubernetes.io/component"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # a StatefulSet pod's ordinal (Kubernetes ≥ 1.28)


def label_value(text: str) -> str:
    """``text`` as a label value: at most 63 of [A-Za-z0-9_.-], starting and ending alphanumeric."""
    v = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", v)


def selector(ms_name: str, component: str) -> dict[str, str]:
    """The labels that select one component's pods of one ModelService (immutable once created)."""
    return {"app.kubernetes.io/name": "kvmesh", "app.kubernetes.io/instance": ms_name, LABEL_COMPONENT: component}


def labels(ms_name: str, component: str, **extra: str) -> dict[str, str]:
    return {**selector(ms_name, component), "app.kubernetes.io/managed-by": MANAGED_BY, LABEL_MS: ms_name,
            **extra}


def owner_reference(ms_name: str, uid: str) -> dict[str, Any]:
    """The controller reference that makes garbage collection delete an object with its ModelService."""
    return {"apiVersion": "kvmesh.io/v1alpha1", "kind": "ModelService", "name": ms_name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def engine_name(ms: str) -> str:
    return f"{ms}-engine"


def group_name(ms: str, index: int) -> str:
    return f"{ms}-engine-g{index}"


def gateway_name(ms: str) -> str:
    return f"{ms}-gateway"


def cache_name(ms: str) -> str:
    return f"{ms}-cache"


def discovery_sa(ms: str) -> str:
    """The ServiceAccount of gateway and cache-node pods: it may read EndpointSlices, nothing else."""
    return f"{ms}-discovery"
