"""A CPU without AVX-512 on yours: the environment a benchmark's child process runs in to see an AVX2 machine.

Two ways, the better one where it works:

- **CPUID** (``avx2_cpuid.c``, Linux x86-64 with the ``cpuid_fault`` flag and a C compiler): every library in
  the process (PyTorch, oneDNN, ONNX Runtime, numpy, numba) is told the CPU has no AVX-512 and no VNNI, and
  runs its AVX2 kernels natively. The only way to see ONNX Runtime's AVX2 kernels at full speed.
- **ATen** (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``): PyTorch and oneDNN only; ONNX Runtime still
  uses what the CPU has, so its numbers are left out there.

Either way the hardware stays this CPU's (a real Zen 3 laptop or server has other clocks, caches and memory):
it shows what the instruction set costs, not a named machine's speed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskssd.files import user_cache

SOURCE = Path(__file__).with_name("avx2_cpuid.c")

#: PyTorch's ATen kernels and oneDNN's convolutions held to AVX2 by their own switches.
ATEN_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@dataclass(frozen=True)
class Avx2:
    """How a child process is held to AVX2: ``how`` is ``"CPUID"`` (every library) or ``"ATen"`` (PyTorch
    only); ``env`` is added to the child's; ``why`` says why CPUID could not be used."""

    how: str
    env: dict[str, str] = field(default_factory=dict)
    why: str = ""

    @property
    def all_libraries(self) -> bool:
        return self.how == "CPUID"

    @property
    def label(self) -> str:
        return f"avx2 ({self.how})"

    def reaches(self, backends: list[str]) -> list[str]:
        """The ``backends`` this hold makes run AVX2 kernels: every one under CPUID; under ATen's switch only
        PyTorch's own (ONNX Runtime reads CPUID itself, TorchScript's fuser compiles for the CPU it finds)."""
        return [b for b in backends if self.all_libraries or not b.startswith(("onnx", "torchscript"))]


def cache_dir() -> Path:
    return user_cache()


def cpuid_shim() -> tuple[Path | None, str]:
    """The built shim (compiled once per source version into the user's cache), or ``None`` and why not."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"CPUID emulation needs Linux on x86-64 (this is {sys.platform} {platform.machine()})"
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return None, "cannot read /proc/cpuinfo"
    if "cpuid_fault" not in flags.split():
        return None, "this CPU or VM cannot make CPUID fault (no cpuid_fault flag)"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) to build benchmarks/avx2_cpuid.c"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = cache_dir() / f"avx2_cpuid-{digest}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        built = subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"],
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            return None, f"building {SOURCE.name} failed: {built.stderr.strip()[-300:]}"
        tmp.replace(out)
    return out, ""


def avx2() -> Avx2:
    """The best AVX2 emulation this machine allows (CPUID where it can, else ATen)."""
    shim, why = cpuid_shim()
    if shim is None:
        return Avx2("ATen", dict(ATEN_ENV), why)
    preload = " ".join(p for p in (str(shim), os.environ.get("LD_PRELOAD", "")) if p)
    env = {"LD_PRELOAD": preload}
    probe = [sys.executable, "-c", "import os; print(os.environ.get('MASKSSD_CPUID', ''))"]
    seen = subprocess.run(probe, env={**os.environ, **env}, capture_output=True, text=True)
    if seen.stdout.strip() != "avx2":  # the shim sets it only where Linux made CPUID fault
        return Avx2(
            "ATen", dict(ATEN_ENV), f"the CPUID shim did not take effect: {seen.stderr.strip()[-200:]}"
        )
    return Avx2("CPUID", env)


def add_isa_arg(p: argparse.ArgumentParser) -> None:
    """``--isa native avx2`` (and the hidden ``--child-json`` its AVX2 child writes to), one meaning in every
    benchmark that has it."""
    p.add_argument(
        "--isa",
        nargs="+",
        choices=("native", "avx2"),
        default=["native"],
        help="avx2: also run as on a CPU without AVX-512 or VNNI, in a child process (benchmarks._isa: every "
        "library's AVX2 kernels where CPUID can be emulated, else PyTorch's alone and no ONNX Runtime)",
    )
    p.add_argument("--child-json", help=argparse.SUPPRESS)


def without(argv: list[str], *options: str) -> list[str]:
    """``argv`` less ``options`` and their values: a command's own arguments for its AVX2 child."""
    out, skip = [], False
    for arg in argv:
        if arg.startswith("--"):
            skip = arg in options
        if not skip:
            out.append(arg)
    return out


def tables_per_isa(
    a: argparse.Namespace,
    module: str,
    argv: list[str] | None,
    run: Callable[[argparse.Namespace], Any],
    backends: list[str] | None = None,
) -> list[Any] | None:
    """The tables ``run(a)`` makes for every ``--isa`` asked: natively in this process, held to AVX2 in a child
    (``python -m module``, the same arguments, only the ``backends`` the hold reaches). In the child itself it
    writes its table to ``--child-json`` and returns None."""
    import json

    from benchmarks._timing import in_child

    tables = []
    if "native" in a.isa or a.child_json:
        tables.append(run(a))
    if a.child_json:
        Path(a.child_json).write_text(json.dumps(tables[0]))
        return None
    if "avx2" in a.isa:
        held = avx2()
        reached = held.reaches(backends or ["onnx"])
        if reached:
            child = without(sys.argv[1:] if argv is None else argv, "--isa", "--record", "--backends")
            tables.append(
                in_child(module, [*child, *(["--backends", *reached] if backends else [])], held.env)
            )
        else:
            print(f"AVX2 left out: ONNX Runtime cannot be held to AVX2 here ({held.why})")
    return tables
