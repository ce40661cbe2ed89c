"""Pool membership behind one interface; etcd implements it (leases for liveness, watches for changes).

A static peer list needs no membership object: the pool takes the configured list as is (``membership`` None).

``Membership.run(on_change)`` keeps calling ``on_change(peers)`` with the current ``{node_id: (host, port)}``
whenever the set changes; the pool's health checks then decide who is live.  A Kubernetes implementation
(Endpoints/EndpointSlices of a headless Service) fits the same interface.

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
