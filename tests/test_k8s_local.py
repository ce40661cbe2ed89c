"""The operator's whole output, run for real on this machine: a sim ModelService's manifests serving requests.

A ModelService with ``engine.kind: sim`` goes through the pure reconcile; the test then plays the parts of
Kubernetes that these machines cannot run — scheduler, kubelet and EndpointSlice controller — and nothing
else.  Every pod's container runs as a local process with the ``command``/``args``/``env`` of the rendered
Deployment/DaemonSet pod template, unchanged except for what a pod gets from Kubernetes:

- the Downward API env (``POD_NAME``, ``POD_IP``, ...) and the kubelet's ``$(VAR)`` expansion in args;
- a network namespace: each pod gets its own loopback address 127.B.C.N, so every pod listens on the
  manifest's own port numbers and a wildcard listen address (``0.0.0.0``, ``tcp://*``) reads as that address;
- volumes: each ``hostPath`` is a directory per (simulated) machine, each ``emptyDir`` one per pod, a
  ``configMap`` or ``secret`` a directory holding its files (the tenants Secret is the one object the user
  creates beside the ModelService); the container's mount paths in its args and in its ConfigMap's files
  name these directories;
- API access: pods whose service account token is mounted get a ``KUBECONFIG`` naming the API server, which
  here is the EndpointSlice list/watch stand-in of ``tests/k8s_apiserver.py`` (engines, with no token, get
  none) — so discovery is the real one: gateways find the engines, cache nodes their pool, from EndpointSlices
  that this test's "controller" publishes once each pod passes the readiness probe of its manifest.

Then the official ``openai`` client talks to each gateway replica as a tenant; an engine pod is replaced by
one with a new name, and every gateway follows.  A flag, a port name, a listen address or a
probe that does not fit the rest shows up here as a pod that never turns ready or a request that fails.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("kubernetes_asyncio")

from kvmesh.cache.client import NodeClient
from kvmesh.k8s import naming as n
from kvmesh.k8s.api import ModelService
from kvmesh.k8s.reconcile import Observed, reconcile
from kvmesh.stack import DEMO_MODEL_NAME
from tests.helpers import LoopThread, wait_until
from tests.k8s_apiserver import FakeApiServer, endpoint_slice, pod_endpoint

NS = "ml"
NODES = ("node-a", "node-b")
MANIFEST_PORTS = (n.ENGINE_PORT, n.KV_EVENTS_PORT, n.KV_REPLAY_PORT, n.GATEWAY_PORT, n.PEER_PORT, n.CACHE_HTTP_PORT)
READY_S = 60  # generous: six processes import kvmesh at once on a loaded 2-core machine
Obj = dict[str, Any]
TENANT_KEY = "sk-local-team"
TENANTS = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-tenants", "namespace": NS},
           "stringData": {"tenants.toml": f'[[tenants]]\nname = "team"\n'
                                          f'key_sha256 = ["{hashlib.sha256(TENANT_KEY.encode()).hexdigest()}"]\n'}}


@dataclass
class Pod:
    name: str
    ip: str
    node: str
    labels: dict[str, str]
    container: Obj
    log: pathlib.Path
    proc: subprocess.Popen[bytes]
    mounts: dict[str, pathlib.Path] = field(default_factory=dict)
    terminating: bool = False

    def port(self, ref: str | int) -> int:
        """A named container port (probes and Services name them) or a number."""
        if isinstance(ref, int):
            return ref
        port = next((int(p["containerPort"]) for p in self.container["ports"] if p["name"] == ref), None)
        if port is None:
            raise AssertionError(f"pod {self.name} has no container port named {ref!r}")
        return port

    def url(self, port: str | int, path: str = "") -> str:
        return f"http://{self.ip}:{self.port(port)}{path}"

    def ready(self) -> bool:
        """The readinessProbe of the manifest, as the kubelet runs it (httpGet; 200–399 passes)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"pod {self.name} exited with {self.proc.returncode}:\n{self.tail()}")
        get = self.container["readinessProbe"]["httpGet"]
        try:
            return 200 <= httpx.get(self.url(get["port"], get["path"]), timeout=2).status_code < 400
        except httpx.HTTPError:
            return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def loopback_subnet() -> str:
    """``127.B.C``: a /24 of loopback on which every manifest port is free (another run, or a wildcard
    listener on one of the ports, would collide)."""
    rng = random.Random()
    for _ in range(20):
        net = f"127.{rng.randrange(16, 250)}.{rng.randrange(1, 250)}"
        if all(_bindable(f"{net}.{i}", p) for i in (1, 9) for p in MANIFEST_PORTS):
            return net
    pytest.skip(f"the manifest ports {MANIFEST_PORTS} are taken on every loopback address (a wildcard listener)")


