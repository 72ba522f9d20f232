"""Process-level settings: the local working folder, and the CPU allocator setting that makes PyTorch faster.

``LOCAL_DIR`` (``mlruns/`` under the working directory) holds the default MLflow store, the Optuna storage,
checkpoints and generated data; every layer that writes locally takes it from here.

glibc returns every freed block above its mmap threshold to the kernel and maps it again on the next
allocation, so each multi-megabyte activation of a CPU training step costs page faults; with the allocator
told to keep freed memory, a training step of ``ssdlite_effnet_lite0`` at batch 16 x 384 px measured 1.8 s
instead of 2.7-3.2 s on 2 cores (``benchmarks/train_step.py``). jemalloc or tcmalloc (PyTorch's CPU tuning guide)
do the same through ``LD_PRELOAD``. The cost: the process keeps its peak memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

#: The local working folder (git-ignored): MLflow store and artifacts, Optuna storage, checkpoints, data.
LOCAL_DIR = Path("mlruns")

#: Set to ``0`` to keep glibc's default allocator behaviour.
ENV_VAR = "MASKSSD_MALLOC_TUNING"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_KEEP = 2_000_000_000  # bytes; below C int max


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc only; a no-op elsewhere). True when the setting took effect."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
