"""Discovery from Kubernetes: members from EndpointSlices, followed with the API server's list/watch.

:class:`EndpointSliceWatch` is an informer in miniature (client-go's reflector, for one resource): it lists
the slices that match a label selector — a consistent read whose ``resourceVersion`` is where the watch
starts — then watches from there with bookmarks, through the official client (``kubernetes_asyncio``).
ADDED/MODIFIED replace a slice, DELETED drops it, BOOKMARK only advances the resourceVersion.  A watch the
server ends (its timeout, a dropped connection) is re-opened from the last resourceVersion seen, so nothing
in between is missed; a watch answered with 410 Gone (that version was compacted away) is followed by a
fresh list, which replaces the whole state — what changed meanwhile, deletions included, is seen then.
Other errors (API server down, RBAC) back off and list again.

After the list and after each change, the consumer gets every endpoint, merged across slices: it is
level-triggered (diffs against what it has) and never depends on which event woke it.

States of an endpoint (``discovery.k8s.io/v1`` conditions: nil ``ready`` means true, nil ``terminating``
false), as the gateway (:class:`GatewayDiscovery`) treats them:

- **serving** (ready, not terminating): a backend in routing, its KV events followed;
- **draining** (terminating, or not ready): out of routing — no new requests; requests already on it hold
  its ``Backend`` and finish; its KV events are still followed (it may turn ready again);
- **gone** (in no slice): removed, its KV-event subscription stopped and its index entry forgotten (its
  blocks, its speculative entries and its engine bit, which the next engine reuses).

The cache pool's :class:`~kvmesh.cache.pool.membership.KubernetesMembership` uses the same watch.

Several gateway replicas need nothing shared: each watches every slice and subscribes to every engine's KV
events, so each builds the same index by itself.  ``kubernetes_asyncio`` is imported lazily (the ``k8s``
extra): a plain install imports this module and only needs the client when discovery is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from kvmesh.config import KubernetesEndpoints

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300  # asked of the server per watch; it ends the stream then and we re-watch from our version
BACKOFF_S = (0.5, 30.0)  # first and longest wait before listing again after an error
KV_EVENTS_PORT = "kv-events"  # the EndpointSlice port names of an engine's KV-event publisher and replay
REPLAY_PORT = "kv-replay"
SA_NAMESPACE = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of an EndpointSlice, named by its pod (``targetRef``), else its hostname or address."""

    name: str
    address: str
    ports: tuple[tuple[str, int], ...]  # (name, port): a slice's ports apply to each of its endpoints
    ready: bool
    terminating: bool

    @property
    def serving(self) -> bool:
        return self.ready and not self.terminating

    def port(self, name: str | None, default: str) -> int | None:
        """The port called ``name`` (``default`` when None); a slice with one port: that one."""
        want = name or default
        found = [p for n, p in self.ports if n == want]
        if found:
            return found[0]
        return self.ports[0][1] if name is None and len(self.ports) == 1 else None

    def host(self) -> str:
        """The address as a URL's host (IPv6 in brackets)."""
        return f"[{self.address}]" if ":" in self.address else self.address


def slice_endpoints(s: Any) -> list[Endpoint]:
    """The endpoints of a ``V1EndpointSlice`` (the client's model); FQDN slices name no pod and are skipped."""
    if s.address_type == "FQDN":
        return []
    ports = tuple((p.name or "", int(p.port)) for p in s.ports or () if p.port is not None)
    out = []
    for e in s.endpoints or ():
        if not e.addresses:
            continue
        c = e.conditions
        ref = e.target_ref.name if e.target_ref is not None else None
        ready = c is None or c.ready is not False  # nil: ready (the API's rule)
        terminating = c is not None and c.terminating is True  # nil: not terminating
        out.append(Endpoint(ref or e.hostname or e.addresses[0], e.addresses[0], ports, ready, terminating))
    return out


def merge(slices: dict[str, list[Endpoint]]) -> dict[str, Endpoint]:
    """Endpoints by name across slices; a pod listed twice (slices being rebalanced) counts as serving if any
    copy says so."""
    out: dict[str, Endpoint] = {}
    for eps in slices.values():
        for e in eps:
            have = out.get(e.name)
            if have is None or (e.serving and not have.serving):
                out[e.name] = e
    return out


