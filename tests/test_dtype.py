"""The engine dtype follows the CPU: bfloat16 only where it is computed natively, else float32; overridable."""

from __future__ import annotations

import pathlib

import pytest

from kvmesh.config import VllmEngineConfig
from kvmesh.engines.cpu import EMULATED_NOTE, choose_dtype, parse_cpuinfo

# Abridged but verbatim /proc/cpuinfo lines of real machines.
ICE_LAKE_FLAGS = ('fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush '
                  'mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl '
                  'xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma '
                  'cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx '
                  'f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb '
                  'stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f '
                  'avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw '
                  'avx512vl xsaveopt xsavec xgetbv1 xsaves wbnoinvd ida arat avx512vbmi pku ospke '
                  'avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq '
                  'rdpid md_clear flush_l1d arch_capabilities')
ICE_LAKE = f"""processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: {ICE_LAKE_FLAGS}
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
"""
SAPPHIRE_RAPIDS_FLAGS = ('fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush '
                         'mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl '
                         'xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma '
                         'cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx '
                         'f16c rdrand hypervisor lahf_lm abm 3dnowprefetch ssbd ibrs ibpb stibp '
                         'ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f '
                         'avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw '
                         'avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd ida arat '
                         'avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni '
                         'avx512_bitalg tme avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear '
                         'serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d '
                         'arch_capabilities')
SAPPHIRE_RAPIDS = f"""processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8488C
flags		: {SAPPHIRE_RAPIDS_FLAGS}
"""
GRAVITON3_FLAGS = ('fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm '
                   'jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc '
                   'flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng')
GRAVITON3 = f"""processor	: 0
BogoMIPS	: 2100.00
Features	: {GRAVITON3_FLAGS}
CPU implementer	: 0x41
"""


def test_ice_lake_runs_float32() -> None:
    cpu = parse_cpuinfo(ICE_LAKE, "x86_64", 2)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz" and "avx512f" in cpu.flags
    assert choose_dtype(cpu.flags) == ("float32", EMULATED_NOTE)
    assert cpu.record() == {"model": cpu.model, "arch": "x86_64", "cores": 2, "flags": {
        "avx2": True, "avx512f": True, "avx512_bf16": False, "amx_bf16": False, "amx_tile": False}}


def test_sapphire_rapids_runs_bfloat16() -> None:
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS, "x86_64", 8)
    assert choose_dtype(cpu.flags) == ("bfloat16", "CPU has AMX-BF16")
    assert choose_dtype(cpu.flags - {"amx_bf16"}).dtype == "bfloat16"  # AVX512-BF16 alone suffices


def test_arm_bf16_feature() -> None:
    cpu = parse_cpuinfo(GRAVITON3, "aarch64", 4)
    assert choose_dtype(cpu.flags, arch="aarch64").dtype == "bfloat16"
    assert choose_dtype(cpu.flags - {"bf16"}, arch="aarch64").dtype == "float32"
    assert cpu.model == "unknown"


def test_override_wins() -> None:
    ice = parse_cpuinfo(ICE_LAKE, "x86_64", 2).flags
    assert choose_dtype(ice, "bfloat16") == ("bfloat16", "set in the engine config")
    spr = parse_cpuinfo(SAPPHIRE_RAPIDS, "x86_64", 8).flags
    assert choose_dtype(spr, "float32").dtype == "float32"


def test_no_cpuinfo_means_float32() -> None:
    assert choose_dtype(parse_cpuinfo("", "x86_64", 1).flags).dtype == "float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_vllm_gets_the_configured_dtype(dtype: str, tmp_path: pathlib.Path) -> None:
    from kvmesh.engines import VllmEngine

    cfg = VllmEngineConfig.model_validate({"model": "/m", "dtype": dtype})
    cmd = VllmEngine("e", cfg, tmp_path).command()
    assert cmd[cmd.index("--dtype") + 1] == dtype
