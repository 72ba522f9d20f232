"""Compiling the CPU kernels in a background process (``maskssd train`` on a fresh install): the child holds the
lock until it is done, a first kernel call waits for it, and nothing is started where it is not needed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from maskssd.ssd import warmup
from maskssd.ssd.kernels import _lock

pytestmark = pytest.mark.skipif(_lock.fcntl is None, reason="needs fcntl (POSIX)")


@pytest.fixture()
def fresh_wait(monkeypatch):
    """Forget that this process already waited once."""
    monkeypatch.setattr(_lock, "_waited", False)


def test_a_first_kernel_call_waits_for_the_process_holding_the_lock(tmp_path, fresh_wait):
    started, done = tmp_path / "started", tmp_path / "done"
    holder = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(_lock.lock_path())!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"open({str(started)!r}, 'w').close()\n"
        "time.sleep(1.0)\n"
        f"open({str(done)!r}, 'w').close()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", holder])
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists()
    _lock.wait_for_background_compile()
    assert done.exists()  # it returned only once the holder let go
    assert child.wait(timeout=60) == 0
    assert _lock._waited  # later calls return at once


def test_the_background_compile_holds_the_lock_until_it_is_done(monkeypatch, fresh_wait):
    """With the cache warm the child only loads the kernels: a few seconds, the same protocol."""
    monkeypatch.setattr(warmup, "cache_is_warm", lambda: False)
    child = warmup.compile_in_background()
    assert child is not None
    assert warmup.compile_in_background() is None  # the lock is taken: nobody starts a second one
    _lock.wait_for_background_compile()
    assert child.wait(timeout=30) == 0  # released when the child finished, not before


def test_nothing_starts_when_not_needed(monkeypatch, fresh_wait):
    monkeypatch.setattr(warmup, "cache_is_warm", lambda: True)
    assert warmup.compile_in_background() is None
    monkeypatch.setattr(warmup, "cache_is_warm", lambda: False)
    monkeypatch.setattr(warmup, "ENABLED", False)  # MASKSSD_CPU_KERNELS=0, parsed once by the kernels
    assert warmup.compile_in_background() is None


def test_cache_is_warm_once_the_kernels_ran(monkeypatch):
    import torch

    from maskssd.ssd.loss import MultiBoxLoss
    from maskssd.ssd.postprocess import DecodeSpec, postprocess
    from maskssd.ssd.priors import PriorSpec

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    priors = PriorSpec.linear([2, 1], 0.3, 0.9).priors()
    postprocess(torch.zeros(1, len(priors), 4), torch.zeros(1, len(priors), 3), priors, DecodeSpec())
    # matching and mining: every kernel module's code is then in numba's cache
    boxes, labels = [torch.tensor([[0.1, 0.1, 0.6, 0.7]])], [torch.tensor([1])]
    MultiBoxLoss(priors)(torch.zeros(1, len(priors), 4), torch.randn(1, len(priors), 3), boxes, labels)
    assert warmup.cache_is_warm()
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/elsewhere")  # numba's cache is then elsewhere: unknown
    assert not warmup.cache_is_warm()
