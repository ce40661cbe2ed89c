"""Remote capacity tiers below a node's SSD: Redis/Valkey, S3-compatible object storage, a shared filesystem.

One interface; every backend stores an object as ONE value/object/file in the SSD tier's format (magic,
header with the xxh3-128 checksum, payload), written atomically (a Redis SET, an S3 PUT, a rename), so a
reader sees a whole object or nothing, and verifies the checksum on every read: a mismatch is a miss.
Writes are write-behind (the node spawns them); reads happen on a local + pool miss.  A backend that is down
reads as misses and drops writes (counted); it never fails an engine's request.

URLs: ``redis://host:port/db``, ``rediss://...``, ``redis+cluster://host:port`` (Redis Cluster),
``valkey://host:port`` (same protocol), ``s3://bucket/prefix?endpoint=http://host:port&region=us-east-1``,
``file:///shared/path``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import struct
import time
import urllib.parse
import uuid
from typing import Any, Protocol

import msgspec

from kvmesh.cache.chunk import CorruptObject, ObjectMeta, checksum
from kvmesh.cache.keys import prefix_len
from kvmesh.cache.metrics import CacheMetrics
from kvmesh.cache.ssd import MAGIC, SsdStore
from kvmesh.cache.store import TieredStore

log = logging.getLogger(__name__)
_HLEN = struct.Struct(">I")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(ObjectMeta)


def pack(meta: ObjectMeta, payload: bytes | memoryview) -> bytes:
    head = _enc.encode(meta)
    return b"".join((MAGIC, _HLEN.pack(len(head)), head, payload))


def unpack(blob: bytes, key: bytes) -> tuple[ObjectMeta, memoryview]:
    """Raises :class:`CorruptObject` unless the blob is a whole, verified object for ``key``."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise CorruptObject("bad magic")
    (n,) = _HLEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        meta = _dec.decode(blob[start:start + n])
    except msgspec.DecodeError:
        raise CorruptObject("bad header") from None
    payload = memoryview(blob)[start + n:]
    if meta.key != key or len(payload) != meta.size or checksum(payload) != meta.checksum:
        raise CorruptObject("checksum mismatch")
    return meta, payload


class RemoteTier(Protocol):
    name: str

    async def get(self, key: bytes) -> bytes | None:
        """The packed object, or None (absent or unreachable)."""
        ...

    async def put(self, key: bytes, blob: bytes) -> bool: ...
    async def exists(self, keys: list[bytes]) -> list[bool]: ...
    async def close(self) -> None: ...


class RedisTier:
    """Redis / Valkey, standalone or cluster (``redis.asyncio``); objects expire after ``ttl_s``."""

    def __init__(self, url: str, ttl_s: float | None = None, prefix: str = "kvmesh:") -> None:
        self.name = "redis"
        self.url = url.replace("valkey://", "redis://", 1)
        self.ttl_s, self.prefix = ttl_s, prefix.encode()
        self._r: Any = None

    @property
    def r(self) -> Any:
        """The client, created on first use inside the node's event loop (asyncio clients bind to it)."""
        if self._r is None:
            import redis.asyncio as aioredis
            from redis.asyncio.cluster import RedisCluster

            u = self.url
            self._r = (RedisCluster.from_url(u.replace("redis+cluster://", "redis://", 1))
                       if u.startswith("redis+cluster://") else aioredis.from_url(u))
        return self._r

    def _k(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    async def get(self, key: bytes) -> bytes | None:
        v = await self.r.get(self._k(key))
        return bytes(v) if v is not None else None

    async def put(self, key: bytes, blob: bytes) -> bool:
        ex = int(self.ttl_s) if self.ttl_s else None
        return bool(await self.r.set(self._k(key), blob, ex=max(ex, 1) if ex else None))

    async def exists(self, keys: list[bytes]) -> list[bool]:
        if not keys:
            return []
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._k(k))
        return [bool(x) for x in await pipe.execute()]

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()


class S3Tier:
    """S3-compatible object storage through boto3 (blocking calls run in the default executor)."""

    def __init__(self, url: str) -> None:
        import boto3

        u = urllib.parse.urlparse(url)
        q = urllib.parse.parse_qs(u.query)
        self.name = "s3"
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.s3 = boto3.client("s3", endpoint_url=q.get("endpoint", [None])[0],
                               region_name=q.get("region", ["us-east-1"])[0])

    def _k(self, key: bytes) -> str:
        h = key.hex()
        return f"{self.prefix}/{h[:2]}/{h}" if self.prefix else f"{h[:2]}/{h}"

    async def _run(self, fn: Any, *a: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*a, **kw))

    async def get(self, key: bytes) -> bytes | None:
        try:
            r = await self._run(self.s3.get_object, Bucket=self.bucket, Key=self._k(key))
        except self.s3.exceptions.NoSuchKey:
            return None
        return bytes(await self._run(r["Body"].read))

    async def put(self, key: bytes, blob: bytes) -> bool:
        await self._run(self.s3.put_object, Bucket=self.bucket, Key=self._k(key), Body=blob)
        return True

    async def exists(self, keys: list[bytes]) -> list[bool]:
        async def one(k: bytes) -> bool:
            try:
                await self._run(self.s3.head_object, Bucket=self.bucket, Key=self._k(k))
                return True
            except Exception as e:  # botocore ClientError 404 (HEAD has no body to name it NoSuchKey)
                if "404" in str(e) or "Not Found" in str(e):
                    return False
                raise

        return list(await asyncio.gather(*(one(k) for k in keys)))

    async def close(self) -> None:
        self.s3.close()


