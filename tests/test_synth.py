"""The synthetic face-mask dataset: layout, determinism, classes, splits, ensure_synth, refusals."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from defusedxml import ElementTree as SafeET
from PIL import Image

from maskssd.data import (
    DEFAULT_CLASSES,
    SPLITS,
    DataReport,
    VOCLayout,
    class_counts,
    load_annotations,
    load_split,
    synth,
)
from maskssd.data.synth import SynthSummary, ensure_synth, generate
from maskssd.errors import DataError


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> SynthSummary:
    """~150 images with the default (real) class imbalance."""
    return generate(tmp_path_factory.mktemp("synth") / "ds", n_images=150, seed=3)


def test_layout_and_xml_like_the_real_data(big: SynthSummary):
    root = big.root
    layout = VOCLayout.detect(root)
    assert layout.kind == "kaggle"
    assert layout.all_ids() == [f"synth_{i:05d}" for i in range(150)]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"synth_{i:05d}.png" for i in range(150)]
    assert "synthetic" in (root / "README.md").read_text().lower()
    marker = json.loads((root / ".synth.json").read_text())
    assert marker["seed"] == 3 and marker["n_images"] == 150

    xml = SafeET.parse(root / "annotations" / "synth_00000.xml").getroot()
    assert xml.tag == "annotation"
    assert [c.tag for c in xml][:5] == ["folder", "filename", "size", "segmented", "object"]
    assert xml.findtext("folder") == "images" and xml.findtext("filename") == "synth_00000.png"
    assert [c.tag for c in xml.find("size")] == ["width", "height", "depth"]
    assert xml.findtext("size/depth") == "3"
    for obj in xml.findall("object"):
        assert [c.tag for c in obj] == ["name", "pose", "truncated", "occluded", "difficult", "bndbox"]
        assert obj.findtext("name") in DEFAULT_CLASSES
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            assert obj.findtext(f"bndbox/{tag}").isdigit()  # integers, like the real annotations
    with Image.open(root / "images" / "synth_00000.png") as img:
        assert img.mode == "RGB"
        assert img.size == (int(xml.findtext("size/width")), int(xml.findtext("size/height")))


def test_loads_cleanly_boxes_inside_and_apart(big: SynthSummary):
    report = DataReport()
    anns = load_annotations(big.root, report=report)
    assert len(anns) == 150
    assert report.summary() == {
        "clipped_boxes": 0,
        "dropped_degenerate_boxes": 0,
        "xml_size_mismatches": 0,
        "skipped_samples": 0,
    }
    assert not report.fixes and not report.skipped
    for a in anns:
        assert 256 <= max(a.width, a.height) <= 480
        assert 1 <= a.num_objects <= 6
        b = a.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= a.width).all() and (b[:, 3] <= a.height).all()
        assert (b[:, 2] - b[:, 0] >= 5).all() and (b[:, 3] - b[:, 1] >= 8).all()
        for i, j in itertools.combinations(range(a.num_objects), 2):
            assert _iou(b[i], b[j]) < 0.15, a.image_id  # planned < 0.08; the roll adds a little
    assert sum(a.num_objects for a in anns) == sum(big.boxes.values())


def test_every_split_has_every_class(big: SynthSummary):
    seen: set[str] = set()
    for split in SPLITS:
        anns = load_split(big.root, split, "default")
        ids = {a.image_id for a in anns}
        assert not ids & seen
        seen |= ids
        counts = class_counts(anns, DEFAULT_CLASSES)
        assert all(counts[c] > 0 for c in DEFAULT_CLASSES), (split, counts)
    assert len(seen) == 150
    assert big.split_sizes == {s: len(load_split(big.root, s, "default")) for s in SPLITS}


def test_class_imbalance_follows_class_probs(big: SynthSummary):
    counts = class_counts(load_annotations(big.root), DEFAULT_CLASSES)
    assert counts == big.boxes
    total = sum(counts.values())
    share = {c: n / total for c, n in counts.items()}
    assert counts["with_mask"] > counts["without_mask"] > counts["mask_weared_incorrect"] > 0
    assert 0.7 < share["with_mask"] < 0.9
    assert 0.09 < share["without_mask"] < 0.26
    assert share["mask_weared_incorrect"] < 0.08


def test_other_class_probs_are_followed(tmp_path: Path):
    s = generate(tmp_path / "ds", n_images=40, seed=1, class_probs=(0.1, 0.1, 0.8))
    assert s.boxes["mask_weared_incorrect"] > s.boxes["with_mask"] + s.boxes["without_mask"]


def test_small_dataset_still_has_every_class_in_every_split(tmp_path: Path):
    s = generate(tmp_path / "ds", n_images=30, seed=0)
    for split in SPLITS:
        counts = class_counts(load_split(s.root, split, "default"), DEFAULT_CLASSES)
        assert all(counts[c] > 0 for c in DEFAULT_CLASSES), (split, counts)


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / "images").glob("*.png"))}


def _texts(root: Path) -> dict[str, bytes]:
    files = [
        *sorted((root / "annotations").glob("*.xml")),
        *sorted((root / "splits").rglob("*.txt")),
        root / "README.md",
    ]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_deterministic_per_seed(tmp_path: Path):
    a = generate(tmp_path / "a", n_images=8, seed=11, workers=1)
    b = generate(tmp_path / "b", n_images=8, seed=11, workers=2)
    c = generate(tmp_path / "c", n_images=8, seed=12)
    assert a.boxes == b.boxes
    assert _texts(a.root) == _texts(b.root)
    pa, pb, pc = _pixels(a.root), _pixels(b.root), _pixels(c.root)
    assert pa.keys() == pb.keys() and len(pa) == 8
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert _texts(a.root) != _texts(c.root)
    assert not any(pa[k].shape == pc[k].shape and np.array_equal(pa[k], pc[k]) for k in pa)


def test_ensure_synth_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "ds"
    calls = []
    real = synth.generate

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "generate", counting)
    assert ensure_synth(out, n_images=6, seed=2) == out
    assert len(calls) == 1
    assert load_annotations(out) and VOCLayout.detect(out).read_split("default", "train")
    stamp = (out / "images" / "synth_00000.png").stat().st_mtime_ns

    ensure_synth(out, n_images=6, seed=2)  # complete, same parameters: nothing to do
    assert len(calls) == 1
    assert (out / "images" / "synth_00000.png").stat().st_mtime_ns == stamp

    (out / ".synth.json").unlink()  # as if interrupted before the end
    ensure_synth(out, n_images=6, seed=2)
    assert len(calls) == 2 and (out / ".synth.json").is_file()

    (out / "images" / "synth_00003.png").unlink()  # a promised file went missing
    ensure_synth(out, n_images=6, seed=2)
    assert len(calls) == 3 and (out / "images" / "synth_00003.png").is_file()

    ensure_synth(out, n_images=4, seed=2, split_name="small")  # other parameters: regenerated in place
    assert len(calls) == 4
    assert VOCLayout.detect(out).all_ids() == [f"synth_{i:05d}" for i in range(4)]  # stale files removed
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"synth_{i:05d}.png" for i in range(4)]
    assert VOCLayout.detect(out).split_names() == ["small"]
    ensure_synth(out, n_images=4, seed=2, split_name="small")
    assert len(calls) == 4


def test_regenerating_same_parameters_overwrites(tmp_path: Path):
    a = generate(tmp_path / "ds", n_images=5, seed=4)
    before = _texts(a.root)
    generate(tmp_path / "ds", n_images=5, seed=4)
    assert _texts(a.root) == before


def test_refuses_a_non_synth_directory(tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="non-empty"):
        generate(out, n_images=3)
    with pytest.raises(DataError, match="non-empty"):
        ensure_synth(out, n_images=3)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        generate(tmp_path / "file", n_images=3)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(empty, n_images=3).images == 3


def test_rejects_bad_parameters(tmp_path: Path):
    with pytest.raises(ValueError, match="class_probs"):
        generate(tmp_path / "x", n_images=3, class_probs=(1.0, 0.0))
    with pytest.raises(ValueError, match="n_images"):
        generate(tmp_path / "x", n_images=0)
    with pytest.raises(ValueError, match="split_ratios"):
        generate(tmp_path / "x", n_images=3, split_ratios=(0.5, 0.6, 0.1))
    with pytest.raises(TypeError, match="unexpected"):
        ensure_synth(tmp_path / "x", n_images=3, colour="blue")
    assert not (tmp_path / "x").exists()
