"""Which GPUs each engine replica gets: disjoint ``CUDA_VISIBLE_DEVICES`` sets of ``tensor_parallel_size``.

Without this every replica of ``kvmesh up --replicas 8`` would start on GPU 0.  The devices a stack may use
are, in order of precedence: ``[supervisor] gpus`` (an explicit list, e.g. ``"0-7"`` or ``"2,3,6,7"``), the
``CUDA_VISIBLE_DEVICES`` kvmesh itself was started with, else every GPU the machine has.  Replica ``i`` gets
the ``i``-th slice of ``gpus_per_replica`` devices.  A machine with no GPU (vLLM-CPU) assigns nothing.

How many GPUs the machine has comes from ``KVMESH_GPU_COUNT`` when set (tests fake an 8-GPU machine with it),
else from the NVIDIA driver's ``/proc/driver/nvidia/gpus`` entries (no CUDA import, no ``nvidia-smi`` call).
:func:`assign` is pure; asking for more GPUs than there are raises :class:`GpuError` with one line.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

from kvmesh.config import parse_cpu_list

GPU_COUNT_ENV = "KVMESH_GPU_COUNT"
_NVIDIA_PROC = pathlib.Path("/proc/driver/nvidia/gpus")


class GpuError(ValueError):
    """The config asks for GPUs this machine lacks; the message is one line for the CLI."""


def machine_gpu_count(env: Mapping[str, str] | None = None) -> int:
    """GPUs on this machine: ``KVMESH_GPU_COUNT`` when set, else the NVIDIA driver's count (0 without one)."""
    env = os.environ if env is None else env
    override = env.get(GPU_COUNT_ENV)
    if override is not None:
        try:
            return max(0, int(override))
        except ValueError:
            raise GpuError(f"{GPU_COUNT_ENV}={override!r} is not a number") from None
    try:
        return sum(1 for _ in _NVIDIA_PROC.iterdir())
    except OSError:
        return 0


def available_gpus(explicit: str | None, env: Mapping[str, str] | None = None) -> list[str]:
    """Device ids the stack may hand out (see the module docstring for the precedence)."""
    env = os.environ if env is None else env
    count = machine_gpu_count(env)
    if explicit is not None:
        ids = sorted(parse_cpu_list(explicit))  # same syntax as CPU lists: '0-3,6'
        missing = [i for i in ids if i >= count]
        if missing:
            raise GpuError(f"[supervisor] gpus = {explicit!r} names GPU {missing[0]}, but this machine has "
                           f"{count} GPU(s)")
        return [str(i) for i in ids]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(count)]


def assign(devices: Sequence[str], replicas: int, per_replica: int, explicit: bool = False) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each replica: disjoint slices of ``per_replica`` devices.  No devices
    (a CPU machine) gives None for every replica; too few raises :class:`GpuError`."""
    if not devices and not explicit:
        return [None] * replicas
    need = replicas * per_replica
    if need > len(devices):
        raise GpuError(f"{replicas} replica(s) x {per_replica} GPU(s) each (tensor_parallel_size) need {need} "
                       f"GPUs, but {len(devices)} are available ({','.join(devices) or 'none'}); lower "
                       f"--replicas or [engine] tensor_parallel_size, or set [supervisor] gpus")
    return [",".join(devices[i * per_replica:(i + 1) * per_replica]) for i in range(replicas)]