def _bindable(addr: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: a defined variable is replaced, ``$$`` escapes, the rest stays."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def in_pod(text: str, ip: str, mounts: dict[str, pathlib.Path]) -> str:
    """What a path or listen address in the manifest means for this local pod: wildcards are the pod's
    address, a container path under a mount is that volume's directory."""
    text = text.replace("0.0.0.0", ip).replace("tcp://*:", f"tcp://{ip}:")
    for mount in sorted(mounts, key=len, reverse=True):
        text = re.sub(re.escape(mount) + r"(?=/|$|[\"'])", str(mounts[mount]), text)
    return text


class LocalCluster:
    """Scheduler, kubelet and EndpointSlice controller for one ModelService's objects, on loopback."""

    def __init__(self, objects: list[Obj], root: pathlib.Path, api: FakeApiServer, loop_thread: LoopThread) -> None:
        self.objects = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        self.root = root
        self.api = api
        self.loop_thread = loop_thread
        self.subnet = loopback_subnet()
        self.pods: list[Pod] = []
        self.kubeconfig = root / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: local\n"
            f"clusters: [{{name: local, cluster: {{server: '{api.url}'}}}}]\n"
            "users: [{name: sa, user: {token: local}}]\n"
            f"contexts: [{{name: local, context: {{cluster: local, user: sa, namespace: {NS}}}}}]\n")

    def schedule(self) -> None:
        """Deployment replicas spread over the machines; one DaemonSet pod per machine."""
        for (kind, name), o in self.objects.items():
            template = o.get("spec", {}).get("template")
            if kind == "Deployment":
                for i in range(o["spec"]["replicas"]):
                    self.start(f"{name}-7d4b9c{i}-x{i}k2p", template, NODES[i % len(NODES)])
            elif kind == "DaemonSet":
                for i, node in enumerate(NODES):
                    self.start(f"{name}-d{i}q7z", template, node)
            else:
                assert kind not in ("StatefulSet", "Job", "ReplicaSet"), f"{kind} {name} is not run here"

    def start(self, name: str, template: Obj, node: str) -> Pod:
        spec = template["spec"]
        (container,) = spec["containers"]
        ip = f"{self.subnet}.{len(self.pods) + 1}"
        mounts = {m["mountPath"]: self._volume(name, node, spec, m) for m in container.get("volumeMounts", ())}
        self._fill_files(spec, container, ip, mounts)
        env = self._env(container, name, ip, node)
        if spec.get("serviceAccountName") and spec.get("automountServiceAccountToken", True):
            env["KUBECONFIG"] = str(self.kubeconfig)  # the pod's credentials for the API server
        argv = [in_pod(expand(a, env), ip, mounts) for a in [*container["command"], *container.get("args", ())]]
        if argv[0] == "kvmesh":  # the image's console script
            argv[0] = str(pathlib.Path(sys.executable).parent / "kvmesh")
        base = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and k != "KUBECONFIG"}
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, env=base | env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        pod = Pod(name, ip, node, template["metadata"]["labels"], container, log, proc, mounts)
        self.pods.append(pod)
        return pod

    @staticmethod
    def _env(container: Obj, pod: str, ip: str, node: str) -> dict[str, str]:
        fields = {"metadata.name": pod, "metadata.namespace": NS, "status.podIP": ip, "spec.nodeName": node}
        env: dict[str, str] = {}
        for var in container.get("env", ()):
            if "valueFrom" in var:
                env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                env[var["name"]] = expand(var.get("value", ""), env)
        return env

    def _volume(self, pod: str, node: str, spec: Obj, mount: Obj) -> pathlib.Path:
        vol = self._vol(spec, mount)
        if "hostPath" in vol:  # one directory per machine: pods on the same machine share it
            d = self.root / "nodes" / node / vol["hostPath"]["path"].strip("/").replace("/", "_")
        elif "emptyDir" in vol or "configMap" in vol or "secret" in vol:
            d = self.root / "pods" / pod / vol["name"]
        else:
            raise AssertionError(f"volume {vol} is not run here")
        d.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(d)

    def _fill_files(self, spec: Obj, container: Obj, ip: str, mounts: dict[str, pathlib.Path]) -> None:
        """The ConfigMaps' and Secrets' files; a ConfigMap's as read in the pod: its addresses and mount paths."""
        for m in container.get("volumeMounts", ()):
            vol = self._vol(spec, m)
            if "configMap" in vol:
                for key, text in self.objects[("ConfigMap", vol["configMap"]["name"])]["data"].items():
                    (mounts[m["mountPath"]] / key).write_text(in_pod(text, ip, mounts))
            elif "secret" in vol:  # a Secret the user created (stringData: what the API server decodes)
                for key, text in self.objects[("Secret", vol["secret"]["secretName"])]["stringData"].items():
                    (mounts[m["mountPath"]] / key).write_text(text)

    @staticmethod
    def _vol(spec: Obj, mount: Obj) -> Obj:
        vol: Obj = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        return vol

    def wait_ready(self) -> None:
        for pod in self.pods:
            wait_until(pod.ready, READY_S, f"pod {pod.name} to pass its readiness probe")

    def publish_endpoints(self) -> None:
        """The EndpointSlice controller: one slice per Service with a selector, over the pods it selects."""
        for (kind, name), svc in self.objects.items():
            sel = svc.get("spec", {}).get("selector") if kind == "Service" else None
            if not sel:
                continue
            pods = [p for p in self.pods if sel.items() <= p.labels.items()]
            always = bool(svc["spec"].get("publishNotReadyAddresses"))
            eps = [pod_endpoint(p.name, p.ip, ready=always or p.ready(), terminating=p.terminating, node=p.node)
                   for p in pods]
            ports = {sp["name"]: pods[0].port(sp["targetPort"]) for sp in svc["spec"]["ports"]} if pods else {}
            self.loop_thread.call(functools.partial(self.api.apply, NS,
                                                    endpoint_slice(f"{name}-k8x2q", name, eps, ports)))

    def delete_pod(self, pod: Pod) -> None:
        """A pod deleted: its endpoint turns terminating, the process gets SIGTERM, and once it has exited
        the endpoint leaves the slice (the controller's order)."""
        pod.terminating = True
        self.publish_endpoints()
        os.killpg(pod.proc.pid, signal.SIGTERM)
        pod.proc.wait(30)
        self.pods.remove(pod)
        self.publish_endpoints()

    def template(self, kind: str, name: str) -> Obj:
        spec: Obj = self.objects[(kind, name)]["spec"]["template"]
        return spec

    def client(self, gateway: Pod) -> openai.OpenAI:
        """An OpenAI client for one gateway pod, on the port its Service targets (kube-proxy's part)."""
        svc = self.objects[("Service", n.gateway_name(gateway.labels["app.kubernetes.io/instance"]))]
        base = gateway.url(svc["spec"]["ports"][0]["targetPort"], "/v1")
        return openai.OpenAI(base_url=base, api_key=TENANT_KEY, max_retries=0)

    def component(self, component: str) -> list[Pod]:
        return [p for p in self.pods if p.labels.get(n.LABEL_COMPONENT) == component]

    def stop(self) -> None:
        for p in self.pods:
            if p.proc.poll() is None:
                os.killpg(p.proc.pid, signal.SIGTERM)
        for p in self.pods:
            try:
                p.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait(10)


