"""``benchmarks.forward_parts`` profiles a checkpoint's ONNX Runtime forward and groups it by model part (no
timing is asserted: the shares add up and every part of the model is there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.forward_parts import main, part_of


def test_nodes_group_by_model_part():
    assert part_of("/backbone/blocks.1/blocks.1.0/conv_dw/Conv") == "backbone/blocks.1"
    assert part_of("/neck/smooth.0/Conv") == "neck"
    assert part_of("/cls_head.3/Conv") == part_of("/loc_head.0/loc_head.0.1/Conv")
    assert part_of("Concat_14") == "other (reshapes, concatenations, layout)"


def test_forward_parts_records_each_part_and_its_share(tiny_checkpoint: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime", reason='ONNX Runtime is the [onnx] extra: pip install "maskssd[onnx]"')
    record = tmp_path / "parts.json"
    main(["--checkpoint", str(tiny_checkpoint), "--runs", "3", "--threads", "1", "--record", str(record)])
    [table] = json.loads(record.read_text())["tables"]
    rows = {r["part"]: r for r in table["rows"]}
    assert rows["whole forward (every node)"]["share"] == "100.0%"
    assert "heads (box and class, every level)" in rows and any(p.startswith("backbone") for p in rows)
    parts = [float(r["share"].rstrip("%")) for p, r in rows.items() if p != "whole forward (every node)"]
    assert sum(parts) == pytest.approx(100.0, abs=0.5)
