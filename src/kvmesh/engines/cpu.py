"""Which dtype a vLLM-CPU engine should compute in, from what this CPU does natively.

The demo model is stored in bf16.  A CPU with AVX512-BF16 or AMX (Sapphire Rapids and later; Zen 4+) or
Arm's BF16 extension computes it natively; on anything else (Ice Lake, Skylake, most laptops) vLLM-CPU
emulates bf16 through fp32 conversions, which measured ~3x slower than running in float32 outright
(a 2,900-token prompt: 17 s vs 6 s).  So ``auto`` picks bfloat16 only where it is native.

``choose_dtype`` is pure (flags in, choice out) so it is tested on real flag strings; ``cpu_info`` reads
``/proc/cpuinfo`` once; ``engine_dtype`` resolves and logs the choice once per process.  Benchmarks record
``cpu_info().record()`` because results move ~10x between CPU generations.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import platform
from collections.abc import Iterable
from typing import NamedTuple

log = logging.getLogger(__name__)
NATIVE_BF16_X86 = ("amx_bf16", "avx512_bf16")
RECORDED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
EMULATED_NOTE = "CPU lacks AVX512-BF16/AMX; bf16 would be emulated, ~3x slower"


class CpuInfo(NamedTuple):
    model: str
    arch: str
    flags: frozenset[str]
    cores: int

    def record(self) -> dict[str, object]:
        """What a benchmark result stores about the machine it ran on."""
        return {"model": self.model, "arch": self.arch, "cores": self.cores,
                "flags": {f: f in self.flags for f in RECORDED_FLAGS}}


class DtypeChoice(NamedTuple):
    dtype: str
    reason: str


def parse_cpuinfo(text: str, arch: str, cores: int) -> CpuInfo:
    """``/proc/cpuinfo`` text → model name and feature flags (x86 ``flags``, Arm ``Features``)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first CPU speaks for all of them
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or fields.get("Model name") or fields.get("Hardware") or "unknown"
    flags = fields.get("flags") or fields.get("Features") or ""
    return CpuInfo(model, arch, frozenset(flags.split()), cores)


@functools.cache
def cpu_info() -> CpuInfo:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: nothing known, so auto falls back to float32
        text = ""
    return parse_cpuinfo(text, platform.machine(), os.cpu_count() or 1)


def choose_dtype(flags: Iterable[str], override: str = "auto", arch: str = "x86_64") -> DtypeChoice:
    """bfloat16 where the CPU computes it natively, else float32; ``override`` (not ``auto``) wins."""
    if override != "auto":
        return DtypeChoice(override, "set in the engine config")
    have = set(flags)
    if arch in ("aarch64", "arm64"):
        if "bf16" in have:
            return DtypeChoice("bfloat16", "CPU has Arm BF16")
        return DtypeChoice("float32", "CPU lacks the Arm BF16 extension; bf16 would be emulated, ~3x slower")
    native = [f for f in NATIVE_BF16_X86 if f in have]
    if native:
        return DtypeChoice("bfloat16", f"CPU has {native[0].upper().replace('_', '-')}")
    return DtypeChoice("float32", EMULATED_NOTE)


@functools.cache
def engine_dtype(override: str = "auto", cpu_engine: bool = True) -> DtypeChoice:
    """The choice for this machine, logged once per distinct setting.  A GPU engine (``cpu_engine``
    false) with ``auto`` is left to vLLM, which picks from the model and the GPU."""
    if override == "auto" and not cpu_engine:
        choice = DtypeChoice("auto", "a GPU build of vLLM picks it")
    else:
        info = cpu_info()
        choice = choose_dtype(info.flags, override, info.arch)
    log.info("engine dtype %s (%s; CPU %s)", choice.dtype, choice.reason, cpu_info().model)
    return choice
