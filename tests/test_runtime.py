"""The CPU allocator setting every ``maskssd`` command applies at start (in a child process: it is per process)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from maskssd.runtime import tune_cpu_allocator; print(tune_cpu_allocator())"


def _run(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MASKSSD_MALLOC_TUNING"}
    if value is not None:
        env["MASKSSD_MALLOC_TUNING"] = value
    return subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_tuning_applies_on_glibc_and_can_be_switched_off():
    assert _run(None) == "True"
    assert _run("1") == "True"
    assert _run("0") == "False"
    assert _run("off") == "False"
