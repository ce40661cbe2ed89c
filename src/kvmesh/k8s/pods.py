"""Pod templates of a ModelService: the engine pod (vLLM or simulated) and the cache-node pod.

Listen addresses are wildcards (``0.0.0.0``, ``tcp://*``): a pod has its own network namespace, so that is
the pod's interface, and ``kubectl port-forward`` (which connects to the pod's localhost) still works.  The
KV-event publisher binds ``tcp://*:5557`` — the form vLLM binds rather than connects — and discovery builds
``tcp://<pod IP>:5557`` from the engine Service's ``kv-events`` port.  ``$(POD_NAME)``-style references are
expanded by the kubelet from the pod's env (Downward API).

Engines share the machine's cache node through two hostPath directories: the node's socket (``/run/kvmesh``)
and its shared-memory arena (``/dev/shm``, on the host's tmpfs).  An ``emptyDir`` of medium Memory cannot do
it — it is private to one pod — so emptyDir (with a size limit) holds only what stays inside a pod: vLLM's
own ``/dev/shm`` when no cache node is attached, and the scratch directory.

Shutdown (scale-in, rollout, eviction): the kubelet marks the pod terminating — the gateways' EndpointSlice
discovery then sends it no new requests — and runs the engine's preStop hook, ``sleep PRESTOP_S``, so that
the endpoint's removal reaches every gateway before the engine stops accepting work; only then is SIGTERM
sent.  vLLM drains on SIGTERM for up to ``--shutdown-timeout`` (its default, 0, aborts every in-flight
request at once), and the simulated engine drains by itself.  preStop + drain stay below the pod's
``terminationGracePeriodSeconds``, which the kubelet counts from the start of preStop and ends with SIGKILL.
"""

from __future__ import annotations

import json
from typing import Any

from kvmesh.engines.vllm import connector_config
from kvmesh.k8s import naming as n
from kvmesh.k8s.api import ModelService

Obj = dict[str, Any]
LEADER_PORT = 29500
PRESTOP_S = 5  # preStop sleep: lets the endpoint's removal reach the gateways before SIGTERM
DRAIN_S = 45  # vLLM --shutdown-timeout: how long in-flight requests may run on after SIGTERM
GRACE_S = 60  # terminationGracePeriodSeconds: > PRESTOP_S + DRAIN_S, leaving time for vLLM's own teardown


def _env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


DOWNWARD_ENV = [_env("POD_NAME", "metadata.name"), _env("POD_NAMESPACE", "metadata.namespace"),
                _env("POD_IP", "status.podIP"), _env("NODE_NAME", "spec.nodeName")]


def model_path(source: str) -> str:
    """The path or id the engine reads: ``pvc://claim/sub`` is mounted under /models; hf:// and s3:// ids
    are the engine's to fetch (vLLM reads both)."""
    if source.startswith("pvc://"):
        return f"{n.MODELS_DIR}/{source.removeprefix('pvc://').rstrip('/')}"
    if source.startswith("hf://"):
        return source.removeprefix("hf://")
    return source


