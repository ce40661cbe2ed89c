"""Remote tiers against real servers: Redis 7, Valkey, an S3-compatible server (moto), a shared directory —
through the tier API and through real cache nodes that share the tier."""

from __future__ import annotations

import asyncio
import os
import pathlib
import uuid
from collections.abc import Iterator

import pytest

from kvmesh.cache.chunk import CorruptObject, ObjectMeta, checksum
from kvmesh.cache.client import NodeClient
from kvmesh.cache.node import CacheNode
from kvmesh.cache.protocol import CommitItem
from kvmesh.cache.remote import RemoteTier, make_remote, pack, unpack
from kvmesh.config import CacheNodeConfig
from tests.helpers import LoopThread
from tests.servers import redis_cluster, redis_like, s3_server

KINDS = ["redis", "redis-cluster", "valkey", "s3", "fs"]


@pytest.fixture(params=KINDS)
def remote_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    kind = request.param
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kvmesh-test")  # the test server takes any credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "kvmesh-test")
    if kind in ("redis", "valkey"):
        with redis_like(kind, tmp_path) as url:
            yield url
    elif kind == "redis-cluster":
        with redis_cluster(tmp_path) as url:
            yield url
    elif kind == "s3":
        with s3_server() as endpoint:
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="kvmesh-chunks")
            yield f"s3://kvmesh-chunks/kv?endpoint={endpoint}"
    else:
        yield f"file://{tmp_path / 'shared'}"


def obj(size: int = 4096) -> tuple[ObjectMeta, bytes]:
    data = os.urandom(size)
    return ObjectMeta(uuid.uuid4().bytes, size, checksum(data), None, [1, 2, 3], 3, None), data


def test_tier_roundtrip_and_integrity(remote_url: str) -> None:
    async def go() -> None:
        tier: RemoteTier = make_remote(remote_url, ttl_s=3600)
        try:
            meta, data = obj()
            assert await tier.get(meta.key) is None
            assert await tier.put(meta.key, pack(meta, data))
            assert await tier.exists([meta.key, uuid.uuid4().bytes]) == [True, False]
            blob = await tier.get(meta.key)
            assert blob is not None
            got, payload = unpack(blob, meta.key)
            assert bytes(payload) == data and got.token_ids == [1, 2, 3]
            bad = bytearray(blob)
            bad[-1] ^= 0xFF
            with pytest.raises(CorruptObject):
                unpack(bytes(bad), meta.key)
            with pytest.raises(CorruptObject):
                unpack(blob, uuid.uuid4().bytes)  # another key's bytes are never served
        finally:
            await tier.close()

    asyncio.run(go())


def test_redis_objects_get_the_ttl(tmp_path: pathlib.Path) -> None:
    import redis

    with redis_like("redis", tmp_path) as url:
        async def go() -> bytes:
            tier = make_remote(url, ttl_s=120)
            meta, data = obj()
            await tier.put(meta.key, pack(meta, data))
            await tier.close()
            return meta.key

        key = asyncio.run(go())
        ttl = redis.Redis.from_url(url).ttl(b"kvmesh:" + key.hex().encode())
        assert 0 < ttl <= 120


def node(tmp: pathlib.Path, name: str, remote_url: str) -> CacheNode:
    """A DRAM-only node over the remote tier (no events, no HTTP: several share ``tmp``)."""
    arena = pathlib.Path("/dev/shm") / f"kvmesh-test-{uuid.uuid4().hex[:8]}"
    return CacheNode(CacheNodeConfig(socket=str(tmp / f"{name}.sock"), arena_path=str(arena), dram_mib=8, ssd_mib=0,
                                     events=False, http_port=None, remote=remote_url), tmp)


def test_two_nodes_share_the_tier(remote_url: str, tmp_path: pathlib.Path, loop_thread: LoopThread) -> None:
    a, b = node(tmp_path, "a", remote_url), node(tmp_path, "b", remote_url)
    loop_thread.run(a.start())
    loop_thread.run(b.start())
    ca, cb = NodeClient(a.socket_path), NodeClient(b.socket_path)
    try:
        data = {uuid.uuid4().bytes: os.urandom(64 << 10) for _ in range(5)}
        for k, v in data.items():
            [view] = ca.reserve([(k, len(v))])
            assert view is not None
            view[:] = v
            view.release()
            ca.commit([CommitItem(k, checksum(v), None, [], 16)])
        assert a.remote is not None
        loop_thread.run(a.remote.settle())
        keys = list(data)
        assert cb.lookup(keys) == 5  # b never saw them: found in the shared tier
        leases = cb.get(keys)
        assert [bytes(le.view) for le in leases] == list(data.values()) and all(le.verify() for le in leases)
        cb.release(leases)
        assert keys[0] in b.store.dram  # a local copy now
    finally:
        ca.close()
        cb.close()
        loop_thread.run(a.stop())
        loop_thread.run(b.stop())


def test_unreachable_tier_is_a_miss(tmp_path: pathlib.Path, loop_thread: LoopThread) -> None:
    n = node(tmp_path, "x", "redis://127.0.0.1:1/0")  # nothing listens there
    loop_thread.run(n.start())
    c = NodeClient(n.socket_path)
    try:
        k, v = uuid.uuid4().bytes, os.urandom(4096)
        [view] = c.reserve([(k, len(v))])
        assert view is not None
        view[:] = v
        view.release()
        assert c.commit([CommitItem(k, checksum(v), None, [], 16)])  # the write-behind fails quietly
        assert c.lookup([uuid.uuid4().bytes]) == 0 and c.get([uuid.uuid4().bytes]) == []
        assert c.lookup([k]) == 1  # local DRAM unaffected
    finally:
        c.close()
        loop_thread.run(n.stop())
