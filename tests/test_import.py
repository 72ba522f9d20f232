"""Your own dataset: COCO JSON and YOLO txt (Ultralytics and darknet layouts) imported into the layout maskssd
reads, checked before anything is written, and trained end to end through the CLI like the face-mask data.

The small datasets are real files: the synthetic scenes' images, with their boxes written as COCO and YOLO
annotations (other class names than the face-mask ones: the classes come from the data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from maskssd.cli import main
from maskssd.data import load_split
from maskssd.data.convert import import_dataset
from maskssd.errors import DataError

NAMES = ["cat", "dog", "rare bird"]  # a space in a class name, as real datasets have


@pytest.fixture(scope="module")
def scenes(synth_root: Path) -> list[tuple[Path, int, int, list[tuple[int, list[float]]], str]]:
    """``(image, width, height, [(class, xyxy)], split)`` of the synthetic dataset."""
    out = []
    for split in ("train", "val", "test"):
        for a in load_split(synth_root, split, "default"):
            objs = [(int(c) - 1, [float(v) for v in b]) for c, b in zip(a.labels, a.boxes, strict=True)]
            out.append((a.image_path, a.width, a.height, objs, split))
    return out


def write_coco(root: Path, scenes) -> Path:
    (root / "images").mkdir(parents=True)
    cats = [{"id": 10 + k, "name": n} for k, n in enumerate(NAMES)]
    docs = {s: {"images": [], "annotations": [], "categories": cats} for s in ("train", "val", "test")}
    for i, (path, w, h, objs, split) in enumerate(scenes):
        shutil.copy(path, root / "images" / path.name)
        docs[split]["images"].append({"id": i, "file_name": path.name, "width": w, "height": h})
        for c, (x1, y1, x2, y2) in objs:
            ann = {"id": len(docs[split]["annotations"]) + 1000 * i, "image_id": i, "category_id": 10 + c}
            docs[split]["annotations"].append({**ann, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
    for split, doc in docs.items():
        (root / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def write_yolo(root: Path, scenes, darknet: bool = False) -> Path:
    for path, w, h, objs, split in scenes:
        sub = "" if darknet else f"/{split}"
        (root / f"images{sub}").mkdir(parents=True, exist_ok=True)
        (root / f"labels{sub}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / f"images{sub}" / path.name)
        lines = [
            f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            for c, (x1, y1, x2, y2) in objs
        ]
        (root / f"labels{sub}" / f"{path.stem}.txt").write_text("\n".join(lines) + "\n")
    if darknet:
        (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    else:
        names = "\n".join(f"  {k}: {n}" for k, n in enumerate(NAMES))
        (root / "data.yaml").write_text(
            f"path: .\ntrain: images/train\nval: images/val\ntest: images/test\nnames:\n{names}\n"
        )
    return root


def experiment(path: Path, root: Path) -> Path:
    names = ", ".join(json.dumps(n) for n in NAMES)
    path.write_text(
        f'[experiment]\nname = "imported"\n\n[data]\nroot = "{root}"\nsplit_name = "source"\nclasses = [{names}]\n'
        'batch_size = 8\n\n[model]\nname = "tiny"\ninput_size = 96\nwidth = 8\n\n[train]\nepochs = 1\nlog_images = 0\n\n'
        "[eval]\nbootstrap = 50\ncoco = false\n"
    )
    return path


@pytest.mark.parametrize("fmt", ["coco", "yolo", "darknet"])
def test_import_keeps_every_box_and_split(fmt, scenes, tmp_path):
    src = tmp_path / "src"
    {"coco": write_coco, "yolo": write_yolo, "darknet": lambda r, s: write_yolo(r, s, darknet=True)}[fmt](
        src, scenes
    )
    s = import_dataset("coco" if fmt == "coco" else "yolo", src, tmp_path / "out")
    assert s.classes == NAMES and s.images == len(scenes)
    assert sum(s.boxes.values()) == sum(len(o) for *_, o, _ in scenes)
    assert (tmp_path / "out" / "classes.txt").read_text().split("\n")[:3] == NAMES
    if fmt != "darknet":  # the source's own splits, as they were
        assert s.splits["source"] == {k: sum(sp == k for *_, sp in scenes) for k in ("train", "val", "test")}
    assert sum(s.splits["default"].values()) == len(scenes)  # and a stratified one
    first = next(a for a in load_split(tmp_path / "out", "train", "default", NAMES))
    src_boxes = {p.stem: o for p, _, _, o, _ in scenes}[first.image_id]
    assert [NAMES[c] for c, _ in src_boxes] == [NAMES[int(c) - 1] for c in first.labels]
    for (_, b), got in zip(src_boxes, first.boxes, strict=True):  # pixel boxes back, to the pixel
        assert all(abs(u - v) <= 1 for u, v in zip(b, got, strict=True))


def test_bad_files_are_named_and_nothing_is_half_written(scenes, tmp_path):
    src = write_yolo(tmp_path / "yolo", scenes)
    label = next((src / "labels" / "train").glob("*.txt"))
    label.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DataError, match=r"line 1: expected 'class cx cy w h'") as e:
        import_dataset("yolo", src, tmp_path / "out")
    assert label.name in str(e.value) and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.importing-*"))
    label.write_text("7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="class 7 is not one of the 3 named"):
        import_dataset("yolo", src, tmp_path / "out")
    label.write_text("0 1.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="is empty inside the"):
        import_dataset("yolo", src, tmp_path / "out")
    coco = write_coco(tmp_path / "coco", scenes)
    (coco / "instances_val.json").write_text("{not json")
    with pytest.raises(DataError, match="instances_val.json: not a COCO annotation file"):
        import_dataset("coco", coco, tmp_path / "out")
    (tmp_path / "full").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "full" / "x.png")
    with pytest.raises(DataError, match="not an empty folder"):
        import_dataset("coco", coco, tmp_path / "full")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_an_imported_dataset_trains_end_to_end(fmt, scenes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = (write_coco if fmt == "coco" else write_yolo)(tmp_path / "src", scenes)
    assert main(["data", "import", "--format", fmt, str(src), str(tmp_path / "data")]) == 0
    printed = capsys.readouterr().out
    assert 'classes = ["cat", "dog", "rare bird"]' in printed
    assert main(["train", str(experiment(tmp_path / "exp.toml", tmp_path / "data")), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rare bird" in out and "finished" in out  # the AP table names the data's classes
