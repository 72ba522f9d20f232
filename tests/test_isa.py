"""``benchmarks._isa``: a child process held to AVX2 sees a CPU without AVX-512 or VNNI in every library (PyTorch,
numpy, ONNX Runtime's int8 recipe), still crashes on a real fault, and the int8 export's agreement check holds
on the AVX2 kernels. Skips, saying why, where CPUID cannot be emulated (not Linux x86-64, no ``cpuid_fault``,
no C compiler)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._isa import Avx2, avx2, cpuid_shim, without

REPO = Path(__file__).resolve().parents[1]

SEEN = """
import json, os, torch, onnxruntime
from maskssd.deploy.quantize import cpu_flags, int8_recipe
from maskssd.provenance import machine
m = machine()
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(), "flags": sorted(cpu_flags()),
                  "recipe": int8_recipe(), "emulated_by": m.get("emulated_by"), "cpu_has": m["cpu_has"]}))
"""


def _held() -> dict[str, str]:
    shim, why = cpuid_shim()
    if shim is None:
        pytest.skip(f"CPUID emulation unavailable: {why}")
    return {**os.environ, **avx2().env}


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_every_library_in_the_child_sees_avx2_without_avx512_or_vnni():
    env = _held()
    out = _python(SEEN, env)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["torch"] == "AVX2"
    assert "avx2" in seen["flags"] and "avx512f" not in seen["flags"] and "avx512_vnni" not in seen["flags"]
    assert seen["recipe"] == {"reduce_range": True}  # the int8 recipe of a CPU without VNNI
    assert seen["emulated_by"] == "CPUID" and seen["cpu_has"] == "AVX2"
    plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MASKSSD_CPUID")}
    native = json.loads(_python(SEEN, plain).stdout.splitlines()[-1])
    assert native["emulated_by"] is None  # this process and its other children are left as they are


def test_a_real_fault_still_crashes_and_pythons_faulthandler_still_reports_it():
    env = _held()
    out = _python("import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)", env)
    assert out.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in out.stderr


def test_int8_export_agrees_with_the_float_model_on_the_avx2_kernels():
    """ONNX Runtime's u8s8 kernels without VNNI saturate with 8-bit weights; the export picks 7-bit weights
    there and its own agreement check must pass (as on an AMD Zen 3)."""
    env = _held()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        "-p",
        "no:cacheprovider",
        "tests/test_quantize.py",
    ]
    out = subprocess.run(
        [*cmd, "-k", "export_cli_int8 or recipe"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_where_the_shim_cannot_work_the_child_is_held_by_pytorchs_own_switch(monkeypatch):
    from benchmarks import _isa

    monkeypatch.setattr(_isa, "cpuid_shim", lambda: (None, "no cpuid_fault flag"))
    held = _isa.avx2()
    assert (held.how, held.why, held.all_libraries) == ("ATen", "no cpuid_fault flag", False)
    assert held.env == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.setattr(_isa, "cpuid_shim", lambda: (Path("/nonexistent/avx2_cpuid.so"), ""))
    held = _isa.avx2()  # built but not taking effect (here: not loadable): never labelled CPUID
    assert held.how == "ATen" and "did not take effect" in held.why


def test_the_avx2_child_gets_the_commands_arguments_less_isa_and_record():
    """The child runs the same measurement with no second ISA and no record; held by PyTorch's switch alone it
    gets PyTorch's backends only (ONNX Runtime would run its native kernels there)."""
    from benchmarks.inference_fps import _child_argv

    argv = [
        "--models",
        "384 cpu",
        "--isa",
        "native",
        "avx2",
        "--backends",
        "onnx folded",
        "--record",
        "r.json",
    ]
    assert without(argv, "--isa", "--record") == ["--models", "384 cpu", "--backends", "onnx folded"]
    cpuid, aten = Avx2("CPUID"), Avx2("ATen")
    assert _child_argv(argv, cpuid, ["onnx folded"]) == ["--models", "384 cpu", "--backends", "onnx folded"]
    asked = ["eager folded", "onnx folded", "torchscript"]
    assert _child_argv(argv, aten, asked) == ["--models", "384 cpu", "--backends", "eager folded"]
    assert _child_argv(argv, aten, ["onnx folded"])[-1] == "eager"  # nothing else it could hold: eager alone
    assert aten.reaches(["torch", "onnx", "onnx-int8"]) == ["torch"]  # realtime_decode's predictor backends
