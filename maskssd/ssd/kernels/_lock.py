"""The kernels' compile lock: a process's first kernel call waits while another process (the background
compile of :mod:`maskssd.ssd.warmup`) holds it, so the kernels are never compiled twice at once.

A leaf beside the kernels: the kernels and the warm-up both import it, and it imports neither.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["KERNELS_DIR", "holds_lock", "lock_path", "wait_for_background_compile"]

#: The kernels' sources (numba caches their compiled code in ``__pycache__`` beside them).
KERNELS_DIR = Path(__file__).resolve().parent
_waited = False


def lock_path() -> Path:
    """The lock file of this installation's kernels (one per package folder)."""
    tag = hashlib.sha1(str(KERNELS_DIR).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"maskssd-kernels-{tag}.lock"


def holds_lock() -> None:
    """Mark this process as the lock's holder (the background compile child): it must not wait for itself."""
    global _waited
    _waited = True


def wait_for_background_compile(timeout: float = 600.0) -> None:
    """Wait while a background compile holds the lock (once per process; then a no-op). After ``timeout``
    seconds (a child that hangs) the caller goes on and compiles for itself."""
    global _waited
    if _waited:
        return
    _waited = True
    if fcntl is None:
        return
    try:
        fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
    finally:
        os.close(fd)