class SharedFsTier:
    """A directory every node mounts (NFS, JuiceFS, 3FS...): the SSD tier's file layout and atomic renames."""

    def __init__(self, root: str) -> None:
        self.name = "fs"
        self.store = SsdStore(pathlib.Path(root))

    async def get(self, key: bytes) -> bytes | None:
        p = self.store.path(key)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, p.read_bytes)
        except FileNotFoundError:
            return None

    async def put(self, key: bytes, blob: bytes) -> bool:
        def write() -> None:
            p = self.store.path(key)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # nodes share the directory
            tmp.write_bytes(blob)
            tmp.replace(p)

        await asyncio.get_running_loop().run_in_executor(None, write)
        return True

    async def exists(self, keys: list[bytes]) -> list[bool]:
        return [self.store.path(k).exists() for k in keys]

    async def close(self) -> None:
        return None


def make_remote(url: str, ttl_s: float | None = None) -> RemoteTier:
    scheme = url.split("://", 1)[0]
    if scheme in ("redis", "rediss", "valkey", "redis+cluster"):
        return RedisTier(url, ttl_s)
    if scheme == "s3":
        return S3Tier(url)
    if scheme == "file":
        return SharedFsTier(urllib.parse.urlparse(url).path)
    raise ValueError(f"unknown remote tier {url!r} (redis://, redis+cluster://, valkey://, s3://, file://)")


class RemoteCache:
    """A remote tier as the node uses it: errors become misses (counted), with a short back-off so a down
    backend is not hammered; verified reads land in the local arena."""

    def __init__(self, tier: RemoteTier, metrics: CacheMetrics, store: TieredStore, backoff_s: float = 2.0) -> None:
        self.tier, self.metrics, self.store, self.backoff_s = tier, metrics, store, backoff_s
        self._down_until = 0.0
        self._bg: set[asyncio.Task[None]] = set()

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: BaseException) -> None:
        self.metrics.errors.labels(f"{self.tier.name}_{what}").inc()
        if self._up():
            log.warning("remote tier %s: %s failed (%s: %s); treating as misses for %.0fs", self.tier.name, what,
                        type(e).__name__, e, self.backoff_s)
        self._down_until = time.monotonic() + self.backoff_s

    async def count(self, keys: list[bytes]) -> int:
        if not keys or not self._up():
            return 0
        try:
            held = await self.tier.exists(keys)
        except Exception as e:  # any client/transport error of any backend is a miss
            self._failed("exists", e)
            return 0
        return prefix_len(held)

    async def fetch(self, keys: list[bytes]) -> int:
        """Copy the longest held prefix of ``keys`` into local DRAM; returns its length."""
        n = 0
        for k in keys:
            if k in self.store.dram:
                n += 1
                continue
            if not self._up():
                break
            try:
                blob = await self.tier.get(k)
            except Exception as e:
                self._failed("get", e)
                break
            if blob is None or not self._land(k, blob):
                break
            n += 1
        return n

    def _land(self, key: bytes, blob: bytes) -> bool:
        try:
            meta, payload = unpack(blob, key)
        except CorruptObject as e:
            self.metrics.checksum_failures.labels(self.tier.name).inc()
            log.warning("remote tier %s: object %s: %s (a miss)", self.tier.name, key.hex()[:16], e)
            return False
        if not self.store.put_bytes(meta, payload):
            return False
        self.metrics.hits.labels(self.tier.name).inc()
        self.metrics.bytes_read.labels(self.tier.name).inc(meta.size)
        return True

    def write_behind(self, meta: ObjectMeta, data: bytes | memoryview) -> None:
        if not self._up():
            return
        blob = pack(meta, data)
        t = asyncio.get_running_loop().create_task(self._put(meta.key, blob, meta.size))
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _put(self, key: bytes, blob: bytes, size: int) -> None:
        try:
            await self.tier.put(key, blob)
        except Exception as e:
            self._failed("put", e)
            return
        self.metrics.bytes_written.labels(self.tier.name).inc(size)

    async def settle(self) -> None:
        """Wait for the write-behind queue to drain."""
        while self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)

    async def close(self) -> None:
        await self.settle()
        try:
            await self.tier.close()
        except Exception as e:  # closing a broken connection
            log.debug("remote tier close: %s", e)
