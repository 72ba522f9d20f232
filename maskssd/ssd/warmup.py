"""Compiling the CPU kernels ahead of their first use, in a background process.

On a fresh install the kernels (:mod:`maskssd.ssd.kernels`) compile on first use: ~15-20 s of one core,
once (numba caches them next to the package). :func:`compile_in_background`, called by ``maskssd train``
as it starts, compiles them in a child process while the parent imports its libraries, opens the tracking
store and prepares the data; the parent's first kernel call then waits for the child
(:func:`maskssd.ssd.kernels._lock.wait_for_background_compile`) and loads the compiled code from the cache instead of compiling it.

The child inherits a lock (``flock``) that the parent took before starting it: any process's first kernel
call blocks while it is held, so the kernels are never compiled twice at once. Where the cache is already
filled, or without ``fcntl`` (Windows), nothing is started and the first call compiles (or loads) as before.
The kernels' results do not depend on any of this.
"""

from __future__ import annotations

import os
import subprocess
import sys

from maskssd.ssd.kernels._common import ENABLED
from maskssd.ssd.kernels._lock import KERNELS_DIR, fcntl, holds_lock, lock_path

__all__ = ["cache_is_warm", "compile_all", "compile_in_background"]

_MODULES = ("matching", "mining", "nms")


def _compiled_functions(module: str) -> list[str]:
    """Numba's cache index names (``module.func-LINE``) of a kernel module's compiled functions, from its
    source: numba names an index by the function and its first line (its first decorator's)."""
    import ast

    names = []
    for node in ast.parse((KERNELS_DIR / f"{module}.py").read_text()).body:
        if isinstance(node, ast.FunctionDef) and any("njit" in ast.unparse(d) for d in node.decorator_list):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            names.append(f"{module}.{node.name}-{first}")
    return names


def cache_is_warm() -> bool:
    """Whether numba's cache beside the kernels holds every compiled function of the current sources (a cheap
    look at the index files, without importing numba; with ``NUMBA_CACHE_DIR`` set, the cache is elsewhere and
    this answers False)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return False
    cache = KERNELS_DIR / "__pycache__"
    for module in _MODULES:
        source_time = (KERNELS_DIR / f"{module}.py").stat().st_mtime
        for name in _compiled_functions(module):
            index = list(cache.glob(f"{name}.py*.nbi"))
            if not index or max(p.stat().st_mtime for p in index) < source_time:
                return False
    return True


def compile_in_background() -> subprocess.Popen | None:
    """Start compiling the kernels in a child process, unless they are off, cached, or cannot be locked."""
    if not ENABLED or fcntl is None or cache_is_warm():
        return None
    try:
        fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process is compiling: let it
    except OSError:
        os.close(fd)
        return None
    try:  # the child holds the lock (the same open file) until it exits
        return subprocess.Popen(
            [sys.executable, "-c", "from maskssd.ssd.warmup import compile_all; compile_all()"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
    except OSError:
        return None
    finally:
        os.close(fd)


def compile_all() -> None:
    """Compile (or load) the kernels as training and evaluation call them: the same argument types, hence the
    same compiled code. The background child runs it holding the lock, so it must not wait for it."""
    import torch

    from maskssd.ssd.loss import MultiBoxLoss
    from maskssd.ssd.postprocess import DecodeSpec, postprocess
    from maskssd.ssd.priors import PriorSpec

    holds_lock()
    torch.set_num_threads(1)
    priors = PriorSpec.linear([4, 2, 1], 0.2, 0.9).priors()
    g = torch.Generator().manual_seed(0)
    locs = torch.randn(2, priors.shape[0], 4, generator=g, requires_grad=True)
    scores = torch.randn(2, priors.shape[0], 4, generator=g, requires_grad=True)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.tensor([[0.3, 0.2, 0.9, 0.7], [0.0, 0.0, 0.2, 0.3]])]
    labels = [torch.tensor([1]), torch.tensor([2, 3])]
    MultiBoxLoss(priors)(locs, scores, boxes, labels).total.backward()
    for pre_nms in (None, 400):
        postprocess(locs.detach(), scores.detach(), priors, DecodeSpec(pre_nms_top_k=pre_nms), None)
