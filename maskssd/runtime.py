"""Process-level settings: the local working folder, and the CPU allocator setting that makes PyTorch faster.

:func:`local_dir` (``mlruns/`` in the project's root folder) holds the default MLflow store, the Optuna storage,
checkpoints and generated data; every layer that writes locally takes it from here. The project's root is found
from the working directory up (:func:`project_root`), so ``maskssd runs`` from ``experiments/`` reads the same
store as from the root, as git finds its repository.

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

#: The local working folder's name (git-ignored): MLflow store and artifacts, Optuna storage, checkpoints, data.
LOCAL_DIR_NAME = "mlruns"
#: What marks a project's root folder, looked for from the working directory up.
PROJECT_MARKERS = (LOCAL_DIR_NAME, "pyproject.toml", ".git")
#: Set to a folder to make it the project's root wherever maskssd runs.
PROJECT_ENV = "MASKSSD_PROJECT_DIR"


def project_root(start: str | Path | None = None) -> Path:
    """``$MASKSSD_PROJECT_DIR``, else the nearest folder from ``start`` (the working directory) up that holds
    ``mlruns/``, ``pyproject.toml`` or ``.git``, else ``start`` itself."""
    if os.environ.get(PROJECT_ENV):
        return Path(os.environ[PROJECT_ENV]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / m).exists() for m in PROJECT_MARKERS):
            return folder
    return here


def local_dir() -> Path:
    """The project's local working folder, ``<project root>/mlruns`` (absolute)."""
    return project_root() / LOCAL_DIR_NAME


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
