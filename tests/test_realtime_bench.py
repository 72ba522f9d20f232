"""``benchmarks.realtime_decode`` runs on a checkpoint and a dataset, checks that ``detect()`` shows what the full
decode shows on every frame, and records its four timings (no timing is asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.realtime_decode import main


def test_realtime_decode_benchmark_records_both_paths(
    tiny_checkpoint: Path, synth_root: Path, tmp_path: Path
):
    record = tmp_path / "rt.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--backends", "torch", "--data", str(synth_root)]
    main([*argv, "--split-name", "default", "--frames", "3", "--rounds", "1", "--record", str(record)])
    rows = json.loads(record.read_text())["tables"][0]["rows"]
    assert [r["case"].split(",")[0] for r in rows] == [
        "torch: shown(predict())",
        "torch: detect()",
        "torch: decode + NMS alone",
        "torch: decode + NMS alone",
    ]
    assert float(rows[1]["FPS"]) > 0
    assert rows[1]["vs baseline"] == rows[0]["case"] and "(the same)" in rows[1]["notes"]
    assert "pre / model / post" in rows[1]["notes"]  # where a frame's time goes


def test_realtime_decode_weighs_ort_threads_spinning(
    tiny_checkpoint: Path, synth_root: Path, tmp_path: Path, monkeypatch
):
    """``--spinning``: detect() again from a session whose threads spin between calls, against the default;
    and two frames in flight, against one at a time."""
    pytest.importorskip("onnxruntime", reason='ONNX Runtime is the [onnx] extra: pip install "maskssd[onnx]"')
    monkeypatch.delenv("MASKSSD_ORT_SPINNING", raising=False)
    record = tmp_path / "rt.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--backends", "onnx", "--data", str(synth_root)]
    main(
        [
            *argv,
            "--split-name",
            "default",
            "--frames",
            "2",
            "--rounds",
            "1",
            "--spinning",
            "--record",
            str(record),
        ]
    )
    rows = json.loads(record.read_text())["tables"][0]["rows"]
    spin = rows[-1]
    assert spin["case"] == "onnx: detect(), threads spinning between calls"
    assert spin["vs baseline"] == rows[1]["case"] and float(spin["FPS"]) > 0
    assert "MASKSSD_ORT_SPINNING" not in os.environ  # the default again for whatever runs next
    flight = rows[-2]  # --in-flight 2, the default: two frames in the model at once
    assert flight["case"].startswith("onnx: detect(), 2 frames in flight")
    assert flight["vs baseline"] == rows[1]["case"] and float(flight["FPS"]) > 0


def test_ort_spinning_is_off_by_default_and_set_by_its_variable(monkeypatch):
    pytest.importorskip("onnxruntime", reason='ONNX Runtime is the [onnx] extra: pip install "maskssd[onnx]"')
    from maskssd.deploy.export import onnx_session_options
    from maskssd.errors import MaskSSDError

    key = "session.intra_op.allow_spinning"
    monkeypatch.delenv("MASKSSD_ORT_SPINNING", raising=False)
    assert onnx_session_options(2).get_session_config_entry(key) == "0"
    monkeypatch.setenv("MASKSSD_ORT_SPINNING", "1")
    assert onnx_session_options(2).get_session_config_entry(key) == "1"
    monkeypatch.setenv("MASKSSD_ORT_SPINNING", "yes please")
    with pytest.raises(MaskSSDError, match="MASKSSD_ORT_SPINNING"):
        onnx_session_options(2)


def test_realtime_decode_runs_again_as_on_an_avx2_cpu(
    tiny_checkpoint: Path, synth_root: Path, tmp_path: Path
):
    """``--isa native avx2``: a second table from a child process held to AVX2 (CPUID where it can be
    emulated, else PyTorch's own switch), both in the record."""
    record = tmp_path / "rt.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--backends", "torch", "--data", str(synth_root)]
    argv += ["--split-name", "default", "--frames", "2", "--rounds", "1", "--isa", "native", "avx2"]
    main([*argv, "--record", str(record)])
    native, held = json.loads(record.read_text())["tables"]
    assert "AVX2" in held["title"]  # the CPU as the child saw it (the suite itself may run held to AVX2)
    assert [r["case"] for r in held["rows"]] == [r["case"] for r in native["rows"]]
