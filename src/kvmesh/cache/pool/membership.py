"""Pool membership behind one interface, with two implementations: etcd (leases for liveness, watches for
changes) and Kubernetes (the cache-node DaemonSet's EndpointSlices; no etcd needed on a cluster).

A static peer list needs no membership object: the pool takes the configured list as is (``membership`` None);
:func:`make_membership` picks the implementation the node's config names.

``Membership.run(on_change)`` keeps calling ``on_change(peers)`` with the current ``{node_id: (host, port)}``
whenever the set changes; the pool's health checks then decide who is live.

etcd is reached through its v3 JSON gateway (``/v3/kv/...``, ``/v3/lease/...``, ``/v3/watch``) with aiohttp,
which kvmesh already depends on — the Python etcd3 client libraries are unmaintained or gRPC-heavy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from kvmesh.config import CacheNodeConfig, KubernetesEndpoints
from kvmesh.discovery.kubernetes import Endpoint, EndpointSliceWatch

log = logging.getLogger(__name__)
Peers = dict[str, tuple[str, int]]


class Membership(Protocol):
    async def join(self, node_id: str, host: str, port: int, capacity: int) -> None: ...
    async def run(self, on_change: Callable[[Peers], None]) -> None:
        """Until cancelled: report the member set now and after every change."""
        ...
    async def leave(self) -> None: ...


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _range_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return base64.b64encode(bytes(b)).decode()


class EtcdMembership:
    """Each node writes ``<prefix><node_id>`` = {host, port, capacity} under a lease it keeps alive; a node
    that dies stops renewing and its key expires after ``ttl_s``; one that stops revokes it at once."""

    def __init__(self, endpoint: str, prefix: str = "/kvmesh/cache/nodes/", ttl_s: int = 5) -> None:
        self.endpoint, self.prefix, self.ttl_s = endpoint.rstrip("/"), prefix, ttl_s
        self._http: aiohttp.ClientSession | None = None
        self._lease: str | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._revision = 0

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=3))
        return self._http

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._session().post(f"{self.endpoint}{path}", json=body,
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
            r.raise_for_status()
            out: dict[str, Any] = await r.json(content_type=None)
            return out

    async def join(self, node_id: str, host: str, port: int, capacity: int) -> None:
        lease = await self._post("/v3/lease/grant", {"TTL": self.ttl_s})
        self._lease = lease["ID"]
        value = json.dumps({"host": host, "port": port, "capacity": capacity})
        await self._post("/v3/kv/put", {"key": _b64(self.prefix + node_id), "value": _b64(value), "lease": self._lease})
        self._keepalive = asyncio.get_running_loop().create_task(self._renew())
        log.info("joined the cache pool in etcd %s as %s (lease %s, ttl %ds)", self.endpoint, node_id, self._lease,
                 self.ttl_s)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self._post("/v3/lease/keepalive", {"ID": self._lease})
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("etcd lease renewal failed: %s", e)

    async def members(self) -> Peers:
        r = await self._post("/v3/kv/range", {"key": _b64(self.prefix), "range_end": _range_end(self.prefix)})
        self._revision = int(r["header"]["revision"])
        out: Peers = {}
        for kv in r.get("kvs", []):
            v = json.loads(_unb64(kv["value"]))
            out[_unb64(kv["key"])[len(self.prefix):]] = (v["host"], int(v["port"]))
        return out

    async def run(self, on_change: Callable[[Peers], None]) -> None:
        last: Peers | None = None
        while True:
            try:
                now = await self.members()
                if now != last:
                    on_change(now)
                    last = now
                await self._watch_once()  # returns after the first change (or a broken stream)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
                log.warning("etcd membership: %s; retrying", e)
                await asyncio.sleep(1.0)

    async def _watch_once(self) -> None:
        # from the revision the member list was read at: a change in between is not missed
        body = {"create_request": {"key": _b64(self.prefix), "range_end": _range_end(self.prefix),
                                   "start_revision": self._revision + 1}}
        async with self._session().post(f"{self.endpoint}/v3/watch", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                msg = json.loads(line)
                if msg.get("result", {}).get("events"):
                    return

    async def leave(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        try:
            if self._lease is not None:
                await self._post("/v3/lease/revoke", {"ID": self._lease})
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("etcd: could not revoke the lease (%s); the key expires in %ds", e, self.ttl_s)
        finally:
            if self._http is not None:
                await self._http.close()


class KubernetesMembership:
    """Members are the serving endpoints (ready, not terminating) of the cache-node EndpointSlices, followed
    with list/watch (:class:`kvmesh.discovery.kubernetes.EndpointSliceWatch`).  The kubelet's readiness probe and the
    EndpointSlice controller do what etcd's leases do, so ``join``/``leave`` write nothing: a node joins when
    its pod turns ready and leaves when it starts terminating.  A member's id is its pod name (the endpoint's
    ``targetRef``), so each node must run with ``node_id`` = its pod name to tell itself apart; its address
    is the slice's port named ``peer`` (or ``spec.port``, or the slice's only port)."""

    def __init__(self, spec: KubernetesEndpoints) -> None:
        self.spec = spec
        self.watch: EndpointSliceWatch | None = None

    async def join(self, node_id: str, host: str, port: int, capacity: int) -> None:
        log.info("cache pool members come from the EndpointSlices %s (this node: %s, peer port %d)",
                 self.spec.label_selector(), node_id, port)

    async def run(self, on_change: Callable[[Peers], None]) -> None:
        last: Peers | None = None

        def changed(endpoints: dict[str, Endpoint]) -> None:
            nonlocal last
            peers = {n: (e.address, p) for n, e in endpoints.items()
                     if e.serving and (p := e.port(self.spec.port, "peer")) is not None}
            if peers != last:
                last = peers
                on_change(peers)

        self.watch = EndpointSliceWatch(self.spec, changed)
        await self.watch.run()

    async def leave(self) -> None:
        pass  # the endpoint leaves the slices when the pod terminates


def make_membership(cfg: CacheNodeConfig) -> Membership | None:
    """The membership ``cfg`` configures; None for a static peer list."""
    if cfg.discovery == "kubernetes":
        return KubernetesMembership(cfg.kubernetes)
    if cfg.etcd:
        return EtcdMembership(cfg.etcd, ttl_s=cfg.etcd_ttl_s)
    return None
