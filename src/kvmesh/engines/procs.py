"""What an engine's process tree holds, read from ``/proc``: its members, its shared-memory files, its port.

A vLLM replica is a session of processes (API server, engine core, workers, multiprocessing's resource
tracker) that kvmesh started with ``start_new_session``, so the session id is the API server's pid.  Used
for three things the supervisor must get right on a shared machine:

- stop in order: the API server first, then wait for the rest of the session to exit by itself (the engine
  core and workers unlink their ``/dev/shm/psm_*`` and ``sem.mp-*`` files on the way out) before any SIGKILL;
- verify the stop: the ``/dev/shm`` files the session had open or mapped are gone (else removed, and said);
- own-engine health: the socket listening on the engine's port belongs to this session, not to another
  stack's engine that answers ``/health`` on the same port.

Linux only; elsewhere every function answers "nothing known" (empty sets, True for ownership).
"""

from __future__ import annotations

import os
import pathlib

_PROC = pathlib.Path("/proc")
SHM = pathlib.Path("/dev/shm")


def session_pids(sid: int) -> set[int]:
    """Live (not zombie) processes of session ``sid``."""
    out: set[int] = set()
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return out
    for d in entries:
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            out.add(int(d.name))
    return out


def shm_files(pids: set[int]) -> set[pathlib.Path]:
    """The ``/dev/shm`` files these processes have mapped or open, by inode: glibc creates a named semaphore
    (``sem.mp-*``) under a temporary name, maps it and links it to its real name, so ``maps`` shows the
    temporary, deleted name; the inode is the same."""
    inodes: set[int] = set()
    for pid in pids:
        inodes |= _mapped_inodes(pid) | _open_inodes(pid)
    out: set[pathlib.Path] = set()
    try:
        entries = list(SHM.iterdir())
    except OSError:
        return out
    for f in entries:
        try:
            if f.stat().st_ino in inodes:
                out.add(f)
        except OSError:  # removed meanwhile
            continue
    return out


def _mapped_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        lines = (_PROC / str(pid) / "maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        f = line.split(maxsplit=5)
        if len(f) == 6 and f[5].startswith(f"{SHM}/"):
            out.add(int(f[4]))
    return out


def _open_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        fds = list((_PROC / str(pid) / "fd").iterdir())
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(fd).startswith(f"{SHM}/"):
                out.add(fd.stat().st_ino)
        except OSError:
            continue
    return out


def _listening_inodes(port: int) -> set[str] | None:
    """Inodes of the TCP sockets listening on ``port`` (None when /proc/net cannot be read)."""
    inodes: set[str] = set()
    read = False
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    return inodes if read else None


def session_owns_port(sid: int, port: int) -> bool:
    """Whether the socket listening on ``port`` belongs to session ``sid`` (True when it cannot be told)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return True
    if not inodes:
        return False
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in session_pids(sid):
        try:
            fds = list((_PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    return True
            except OSError:
                continue
    return False