def own_namespace() -> str:
    """The pod's namespace (its service account's), else ``default``."""
    with contextlib.suppress(OSError):
        return SA_NAMESPACE.read_text().strip() or "default"
    return "default"


async def api_client(spec: KubernetesEndpoints) -> Any:
    """A ``kubernetes_asyncio`` ApiClient: ``spec.api_server`` as given, else the in-cluster service account,
    else ``~/.kube/config``."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    if spec.api_server:
        cfg.host = spec.api_server.rstrip("/")
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(cfg)


class EndpointSliceWatch:
    """Follows the EndpointSlices ``spec`` selects; calls ``on_change(endpoints)`` after the list and after
    every change.  ``run()`` until cancelled.  ``lists``/``watches``/``bookmarks`` count requests and
    bookmarks (a 410 Gone shows as one more list)."""

    def __init__(self, spec: KubernetesEndpoints, on_change: Callable[[dict[str, Endpoint]], None]) -> None:
        self.spec = spec
        self.on_change = on_change
        self.namespace = spec.namespace or own_namespace()
        self.selector = spec.label_selector()
        self.slices: dict[str, list[Endpoint]] = {}
        self.resource_version = ""
        self.lists = self.watches = self.bookmarks = 0
        self.synced = asyncio.Event()  # set once the first list is applied

    async def run(self) -> None:
        from kubernetes_asyncio.client import DiscoveryV1Api
        from kubernetes_asyncio.client.exceptions import ApiException

        client = await api_client(self.spec)
        api = DiscoveryV1Api(client)
        delay = BACKOFF_S[0]
        try:
            while True:
                try:
                    await self._list(api)
                    delay = BACKOFF_S[0]
                    await self._watch_until_gone(api)
                    continue  # 410 Gone: list again at once
                except (ApiException, aiohttp.ClientError, TimeoutError, ValueError) as e:
                    log.warning("EndpointSlices %s/%s: %s; listing again in %.1fs", self.namespace,
                                self.selector, _describe(e), delay)
                except Exception:  # e.g. a response the client cannot parse: discovery must not stop for good
                    log.exception("EndpointSlices %s/%s: unexpected error; listing again in %.1fs",
                                  self.namespace, self.selector, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_S[1])
        finally:
            await client.close()

    async def _list(self, api: Any) -> None:
        got = await api.list_namespaced_endpoint_slice(self.namespace, label_selector=self.selector)
        self.lists += 1
        self.slices = {s.metadata.name: slice_endpoints(s) for s in got.items}
        self.resource_version = got.metadata.resource_version
        log.info("EndpointSlices %s/%s: %d slices at resourceVersion %s", self.namespace, self.selector,
                 len(self.slices), self.resource_version)
        self.on_change(merge(self.slices))
        self.synced.set()

    async def _watch_until_gone(self, api: Any) -> None:
        """Watch from the current resourceVersion, re-opening every watch the server ends; returns on 410."""
        from kubernetes_asyncio import watch
        from kubernetes_asyncio.client.exceptions import ApiException

        while True:
            self.watches += 1
            # timeout_seconds also makes the client raise 410 to us instead of retrying the same version
            stream = watch.Watch().stream(
                api.list_namespaced_endpoint_slice, self.namespace, label_selector=self.selector,
                resource_version=self.resource_version, allow_watch_bookmarks=True,
                timeout_seconds=WATCH_TIMEOUT_S, _request_timeout=WATCH_TIMEOUT_S + 30)
            try:
                async with stream:
                    async for event in stream:
                        self._apply(event)
            except ApiException as e:
                if e.status != 410:
                    raise
                log.info("EndpointSlices %s/%s: resourceVersion %s expired (410 Gone); listing again",
                         self.namespace, self.selector, self.resource_version)
                return

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        rv = event["raw_object"].get("metadata", {}).get("resourceVersion")
        if kind == "BOOKMARK":  # nothing changed up to rv: a later re-watch starts there
            self.resource_version = rv or self.resource_version
            self.bookmarks += 1
            return
        obj = event["object"]
        if kind in ("ADDED", "MODIFIED"):
            self.slices[obj.metadata.name] = slice_endpoints(obj)
        elif kind == "DELETED":
            self.slices.pop(obj.metadata.name, None)
        else:
            log.warning("EndpointSlices: unknown watch event type %r", kind)
            return
        self.resource_version = rv or self.resource_version
        self.on_change(merge(self.slices))


def _describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    return f"HTTP {status} {getattr(e, 'reason', '')}".strip() if status else f"{type(e).__name__}: {e}"


class DiscoveringGateway(Protocol):
    """What :class:`GatewayDiscovery` uses of :class:`kvmesh.gateway.app.Gateway` (typed loosely: the gateway
    package imports this one)."""

    @property
    def pool(self) -> Any: ...
    @property
    def feed(self) -> Any: ...
    @property
    def index(self) -> Any: ...
    @property
    def metrics(self) -> Any: ...
    @property
    def policy(self) -> Any: ...
    def subscribe(self, b: Any) -> None: ...
    async def refresh_backends(self) -> None: ...


class GatewayDiscovery:
    """Keeps a gateway's backends equal to the serving endpoints of the engines' EndpointSlices (see the module
    docstring for the states).  Touches only the gateway's event loop."""

    def __init__(self, gw: DiscoveringGateway, spec: KubernetesEndpoints) -> None:
        self.gw = gw
        self.spec = spec
        self.watch = EndpointSliceWatch(spec, self.apply)
        self.known: dict[str, str | None] = {}  # endpoints seen and not yet gone -> their URL
        self._task: asyncio.Task[None] | None = None
        self._check: asyncio.Task[None] | None = None
        self._unchecked = False

    def start(self) -> None:
        self._task = asyncio.create_task(self.watch.run(), name="k8s-discovery")

    async def stop(self) -> None:
        for t in (self._task, self._check):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    def apply(self, endpoints: dict[str, Endpoint]) -> None:
        pool = self.gw.pool
        joined = False
        for name, ep in endpoints.items():
            url = self.url(ep)
            if name in self.known and self.known[name] != url:  # the same pod name at a new address
                self._forget(name)  # (a StatefulSet pod recreated): its old cache and events are gone
            b = pool.get(name)
            if b is not None and not ep.serving:
                pool.backends.remove(b)  # in-flight requests keep their Backend object and finish
                log.info("backend %s is %s: draining", name, "terminating" if ep.terminating else "not ready")
            elif b is None and ep.serving and url is not None:
                b = pool.add(name, url, self.endpoint(ep, KV_EVENTS_PORT), self.endpoint(ep, REPLAY_PORT))
                self.gw.subscribe(b)
                log.info("backend %s joined at %s", name, url)
                joined = True
        for name in self.known.keys() - endpoints.keys():
            self._forget(name)
        self.known = {name: self.url(ep) for name, ep in endpoints.items()}
        if joined:
            self._check_soon()

    def url(self, ep: Endpoint) -> str | None:
        port = ep.port(self.spec.port, "http")
        return None if port is None else f"http://{ep.host()}:{port}"

    @staticmethod
    def endpoint(ep: Endpoint, port_name: str) -> str | None:
        port = ep.port(port_name, port_name)
        return None if port is None else f"tcp://{ep.host()}:{port}"

    def _forget(self, name: str) -> None:
        """A gone engine: out of the pool, its KV-event subscription stopped, its index entries cleared."""
        b = self.gw.pool.get(name)
        if b is not None:
            self.gw.pool.backends.remove(b)
        self.gw.metrics.forget_backend(name, self.gw.policy.name)  # not a series per pod ever seen
        if self.gw.feed is not None:
            self.gw.feed.remove(name)
        n = self.gw.index.forget_engine(name) if self.gw.index is not None else 0
        log.info("backend %s is gone (%d indexed blocks dropped)", name, n)

    def _check_soon(self) -> None:
        """Health-check the newcomers now rather than at the next interval (one round at a time)."""
        self._unchecked = True
        if self._check is None or self._check.done():
            self._check = asyncio.create_task(self._check_loop(), name="k8s-discovery-check")

    async def _check_loop(self) -> None:
        while self._unchecked:
            self._unchecked = False
            await self.gw.refresh_backends()