def sim_model_service(model_dir: pathlib.Path) -> ModelService:
    return ModelService.from_object({
        "metadata": {"name": "chat", "namespace": NS, "uid": "4f1c-local", "generation": 1},
        "spec": {"model": {"name": DEMO_MODEL_NAME, "source": str(model_dir)},
                 "engine": {"kind": "sim", "sim": {"timeScale": 0.02}},
                 "roles": {"aggregated": {"replicas": 2}},
                 "routing": {"policy": "kv-aware"},  # the policy that follows the engines' KV events
                 "tenants": {"secretName": "chat-tenants"},
                 "cache": {"dramMib": 16}}})


def metric(pod: Pod, name: str, **labels: str) -> float:
    """The sum of ``pod``'s /metrics samples of ``name`` that carry ``labels`` (0 when none)."""
    total = 0.0
    for line in httpx.get(pod.url("http", "/metrics"), timeout=5).text.splitlines():
        sample, _, value = line.rpartition(" ")
        base, _, rest = sample.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def routes_to(gateway: Pod, engines: list[Pod]) -> bool:
    return all(metric(gateway, "kvmesh_gateway_backend_healthy", backend=e.name) == 1 for e in engines)


def indexed(gateway: Pod, engine: Pod) -> bool:
    return metric(gateway, "kvmesh_index_event_batches_total", engine=engine.name) > 0


def pool_members(pod: Pod) -> int | None:
    st = NodeClient(pod.mounts[n.CACHE_RUN_DIR] / pathlib.Path(n.CACHE_SOCKET).name, retry_s=0.0).stats()
    return st.pool.members if st is not None and st.pool is not None else None


def pool_of(pod: Pod, size: int) -> bool:
    return pool_members(pod) == size


