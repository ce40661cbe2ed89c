"""Checks a command makes before it starts anything: its ports are free and its run directory is its own.

A second ``kvmesh up`` on a machine used to print "kvmesh is up", find the first stack's engines on their
ports and call them healthy, while its own engines crash-looped and its exit deleted the first stack's
sockets.  Now every port a command will bind is tried first (one line naming the port and the setting
that chose it), and a stack holds an exclusive lock on its run directory for as long as it runs.

:func:`check_ports` binds each port briefly (``SO_REUSEADDR``, as the servers themselves bind, so a port
in TIME_WAIT is not reported busy); :class:`RunDirLock` is an ``flock`` on ``<run_dir>/kvmesh.lock``,
released by the kernel when the process dies, so a crashed stack never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import socket
from collections.abc import Iterable
from typing import NamedTuple


class PreflightError(RuntimeError):
    """Something the command needs is taken; the message is one line naming it and the setting."""


class PortUse(NamedTuple):
    host: str
    port: int
    setting: str  # how the user changes it: a flag or a config key


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def check_ports(uses: Iterable[PortUse]) -> None:
    """Raise :class:`PreflightError` for the first port that is in use (port 0, any free port, is skipped)."""
    for u in uses:
        if u.port and port_in_use(u.host, u.port):
            raise PreflightError(f"port {u.port} ({u.setting}) is already in use on {u.host}: stop what "
                                 "listens there or change that setting")


class RunDirLock:
    """An exclusive lock on a run directory, held while a stack runs (see the module docstring)."""

    def __init__(self, run_dir: pathlib.Path) -> None:
        self.path = run_dir / "kvmesh.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PreflightError(f"run directory {self.path.parent} is in use by another kvmesh (pid {holder}); "
                                 "give this one its own ([supervisor] run_dir)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
