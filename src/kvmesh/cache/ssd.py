"""The SSD tier: one file per object under a directory, sharded by key prefix.

File = ``MAGIC`` + 4-byte header length + msgpack :class:`ObjectMeta` + payload.  Writes go to a temporary
name and are renamed into place, so a reader sees a whole object or none (a crash mid-write leaves a stray
``.tmp`` that the start-up scan removes).  Every read verifies the payload's xxh3-128 checksum; a mismatch is
reported as corruption, and the caller treats it as a miss.  All methods do blocking file I/O: the node runs
them in a thread pool, never on its event loop.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import struct
from collections.abc import Iterator

import msgspec

from kvmesh.cache.chunk import CorruptObject, ObjectMeta, checksum

log = logging.getLogger(__name__)
MAGIC = b"KVMC\x01"
_HLEN = struct.Struct(">I")


class DiskFull(Exception):
    """No space left (or quota) on the SSD tier's filesystem."""


_meta_dec = msgspec.msgpack.Decoder(ObjectMeta)
_enc = msgspec.msgpack.Encoder()


class SsdStore:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: bytes) -> pathlib.Path:
        h = key.hex()
        return self.root / h[:2] / h[2:4] / f"{h}.kv"

    def write(self, meta: ObjectMeta, payload: memoryview | bytes) -> int:
        """Write atomically; returns bytes on disk.  Raises :class:`DiskFull` (nothing left behind)."""
        p = self.path(meta.key)
        head = _enc.encode(meta)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(MAGIC + _HLEN.pack(len(head)) + head)
                f.write(payload)
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(e)) from None
            raise
        return len(MAGIC) + 4 + len(head) + len(payload)

    def read_meta(self, p: pathlib.Path) -> tuple[ObjectMeta, int]:
        """Header of a file and the payload's offset in it."""
        with open(p, "rb") as f:
            pre = f.read(len(MAGIC) + 4)
            if len(pre) < len(MAGIC) + 4 or not pre.startswith(MAGIC):
                raise CorruptObject(f"{p.name}: bad magic")
            (n,) = _HLEN.unpack(pre[len(MAGIC):])
            try:
                meta = _meta_dec.decode(f.read(n))
            except msgspec.DecodeError:
                raise CorruptObject(f"{p.name}: bad header") from None
        return meta, len(MAGIC) + 4 + n

    def read_into(self, key: bytes, out: memoryview) -> ObjectMeta:
        """Read the payload into ``out`` (exactly ``meta.size`` bytes) and verify it.  Raises
        FileNotFoundError (gone) or :class:`CorruptObject`."""
        p = self.path(key)
        meta, off = self.read_meta(p)
        if meta.key != key or meta.size != len(out):
            raise CorruptObject(f"{p.name}: header does not match")
        with open(p, "rb", buffering=0) as f:
            f.seek(off)
            got = 0
            while got < meta.size:
                n = f.readinto(out[got:])
                if not n:
                    raise CorruptObject(f"{p.name}: truncated")
                got += n
        if checksum(out) != meta.checksum:
            raise CorruptObject(f"{p.name}: checksum mismatch")
        return meta

    def delete(self, key: bytes) -> None:
        self.path(key).unlink(missing_ok=True)

    def scan(self) -> Iterator[tuple[ObjectMeta, int, float]]:
        """Every readable object (meta, bytes on disk, mtime); removes temporaries and unreadable files."""
        for p in self.root.glob("*/*/*"):
            if p.suffix == ".tmp":
                p.unlink(missing_ok=True)
                continue
            try:
                meta, _ = self.read_meta(p)
                st = p.stat()
            except (CorruptObject, OSError) as e:
                log.warning("SSD tier: dropping unreadable %s (%s)", p, e)
                p.unlink(missing_ok=True)
                continue
            yield meta, st.st_size, st.st_mtime