@pytest.fixture
def short_tmp() -> Iterator[pathlib.Path]:
    """A short root: the pods' ipc:// socket paths must fit in 107 bytes, as they do under /tmp/kvmesh."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def series(pod: Pod, name: str, **labels: str) -> bool:
    """Whether ``pod``'s /metrics has a sample of ``name`` with ``labels`` at all."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    text = httpx.get(pod.url("http", "/metrics"), timeout=5).text
    return any(line.startswith(name + "{") and all(w in line for w in want) for line in text.splitlines())


def replace_an_engine(cluster: LocalCluster, gateways: list[Pod], old: Pod) -> None:
    """The Deployment replaces an engine pod (a new name, a new address): every gateway drops the old one —
    out of routing, its index entry forgotten — and routes to the new one."""
    cluster.delete_pod(old)
    for g in gateways:
        wait_until(lambda g=g: not series(g, "kvmesh_index_blocks", engine=old.name), READY_S,  # type: ignore[misc]
                   f"{g.name} to forget {old.name}")
    new = cluster.start(f"{old.name.rsplit('-', 1)[0]}-n3w0p", cluster.template("Deployment", n.engine_name("chat")),
                        old.node)
    wait_until(new.ready, READY_S, f"pod {new.name} to pass its readiness probe")
    cluster.publish_endpoints()
    engines = cluster.component("engine")
    for g in gateways:
        wait_until(functools.partial(routes_to, g, engines), READY_S, f"{g.name} to route to {new.name}")
        assert not series(g, "kvmesh_gateway_backend_healthy", backend=old.name)
        serve_openai(cluster.client(g), g.name)


def serve_openai(client: openai.OpenAI, who: str) -> None:
    """Models, chat and a streamed completion as the tenant; without its key the gateway refuses (the tenants
    file of the Secret is the one the ConfigMap names)."""
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="sk-nobody", max_retries=0).completions.create(
            model=DEMO_MODEL_NAME, prompt="let me in", max_tokens=1)
    assert DEMO_MODEL_NAME in [m.id for m in client.models.list()]
    chat = client.chat.completions.create(model=DEMO_MODEL_NAME, max_tokens=4,
                                          messages=[{"role": "user", "content": f"hello from {who}"}])
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
    stream = client.completions.create(model=DEMO_MODEL_NAME, prompt="the pods fit together " * 8, max_tokens=4,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)


def test_sim_model_service_manifests_serve_openai_requests(short_tmp: pathlib.Path, tiny_model: pathlib.Path,
                                                          api: FakeApiServer, loop_thread: LoopThread) -> None:
    result = reconcile(sim_model_service(tiny_model), Observed(), 0.0)
    cluster = LocalCluster([*result.apply, TENANTS], short_tmp, api, loop_thread)
    try:
        cluster.schedule()
        cluster.wait_ready()  # every pod passes its own manifest's readiness probe
        cluster.publish_endpoints()
        engines, gateways, caches = (cluster.component(c) for c in ("engine", "gateway", "cache-node"))
        assert (len(engines), len(gateways), len(caches)) == (2, 2, 2)
        # the cache nodes found each other through the cache-node Service's EndpointSlices, at their pod IPs
        for c in caches:
            wait_until(functools.partial(pool_of, c, 2), READY_S, f"{c.name} to see a pool of 2")
        # each gateway replica discovered both engines (the engine Service's EndpointSlices) and health-checked them
        for g in gateways:
            wait_until(functools.partial(routes_to, g, engines), READY_S, f"{g.name} to route to both engines")
            serve_openai(cluster.client(g), g.name)
        # every gateway follows every engine's KV events (tcp://<pod IP>:kv-events), not only the ones it routed to
        served = [e for e in engines if metric(e, "vllm:prompt_tokens_total") > 0]
        assert served, "no engine served a request"
        for g in gateways:
            for e in served:
                wait_until(functools.partial(indexed, g, e), READY_S, f"{g.name} to index {e.name}'s KV events")
        # so a prompt one replica sent is found cached through the other: both route on the same index
        prompt = "a long shared system prompt that both gateway replicas see " * 6
        before = metric(gateways[1], "kvmesh_index_blocks")
        cluster.client(gateways[0]).completions.create(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=2)
        wait_until(lambda: metric(gateways[1], "kvmesh_index_blocks") > before, READY_S,
                   "the second replica to index the prompt")
        again = cluster.client(gateways[1]).completions.create(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=2)
        details = again.usage.prompt_tokens_details if again.usage else None
        assert details is not None and details.cached_tokens, again.usage
        replace_an_engine(cluster, gateways, served[0])
    finally:
        cluster.stop()
