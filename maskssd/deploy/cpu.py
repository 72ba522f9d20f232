"""What this CPU can do, as the kernels see it: light (no torch, no ONNX), so choosing a backend costs nothing."""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_flags", "has_vnni"]


def cpu_flags() -> set[str]:
    """The CPU's features as the CPUID instruction reports them to this process (numpy's runtime detection, in
    ``/proc/cpuinfo``'s lower-case names; an emulated CPU answers for itself), else Linux ``/proc/cpuinfo``'s
    flags; empty where neither is readable."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            features = None
    if features:
        names = {"AVX512VNNI": "avx512_vnni", "AVX2": "avx2", "AVX512F": "avx512f"}
        return {names.get(k, k.lower()) for k, on in features.items() if on}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether this CPU has AVX-512 VNNI: int8 dot products that accumulate in 32 bits. (AVX-VNNI alone, which
    numpy's detection does not report, counts as none: 7-bit weights are correct there too, a little coarser.)"""
    flags = cpu_flags() if flags is None else flags
    return "avx512_vnni" in flags