def model_volumes(source: str) -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) that make ``model_path(source)`` readable in a pod."""
    if not source.startswith("pvc://"):
        return [], []
    claim = source.removeprefix("pvc://").split("/", 1)[0]
    vol = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    return [vol], [{"name": "model", "mountPath": f"{n.MODELS_DIR}/{claim}", "readOnly": True}]


def vllm_args(ms: ModelService, group_size: int, group_svc: str | None) -> list[str]:
    s = ms.spec
    args = ["--model", model_path(s.model.source), "--served-model-name", s.model.name, "--host", "0.0.0.0",
            "--port", str(n.ENGINE_PORT), "--enable-prefix-caching", "--enable-prompt-tokens-details",
            "--tensor-parallel-size", str(s.engine.tensor_parallel_size), "--shutdown-timeout", str(DRAIN_S)]
    if s.engine.max_model_len:
        args += ["--max-model-len", str(s.engine.max_model_len)]
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv-events",
              "endpoint": f"tcp://*:{n.KV_EVENTS_PORT}", "replay_endpoint": f"tcp://*:{n.KV_REPLAY_PORT}"}
    args += ["--kv-events-config", json.dumps(events, separators=(",", ":"))]
    if s.cache.enabled:
        args += ["--kv-transfer-config", json.dumps(connector_config(n.CACHE_SOCKET), separators=(",", ":"))]
    if group_size > 1:  # tensor parallel across the group's pods; rank = the StatefulSet ordinal
        args += ["--nnodes", str(group_size), "--node-rank", "$(POD_INDEX)",
                 "--master-addr", f"$(GROUP_NAME)-0.{group_svc}", "--master-port", str(LEADER_PORT)]
    return args + list(s.engine.args)


def sim_args(ms: ModelService) -> list[str]:
    s, sim = ms.spec, ms.spec.engine.sim
    return ["engine", "--kind", "sim", "--model", model_path(s.model.source), "--served-model-name", s.model.name,
            "--host", "0.0.0.0", "--port", str(n.ENGINE_PORT), "--kv-events", f"tcp://*:{n.KV_EVENTS_PORT}",
            "--profile", sim.profile, "--time-scale", str(sim.time_scale), "--block-size", str(sim.block_size),
            "--run-dir", n.SCRATCH_DIR, *s.engine.args]


def _resources(ms: ModelService) -> Obj:
    e = ms.spec.engine
    req, lim = dict(e.resources.requests), dict(e.resources.limits)
    if e.kind == "vllm" and e.gpus:
        req["nvidia.com/gpu"] = lim["nvidia.com/gpu"] = e.gpus  # extended resources: request == limit
    return {k: v for k, v in (("requests", req), ("limits", lim)) if v}


def _lifecycle() -> Obj:
    # ``exec`` rather than Kubernetes' own ``preStop.sleep``, which is alpha (off by default) on 1.29, the oldest
    # version supported; both engine images (vLLM's, and kvmesh's python:3.11-slim) have ``sleep``
    return {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}}


def _probe(path: str, port: str, period: int, failures: int) -> Obj:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def engine_container(ms: ModelService, image: str, group_size: int = 1, group_svc: str | None = None) -> Obj:
    e = ms.spec.engine
    if e.kind == "sim":
        command, args = ["kvmesh"], sim_args(ms)
    elif group_size > 1:  # ranks above 0 run headless (no API server): one command for every pod of a group
        command = ["sh", "-c", 'if [ "$POD_INDEX" != 0 ]; then set -- "$@" --headless; fi; '
                   'exec python3 -m vllm.entrypoints.openai.api_server "$@"', "vllm"]
        args = vllm_args(ms, group_size, group_svc)
    else:
        command, args = ["python3", "-m", "vllm.entrypoints.openai.api_server"], vllm_args(ms, 1, None)
    env = [*DOWNWARD_ENV, *({"name": v.name, "value": v.value} for v in e.env)]
    if group_size > 1:
        env += [_env("POD_INDEX", f"metadata.labels['{n.POD_INDEX_LABEL}']"),
                {"name": "GROUP_NAME", "value": ""}]  # filled per group by objects.group_statefulset
    c: Obj = {
        "name": "engine", "image": image, "command": command, "args": args, "env": env,
        "ports": [{"name": "http", "containerPort": n.ENGINE_PORT},
                  {"name": "kv-events", "containerPort": n.KV_EVENTS_PORT},
                  *([{"name": "kv-replay", "containerPort": n.KV_REPLAY_PORT}] if e.kind == "vllm" else [])],
        "readinessProbe": _probe("/health", "http", 5, 3),
        "livenessProbe": _probe("/health", "http", 10, 6),
        # loading weights (and compiling) takes minutes on a real engine: liveness waits for startup
        "startupProbe": _probe("/health", "http", 10, 360 if e.kind == "vllm" else 30),
        "volumeMounts": _engine_mounts(ms), "lifecycle": _lifecycle(),
    }
    if res := _resources(ms):
        c["resources"] = res
    return c


def _host_dir(ms: ModelService, base: str) -> str:
    return f"{base}/kvmesh-{ms.namespace}-{ms.name}"


def cache_volumes(ms: ModelService) -> list[Obj]:
    """The machine-wide directories the cache node and the engines on its machine share."""
    return [{"name": "cache-run", "hostPath": {"path": _host_dir(ms, "/run"), "type": "DirectoryOrCreate"}},
            {"name": "cache-shm", "hostPath": {"path": _host_dir(ms, "/dev/shm"), "type": "DirectoryOrCreate"}}]


def _engine_mounts(ms: ModelService) -> list[Obj]:
    mounts = [{"name": "scratch", "mountPath": n.SCRATCH_DIR}, *model_volumes(ms.spec.model.source)[1]]
    if ms.spec.engine.kind == "vllm":
        shm = "cache-shm" if ms.spec.cache.enabled else "shm"
        mounts.append({"name": shm, "mountPath": n.SHM_DIR})
        if ms.spec.cache.enabled:
            mounts.append({"name": "cache-run", "mountPath": n.CACHE_RUN_DIR})
    return mounts


def engine_volumes(ms: ModelService) -> list[Obj]:
    vols = [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}, *model_volumes(ms.spec.model.source)[0]]
    if ms.spec.engine.kind == "vllm":
        if ms.spec.cache.enabled:
            vols += cache_volumes(ms)
        else:
            vols.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
    return vols


def placement(ms: ModelService) -> Obj:
    """The scheduling fields every engine and cache-node pod of ``ms`` shares."""
    e, s = ms.spec.engine, ms.spec
    out: Obj = {}
    if e.node_selector:
        out["nodeSelector"] = dict(e.node_selector)
    if e.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in e.tolerations]
    if e.affinity:
        out["affinity"] = e.affinity
    if s.priority_class_name:
        out["priorityClassName"] = s.priority_class_name
    return out


def engine_pod(ms: ModelService, image: str, group_size: int = 1, group_svc: str | None = None) -> Obj:
    spec: Obj = {"containers": [engine_container(ms, image, group_size, group_svc)],
                 "volumes": engine_volumes(ms), "automountServiceAccountToken": False,
                 "enableServiceLinks": False, "terminationGracePeriodSeconds": GRACE_S, **placement(ms)}
    if ms.spec.scheduler_name:
        spec["schedulerName"] = ms.spec.scheduler_name
    return spec


def cache_args(ms: ModelService) -> list[str]:
    c = ms.spec.cache
    args = ["cache-node", "--socket", n.CACHE_SOCKET, "--dram-mib", str(c.dram_mib), "--ssd-dir", n.SSD_DIR,
            "--ssd-mib", str(c.ssd.mib), "--eviction", c.eviction, "--http-host", "0.0.0.0",
            "--http-port", str(n.CACHE_HTTP_PORT), "--node-id", "$(POD_NAME)", "--peer-host", "$(POD_IP)",
            "--peer-port", str(n.PEER_PORT), "--replicas", str(c.pool_replicas),
            "--run-dir", n.SCRATCH_DIR, "--discovery", "kubernetes", "--k8s-namespace", ms.namespace,
            "--k8s-service", n.cache_name(ms.name), "--k8s-port", "peer"]
    if c.ttl_seconds is not None:
        args += ["--ttl-s", str(c.ttl_seconds)]
    if c.remote:
        args += ["--remote", c.remote]
    return args


def cache_pod(ms: ModelService, image: str) -> Obj:
    c = ms.spec.cache
    ssd: Obj = ({"hostPath": {"path": c.ssd.host_path, "type": "DirectoryOrCreate"}} if c.ssd.host_path
                else {"emptyDir": {"sizeLimit": f"{max(c.ssd.mib, 1)}Mi"}})
    mem = f"{c.dram_mib + 512}Mi"  # the arena's tmpfs pages are charged to this pod
    container: Obj = {
        "name": "cache-node", "image": image, "command": ["kvmesh"], "args": cache_args(ms), "env": DOWNWARD_ENV,
        "ports": [{"name": "peer", "containerPort": n.PEER_PORT},
                  {"name": "metrics", "containerPort": n.CACHE_HTTP_PORT}],
        "readinessProbe": _probe("/status", "metrics", 5, 3),
        # the kubelet creates the hostPath directories (socket, arena, SSD) owned by root; the image's own
        # user (10001) could not create the socket there
        "securityContext": {"runAsUser": 0},
        "resources": {"requests": {"memory": mem}, "limits": {"memory": mem}},
        "volumeMounts": [{"name": "cache-run", "mountPath": n.CACHE_RUN_DIR},
                         {"name": "cache-shm", "mountPath": n.SHM_DIR}, {"name": "ssd", "mountPath": n.SSD_DIR},
                         {"name": "scratch", "mountPath": n.SCRATCH_DIR}],
    }
    return {"containers": [container], "serviceAccountName": n.discovery_sa(ms.name),
            "enableServiceLinks": False, "terminationGracePeriodSeconds": 30,
            "volumes": [*cache_volumes(ms), {"name": "ssd", **ssd},
                        {"name": "scratch", "emptyDir": {"sizeLimit": "256Mi"}}], **placement(ms)}
