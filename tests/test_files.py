"""Atomic writes: a failed write keeps the old file and leaves no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskssd.files import atomic_path, write_text_atomic


def test_write_text_atomic_replaces_and_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "split.txt"
    write_text_atomic(target, "one\n")
    write_text_atomic(target, "two\n")
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["split.txt"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="exporter failed"):
        with atomic_path(target, ".onnx") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".onnx" and tmp != target
            tmp.write_text("half a fi")
            raise RuntimeError("exporter failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
