"""A stand-in for the Kubernetes API server: list and watch of ``discovery.k8s.io/v1`` EndpointSlices, nothing more.

No API server can run on these machines, so discovery tests talk to this one; everything else on the path —
the official client (``kubernetes_asyncio``), its deserialisation into ``V1EndpointSlice``, the gateway and
the cache nodes — is real.  It speaks the wire protocol the client expects (Kubernetes docs, "API concepts:
efficient detection of changes"):

- ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...`` → ``200`` JSON
  ``EndpointSliceList`` (``kind``, ``apiVersion``, ``metadata.resourceVersion`` of the list; items without
  ``kind``/``apiVersion``, as the server serialises list items).
- the same with ``watch=true&resourceVersion=N[&allowWatchBookmarks=true][&timeoutSeconds=S]`` → ``200``,
  ``Transfer-Encoding: chunked``, one JSON watch event per line: ``{"type": "ADDED"|"MODIFIED"|"DELETED",
  "object": <EndpointSlice with kind/apiVersion>}``, ``{"type": "BOOKMARK", "object": {"kind", "apiVersion",
  "metadata": {"resourceVersion"}}}`` (only when bookmarks were allowed), and — for a resourceVersion older
  than the retained history — ``{"type": "ERROR", "object": <Status: Failure, reason Expired, code 410>}``
  after which the server ends the stream.  A watch without resourceVersion (or "0") first gets a synthetic
  ADDED per existing object.  Events after N only; the stream ends after ``timeoutSeconds``.
- Label selectors: equality (``k=v``, ``k==v``, ``k!=v``) and existence (``k``, ``!k``), comma = and; an
  object that stops (starts) matching reaches a watcher as DELETED (ADDED), as the watch cache sends it.

resourceVersions are one counter over all writes, as etcd's revision is.  Tests script it: ``apply`` (create
or replace a slice), ``delete``, ``bookmark``, ``compact`` (forget history: older versions get 410) and
``end_watches`` (close every open stream, as the server's watch timeout or a restart does).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

GROUP_VERSION = "discovery.k8s.io/v1"
PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
Obj = dict[str, Any]


def endpoint_slice(name: str, service: str, endpoints: list[Obj], ports: dict[str, int],
                   labels: dict[str, str] | None = None) -> Obj:
    """An EndpointSlice as the EndpointSlice controller writes it (namespace and versions set on apply)."""
    return {"metadata": {"name": name, "generateName": f"{service}-",
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                    **(labels or {})}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()]}


def pod_endpoint(pod: str, ip: str, ready: bool = True, terminating: bool = False, node: str = "node-1") -> Obj:
    """One pod's entry: while terminating, ``ready`` is false and ``serving`` says whether it still passes
    its readiness probe (the controller's rule)."""
    return {"addresses": [ip], "nodeName": node,
            "conditions": {"ready": ready and not terminating, "serving": ready, "terminating": terminating},
            "targetRef": {"kind": "Pod", "namespace": "", "name": pod, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, pod))}}


