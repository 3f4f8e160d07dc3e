"""What this CPU offers int8 convolutions (torch-free; read by export, parity and the runtime).

x86 CPUs without VNNI or AMX multiply int8 through u8 x s8 pairs summed in 16 bits, which saturate when the
weights use the full int8 range. ``cxr-export int8`` tries 7-bit weights beside full-range ones and keeps the
better on the CPU it runs on, so a graph chosen on a VNNI CPU can have full-range weights that lose accuracy
on an older one (on a 2-core AVX2 EPYC, full-range weights agreed with fp32 on 0.781 of held-out images where
7-bit ones agreed on 0.938: ``benchmarks/results/cpu-2core/int8``).
"""

from __future__ import annotations

import platform
from pathlib import Path

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
NO_INT8_DOT = "no VNNI/AMX int8 instructions"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # what OpenVINO's CPU plugin computes bf16 with
NO_BF16 = "no AVX512-BF16/AMX-BF16 instructions"
VECTOR_ISAS = ("avx512f", "avx2", "sse4_2", "asimd")  # widest first


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where they cannot be read (not Linux)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def _present(wanted: tuple[str, ...], none: str, flags: set[str] | None) -> str:
    """Which of ``wanted`` the CPU reports, comma-separated; ``none`` if none; 'unknown' without flags."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "unknown"
    found = [flag for flag in wanted if flag in flags]
    return ", ".join(found) if found else none


def cpu_int8_features(flags: set[str] | None = None) -> str:
    """The CPU's int8 dot-product instructions, or NO_INT8_DOT, or 'unknown'."""
    return _present(INT8_DOT_FLAGS, NO_INT8_DOT, flags)


def cpu_bf16_features(flags: set[str] | None = None) -> str:
    """The CPU's bf16 instructions, or NO_BF16, or 'unknown' (not Linux: no flags to read)."""
    return _present(BF16_FLAGS, NO_BF16, flags)


def bf16_refusal(flags: set[str] | None = None) -> str | None:
    """Why bf16 cannot run on this CPU (OpenVINO would quietly compute f32 instead), or None."""
    found = cpu_bf16_features(flags)
    if found in (NO_BF16, "unknown"):
        has = "unknown instructions" if found == "unknown" else found
        return f"bf16 needs a CPU with AVX512-BF16 or AMX-BF16; this one has {has}"
    return None


def cpu_vector_isa(flags: set[str] | None = None) -> str:
    """The widest vector instruction set the CPU reports (two hosts both called 'AMD EPYC' differ here)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "unknown"
    return next((isa for isa in VECTOR_ISAS if isa in flags), "none of " + ", ".join(VECTOR_ISAS))


def saturating_int8_cpu(flags: set[str] | None = None) -> bool:
    """True on an x86 CPU known to lack VNNI and AMX: its int8 sums can saturate with full-range weights."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return cpu_int8_features(flags) == NO_INT8_DOT
