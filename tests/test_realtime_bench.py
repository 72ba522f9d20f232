"""``benchmarks.realtime_decode`` runs on a checkpoint and a dataset, checks that ``detect()`` shows what the full
decode shows on every frame, and records its four timings (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert rows[1]["vs baseline"] == rows[0]["case"] and rows[1]["notes"].endswith("(the same)")


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