def status_410(message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Expired", "code": 410}


def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """``a=b,c!=d,e,!f`` → [(key, op, value)]; ValueError for set-based syntax, which this stand-in lacks."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "(" in part or " in " in part or " notin " in part:
            raise ValueError(f"unsupported selector {part!r}")
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append((k.strip(), "!=", v.strip()))
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            out.append((k.strip(), "=", v.strip()))
        elif part.startswith("!"):
            out.append((part[1:].strip(), "!", ""))
        else:
            out.append((part, "exists", ""))
    return out


def matches(obj: Obj | None, selector: list[tuple[str, str, str]]) -> bool:
    if obj is None:
        return False
    labels = obj["metadata"].get("labels") or {}
    for k, op, v in selector:
        ok = {"=": labels.get(k) == v, "!=": labels.get(k) != v, "exists": k in labels, "!": k not in labels}[op]
        if not ok:
            return False
    return True


@dataclass
class _Watcher:
    namespace: str
    selector: list[tuple[str, str, str]]
    bookmarks: bool
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)


class FakeApiServer:
    """Serves on 127.0.0.1 from the event loop it is started on; scripting methods run on that loop too."""

    def __init__(self) -> None:
        self.rv = 1
        self.objects: dict[tuple[str, str], Obj] = {}
        self.history: list[tuple[int, str, Obj | None, Obj]] = []  # (rv, namespace/name, before, after-or-deleted)
        self.oldest = 1  # a watch from a version below this gets 410 Gone
        self.watchers: list[_Watcher] = []
        self.requests: list[str] = []  # "list" / "watch" / "watch-410": what the clients asked, in order
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(PATH, self._endpointslices)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.end_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- scripting -------------------------------------------------------------------------------------
    def apply(self, namespace: str, obj: Obj) -> str:
        """Create or replace a slice (ADDED or MODIFIED); returns its new resourceVersion."""
        obj = copy.deepcopy(obj)
        name = obj["metadata"]["name"]
        before = self.objects.get((namespace, name))
        meta = obj["metadata"]
        meta["namespace"] = namespace
        meta["uid"] = before["metadata"]["uid"] if before else str(uuid.uuid4())
        meta["creationTimestamp"] = before["metadata"]["creationTimestamp"] if before else "2026-01-01T00:00:00Z"
        meta["generation"] = before["metadata"]["generation"] + 1 if before else 1
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self.objects[(namespace, name)] = obj
        self._record(namespace, before, obj, deleted=False)
        return meta["resourceVersion"]

    def delete(self, namespace: str, name: str) -> None:
        before = self.objects.pop((namespace, name))
        gone = copy.deepcopy(before)
        self.rv += 1
        gone["metadata"]["resourceVersion"] = str(self.rv)  # a deletion carries the deleting revision
        self._record(namespace, before, gone, deleted=True)

    def bookmark(self) -> None:
        """Tell every watcher that allowed bookmarks: nothing for you up to the current version."""
        for w in self.watchers:
            if w.bookmarks:
                w.queue.put_nowait({"type": "BOOKMARK", "object": {
                    "kind": "EndpointSlice", "apiVersion": GROUP_VERSION,
                    "metadata": {"resourceVersion": str(self.rv)}}})

    def compact(self) -> None:
        """Drop the history: a watch from any version before now gets 410 Gone (etcd compaction)."""
        self.history.clear()
        self.oldest = self.rv

    def end_watches(self) -> None:
        for w in self.watchers:
            w.queue.put_nowait(None)

    def _record(self, namespace: str, before: Obj | None, after: Obj, deleted: bool) -> None:
        self.history.append((self.rv, namespace, before, after if not deleted else {**after, "_deleted": True}))
        for w in self.watchers:
            ev = _event_for(w, namespace, before, after, deleted)
            if ev is not None:
                w.queue.put_nowait(ev)

    # ---- HTTP ------------------------------------------------------------------------------------------
    async def _endpointslices(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        namespace = request.match_info["namespace"]
        try:
            selector = parse_selector(q.get("labelSelector", ""))
        except ValueError as e:
            return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                      "message": str(e), "reason": "BadRequest", "code": 400}, status=400)
        if _bool(q.get("watch")):
            return await self._watch(request, namespace, selector)
        self.requests.append("list")
        items = [_wire(o, with_kind=False) for (ns, _), o in sorted(self.objects.items())
                 if ns == namespace and matches(o, selector)]
        return web.json_response({"kind": "EndpointSliceList", "apiVersion": GROUP_VERSION,
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def _watch(self, request: web.Request, namespace: str,
                     selector: list[tuple[str, str, str]]) -> web.StreamResponse:
        q = request.query
        since = q.get("resourceVersion", "")
        w = _Watcher(namespace, selector, _bool(q.get("allowWatchBookmarks")))
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if since not in ("", "0") and int(since) < self.oldest:
            self.requests.append("watch-410")
            msg = f"too old resource version: {since} ({self.oldest})"
            await resp.write(_line({"type": "ERROR", "object": status_410(msg)}))
            await resp.write_eof()
            return resp
        self.requests.append("watch")
        if since in ("", "0"):  # "any": the current state as ADDED, then changes
            for (ns, _), o in sorted(self.objects.items()):
                if ns == namespace and matches(o, selector):
                    w.queue.put_nowait({"type": "ADDED", "object": _wire(o)})
        else:
            for rv, ns, before, after in self.history:
                if rv > int(since):
                    ev = _event_for(w, ns, before, after, after.get("_deleted", False))
                    if ev is not None:
                        w.queue.put_nowait(ev)
        self.watchers.append(w)
        try:
            timeout = float(q["timeoutSeconds"]) if "timeoutSeconds" in q else None
            async with asyncio.timeout(timeout):
                while (ev := await w.queue.get()) is not None:
                    await resp.write(_line(ev))
        except (TimeoutError, ConnectionResetError):  # timeoutSeconds passed, or the client went away
            pass
        finally:
            self.watchers.remove(w)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp


def _event_for(w: _Watcher, namespace: str, before: Obj | None, after: Obj, deleted: bool) -> Obj | None:
    """The event a watcher sees for one write, by whether the object matched its selector before and after."""
    if namespace != w.namespace:
        return None
    was, now = matches(before, w.selector), matches(after, w.selector) and not deleted
    if now:
        return {"type": "MODIFIED" if was else "ADDED", "object": _wire(after)}
    if was:  # deleted, or relabelled out of the selection
        return {"type": "DELETED", "object": _wire(after)}
    return None


def _bool(v: str | None) -> bool:
    """A boolean query parameter as the API server parses it (Go's strconv.ParseBool; the Python client
    sends ``True``)."""
    return v in ("1", "t", "T", "true", "TRUE", "True")


def _wire(obj: Obj, with_kind: bool = True) -> Obj:
    body = {k: v for k, v in obj.items() if k != "_deleted"}
    return {"kind": "EndpointSlice", "apiVersion": GROUP_VERSION, **body} if with_kind else body


def _line(ev: Obj) -> bytes:
    return json.dumps(ev, separators=(",", ":")).encode() + b"\n"
