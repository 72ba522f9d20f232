"""Where a number came from: the machine (CPU model and the instruction sets PyTorch and ONNX Runtime use), the
code (git commit), and a **record**: the small JSON a measuring command writes (``--record FILE``) so the docs
render their tables from it (``maskssd docs``) instead of having numbers typed into them.

A record is ``{"kind", "title", "created", "machine", "code", "wall_seconds", "command", ...payload}``. Speeds
vary 2.4x between machines of one kind, so a record always names its CPU; its ``isa`` says what PyTorch ran
on (``AVX512`` or ``AVX2`` -- the latter also when held to AVX2, "emulated": by ``ATEN_CPU_CAPABILITY=avx2``
(PyTorch alone) or by ``benchmarks/avx2_cpuid.c`` (CPUID itself answers as an AVX2 CPU; it sets
``MASKSSD_CPUID``), ``emulated_by`` says which).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_VERSION",
    "code_version",
    "cpu_model",
    "machine",
    "make_record",
    "read_record",
    "write_record",
]

RECORD_VERSION = 1
_PACKAGE = Path(__file__).resolve().parent


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else the platform's), e.g. "AMD EPYC 9R45"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_features() -> set[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return set()
    return {k for k, on in features.items() if on}


def busy_cores(seconds: float = 0.2) -> float | None:
    """How many cores other processes kept busy over the next ``seconds`` (Linux ``/proc/stat``; this process
    sleeps meanwhile), else ``None``."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # user..steal; idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def machine(threads: int | None = None, *, load: bool = True) -> dict[str, Any]:
    """The machine a measurement ran on: CPU model, cores, what the CPU has (AVX2, AVX-512, VNNI, AMX) and
    what PyTorch used (``isa``: its kernel level, ``emulated`` when held below what the CPU has), and, with
    ``load``, what else ran when it started (the load average, and :func:`busy_cores`, which takes 0.2 s)."""
    feats = _cpu_features()
    has = [
        name
        for key, name in (("AVX2", "AVX2"), ("AVX512F", "AVX-512"), ("AVX512VNNI", "VNNI"))
        if key in feats
    ]
    out: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_has": "+".join(has) or "none of AVX2/AVX-512",
        "python": platform.python_version(),
    }
    if load and hasattr(os, "getloadavg"):  # what else ran: ~0 idle, ~cores when another job shares it
        out["load_1min"] = round(os.getloadavg()[0], 2)
    busy = busy_cores() if load else None
    if busy is not None:  # the same, now: the 1-minute load lags a job stopped seconds before
        out["busy_cores"] = busy
    if "torch" in sys.modules:
        import torch

        out["torch"] = torch.__version__
        out["threads"] = threads or torch.get_num_threads()
        cap = torch.backends.cpu.get_cpu_capability()
        out["isa"] = cap
        by_cpuid = os.environ.get("MASKSSD_CPUID") == "avx2"  # features above are then the emulated CPU's
        by_aten = (
            bool(os.environ.get("ATEN_CPU_CAPABILITY")) and cap.startswith("AVX2") and "AVX512F" in feats
        )
        out["emulated"] = by_cpuid or by_aten
        if out["emulated"]:
            out["emulated_by"] = "CPUID" if by_cpuid else "ATEN_CPU_CAPABILITY"
    return out


def code_version(path: str | Path = _PACKAGE) -> dict[str, Any]:
    """The git commit of the maskssd code (short) and whether the checkout had uncommitted changes."""
    where = Path(path)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": commit or None, "dirty": bool(dirty)}


def make_record(
    kind: str,
    payload: Mapping[str, Any],
    *,
    title: str = "",
    started: float | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """A record of ``kind`` (``evaluate``, ``compare``, ``seeds``, ``folds``, ``study``, ``benchmark``,
    ``train``) holding ``payload``, with the machine, the code and the wall time since ``started``."""
    return {
        "record": RECORD_VERSION,
        "kind": kind,
        "title": title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "code": code_version(),
        "wall_seconds": None if started is None else round(time.time() - started, 1),
        "command": command if command is not None else ["maskssd", *sys.argv[1:]],
        **payload,
    }


def write_record(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write a record as indented JSON (non-finite numbers as null), atomically."""
    from maskssd.files import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(record), indent=1, sort_keys=False) + "\n")
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """A record, refusing a file that is not one (with its name)."""
    from maskssd.errors import MaskSSDError

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MaskSSDError(f"{path}: not a readable record ({e})") from None
    if not isinstance(doc, dict) or "kind" not in doc or "record" not in doc:
        raise MaskSSDError(f"{path}: not a maskssd record (no 'record' and 'kind')")
    return doc


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
