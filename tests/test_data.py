"""The VOC data layer: the real dataset's counts, image modes, layouts, every bad input, splits, the CLI,
the torch Dataset, collate and the seeded sampler."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskssd.cli import main as cli_main
from maskssd.data import (
    DEFAULT_CLASSES,
    SPLITS,
    Batch,
    DataReport,
    FaceMaskDataset,
    SeededSampler,
    VOCLayout,
    class_counts,
    collate,
    load_annotations,
    load_image,
    load_split,
    read_image_size,
    sample_seed,
    stratified_split,
)
from maskssd.data.transforms import eval_transform, train_transform
from maskssd.errors import DataError

PAPER_COUNTS = {
    "train": {"with_mask": 2125, "without_mask": 518, "mask_weared_incorrect": 88},
    "val": {"with_mask": 522, "without_mask": 78, "mask_weared_incorrect": 17},
    "test": {"with_mask": 585, "without_mask": 121, "mask_weared_incorrect": 18},
}
PAPER_IMAGES = {"train": 597, "val": 128, "test": 128}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Intra-op threads fighting for 2 busy cores make the augmentation 10-20x slower; use one here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_error(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def real_all(real_data: Path) -> list:
    return load_annotations(real_data)


def test_paper_split_counts_match_the_shared_readme(real_data: Path):
    report = DataReport()
    total_boxes = 0
    for split in SPLITS:
        anns = load_split(real_data, split, "paper", report=report)
        assert len(anns) == PAPER_IMAGES[split]
        assert class_counts(anns, DEFAULT_CLASSES) == PAPER_COUNTS[split]
        total_boxes += sum(a.num_objects for a in anns)
        for a in anns:
            assert not a.difficult.any()
            assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
            assert (a.boxes[:, 0] >= 0).all() and (a.boxes[:, 2] <= a.width).all()
            assert (a.boxes[:, 1] >= 0).all() and (a.boxes[:, 3] <= a.height).all()
            assert (a.boxes[:, 2] > a.boxes[:, 0]).all() and (a.boxes[:, 3] > a.boxes[:, 1]).all()
    assert total_boxes == 4072
    assert report.clipped_boxes == 12
    assert report.dropped_degenerate == 0 and report.skipped == []
    clip_fixes = [f for f in report.fixes if "clipped" in f[1]]
    assert len(clip_fixes) == 12 and all(Path(p).suffix == ".xml" for p, _ in clip_fixes)


def test_stratified_split_of_the_real_data(real_all: list):
    parts = stratified_split(real_all, (0.7, 0.15, 0.15), seed=0, num_classes=3)
    ids = [a.image_id for a in real_all]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert len(set(sum(parts, []))) == len(ids)
    by_id = {a.image_id: a for a in real_all}
    for part, ratio in zip(parts, (0.7, 0.15, 0.15), strict=True):
        assert abs(len(part) / len(ids) - ratio) <= 0.02
        counts = class_counts([by_id[i] for i in part], DEFAULT_CLASSES)
        assert all(n > 0 for n in counts.values()), counts
    assert stratified_split(real_all, seed=0, num_classes=3) == parts
    assert stratified_split(real_all, seed=1, num_classes=3) != parts


# ------------------------------------------------------------------------------------------- images
def test_original_rgba_pngs_load_as_rgb(rgba_sample: Path):
    paths = sorted((rgba_sample / "images").glob("*.png"))
    assert len(paths) == 6
    modes = []
    for p in paths:
        with Image.open(p) as raw:
            modes.append(raw.mode)
            expected = np.asarray(raw.convert("RGB"))
        img = load_image(p)
        assert img.mode == "RGB"
        arr = np.asarray(img)
        assert arr.shape == expected.shape == (img.height, img.width, 3)
        assert np.array_equal(arr, expected)
        assert read_image_size(p) == img.size
    assert modes.count("RGBA") >= 5  # the sample really holds the original 4-channel files

    ds = FaceMaskDataset(load_annotations(rgba_sample))
    assert len(ds) == 6
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].dtype == torch.uint8 and s["image"].shape[0] == 3
        assert tuple(s["image"].shape[1:]) == (s["size"][1], s["size"][0])


def _palette_image(w: int = 20, h: int = 10) -> Image.Image:
    idx = (np.arange(w * h).reshape(h, w) % 4).astype(np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12))
    return img


@pytest.mark.parametrize("kind", ["L", "1", "LA", "P", "P+transparency-index", "P+transparency-bytes"])
def test_other_modes_load_as_rgb(tmp_path: Path, kind: str):
    p = tmp_path / "img.png"
    if kind in ("L", "1", "LA"):
        g = (np.arange(200).reshape(10, 20) % 256).astype(np.uint8)
        img = Image.fromarray(g, "L").convert(kind)
        img.save(p)
        expected = np.repeat(np.asarray(img.convert("L"))[..., None], 3, axis=2)
    else:
        img = _palette_image()
        if kind == "P+transparency-index":
            img.save(p, transparency=3)
        elif kind == "P+transparency-bytes":
            img.save(p, transparency=bytes([255, 0, 128, 255]))
        else:
            img.save(p)
        palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
        expected = palette[np.asarray(img)]
    with Image.open(p) as raw:
        if kind.startswith("P+"):
            assert raw.mode == "P" and "transparency" in raw.info
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.array_equal(np.asarray(out), expected)


def test_16bit_greyscale_png_keeps_its_contrast(tmp_path: Path):
    g16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    p = tmp_path / "g16.png"
    Image.fromarray(g16).save(p)
    out = np.asarray(load_image(p))
    assert np.abs(out[..., 0].astype(int) - (g16 >> 8)).max() <= 1


def test_dataset_reads_l_and_p_images(make_dataset, voc_xml):
    g = Image.fromarray((np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8), "L")
    p = _palette_image(64, 48)
    samples = {
        "grey": (g, voc_xml("grey.png", 64, 48, [("with_mask", 1, 1, 30, 30)])),
        "pal": (p, voc_xml("pal.png", 64, 48, [("without_mask", 1, 1, 30, 30)])),
    }
    root = make_dataset(samples)
    pt = root / "images" / "palt.png"
    p.save(pt, transparency=3)
    (root / "annotations" / "palt.xml").write_text(voc_xml("palt.png", 64, 48, [("with_mask", 2, 2, 9, 9)]))
    ds = FaceMaskDataset(load_annotations(root), eval_transform(32))
    for i in range(len(ds)):
        raw = ds.raw_sample(i)["image"]
        assert raw.shape == (3, 48, 64) and raw.dtype == torch.uint8
        assert ds[i]["image"].shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------ layouts
def test_classic_voc_layout_with_split_main(tmp_path: Path, voc_xml):
    root = tmp_path / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    ids = [f"img{i}" for i in range(6)]
    for i, image_id in enumerate(ids):
        Image.new("RGB", (50 + i, 40), (i * 30, 100, 200)).save(
            root / "JPEGImages" / f"{image_id}.jpg", quality=90
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            voc_xml(f"{image_id}.jpg", 50 + i, 40, [(DEFAULT_CLASSES[i % 3], 5, 5, 30, 30, i % 2)])
        )
    parts = {"train": ids[:3], "val": ids[3:5], "test": ids[5:]}
    for split, part in parts.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(part) + "\n")

    layout = VOCLayout.detect(root)
    assert layout.kind == "voc" and "main" in layout.split_names()
    for split, part in parts.items():
        anns = load_split(root, split, "main")
        assert [a.image_id for a in anns] == part
        assert all(a.image_path.suffix == ".jpg" for a in anns)
    anns = load_split(root, "train", "main")
    assert [bool(a.difficult[0]) for a in anns] == [False, True, False]
    assert [a.width for a in anns] == [50, 51, 52]
    ds = FaceMaskDataset.from_root(root, "val", "main", transform=eval_transform(32))
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 32, 32)
    e = _data_error(load_split, root, "train", "nosuch")
    assert "main" in str(e) and "nosuch" in str(e)


def test_not_a_dataset_is_a_data_error(tmp_path: Path):
    e = _data_error(VOCLayout.detect, tmp_path)
    assert str(tmp_path) in str(e)
    e = _data_error(VOCLayout.detect, tmp_path / "absent")
    assert "absent" in str(e)


# --------------------------------------------------------------------------------------- bad inputs
def test_malformed_xml_names_file_line_and_column(make_dataset, good_sample):
    img, xml = good_sample("bad")
    broken = xml.replace("</bndbox>", "", 1)
    root = make_dataset({"bad": (img, broken)})
    e = _data_error(load_annotations, root)
    assert e.path == str(root / "annotations" / "bad.xml")
    assert "bad.xml" in str(e) and "malformed XML" in str(e)
    assert e.element is not None and "line" in e.element and "column" in e.element
    line = 1 + next(n for n, text in enumerate(broken.splitlines()) if "</object>" in text)
    assert f"[line {line}, column " in str(e)  # the mismatched tag: </object> where </bndbox> was expected


def test_missing_image_names_xml_and_expected_image(make_dataset, voc_xml):
    root = make_dataset({"noimg": (None, voc_xml("noimg.png", 64, 48, [("with_mask", 1, 1, 10, 10)]))})
    e = _data_error(load_annotations, root)
    assert "noimg.xml" in str(e) and str(root / "images" / "noimg.png") in str(e)
    assert e.element == "filename" and "not found" in str(e)


def test_missing_annotation_file(make_dataset, good_sample):
    root = make_dataset({"a": good_sample("a")})
    e = _data_error(load_annotations, root, ["a", "ghost"])
    assert "ghost.xml" in str(e) and "not found" in str(e)


def test_garbage_image_is_refused_when_parsed(make_dataset, voc_xml):
    root = make_dataset(
        {"junk": (b"certainly not a PNG", voc_xml("junk.png", 64, 48, [("with_mask", 1, 1, 9, 9)]))}
    )
    e = _data_error(load_annotations, root)
    assert "junk.png" in str(e)
    assert "junk.png" in str(_data_error(load_image, root / "images" / "junk.png"))


def test_truncated_image_is_detected_by_load_image_and_getitem(make_dataset, good_sample):
    img, xml = good_sample("trunc")
    data = _png_bytes(img)
    root = make_dataset({"trunc": (data[: len(data) // 2], xml)})
    path = root / "images" / "trunc.png"
    assert read_image_size(path) == (64, 48)  # the header is intact: parsing alone cannot tell
    e = _data_error(load_image, path)
    assert str(path) in str(e) and "corrupt" in str(e)
    ds = FaceMaskDataset(load_annotations(root), eval_transform(32))
    e = _data_error(ds.__getitem__, 0)
    assert str(path) in str(e)
    e = _data_error(ds.__getitem__, (123, 0))
    assert str(path) in str(e)


def test_corrupt_image_in_a_worker_keeps_a_clean_error(make_dataset, good_sample):
    from maskssd.training.build import build_loader

    img, xml = good_sample("trunc")
    data = _png_bytes(img)
    root = make_dataset({"trunc": (data[: len(data) // 2], xml)})
    loader = build_loader(FaceMaskDataset(load_annotations(root), eval_transform(32)), 1, 1, 0, False)
    e = _data_error(list, loader)
    assert e.path == str(root / "images" / "trunc.png") and "Traceback" not in str(e)


def test_unknown_class_names_the_object(make_dataset, voc_xml):
    xml = voc_xml("cat.png", 64, 48, [("with_mask", 1, 1, 10, 10), ("cat", 2, 2, 20, 20)])
    root = make_dataset({"cat": (Image.new("RGB", (64, 48)), xml)})
    e = _data_error(load_annotations, root)
    assert "cat.xml" in str(e) and "object[1]/name" in str(e) and "'cat'" in str(e)
    assert e.element == "object[1]/name"
    # the same file is fine with that class declared
    anns = load_annotations(root, classes=("with_mask", "cat"))
    assert anns[0].labels.tolist() == [1, 2]


@pytest.mark.parametrize("tag,value", [("xmin", "abc"), ("ymax", "12px"), ("xmax", "nan"), ("ymin", "")])
def test_non_numeric_coordinates_name_the_tag(make_dataset, voc_xml, tag: str, value: str):
    coords = {"xmin": 1, "ymin": 2, "xmax": 20, "ymax": 30} | {tag: value}
    xml = voc_xml(
        "num.png",
        64,
        48,
        [
            ("with_mask", 1, 1, 5, 5),
            ("without_mask", coords["xmin"], coords["ymin"], coords["xmax"], coords["ymax"]),
        ],
    )
    root = make_dataset({"num": (Image.new("RGB", (64, 48)), xml)})
    e = _data_error(load_annotations, root)
    assert "num.xml" in str(e) and f"<{tag}>" in str(e)
    assert e.element is not None and e.element.startswith("object[1]/bndbox")
    if value:  # an empty tag is "missing <ymin>" at object[1]/bndbox; a bad value names the tag itself
        assert e.element == f"object[1]/bndbox/{tag}" and repr(value) in str(e)


def test_bad_difficult_flag_names_the_element(make_dataset, voc_xml):
    xml = voc_xml("d.png", 64, 48, [("with_mask", 1, 1, 10, 10, "maybe")])
    root = make_dataset({"d": (Image.new("RGB", (64, 48)), xml)})
    e = _data_error(load_annotations, root)
    assert "d.xml" in str(e) and e.element == "object[0]/difficult"


def test_decompression_bomb_is_refused_before_decoding(make_dataset, voc_xml, tmp_path: Path):
    # a 7000x7000 1-bit PNG: 49 M pixels (over the 40 M guard, under PIL's own limit) in a few kB
    bomb = tmp_path / "bomb.png"
    Image.new("1", (7000, 7000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000
    e = _data_error(load_image, bomb)
    assert str(bomb) in str(e) and "decompression-bomb" in str(e)
    e = _data_error(read_image_size, bomb)
    assert str(bomb) in str(e)
    root = make_dataset(
        {"bomb": (bomb.read_bytes(), voc_xml("bomb.png", 7000, 7000, [("with_mask", 1, 1, 9, 9)]))}
    )
    e = _data_error(load_annotations, root)
    assert "bomb.png" in str(e) and "pixels" in str(e)


def test_max_pixels_can_be_lowered(make_dataset, good_sample):
    root = make_dataset({"a": good_sample("a")})  # 64 x 48 = 3072 pixels
    path = root / "images" / "a.png"
    assert "3,072" in str(_data_error(load_image, path, max_pixels=3000))
    assert load_image(path, max_pixels=3072).size == (64, 48)
    e = _data_error(load_annotations, root, max_pixels=1000)
    assert "a.png" in str(e)
    ds = FaceMaskDataset(load_annotations(root), max_pixels=1000)
    assert "a.png" in str(_data_error(ds.__getitem__, 0))


ENTITY_ATTACKS = {
    "external-entity": ('<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>', "&xxe;"),
    "billion-laughs": (
        '<!DOCTYPE annotation [<!ENTITY lol "lol">'
        '<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>',
        "&lol3;",
    ),
}


@pytest.mark.parametrize("attack", sorted(ENTITY_ATTACKS))
def test_entity_attacks_are_refused_as_unsafe(make_dataset, voc_xml, attack: str):
    doctype, ref = ENTITY_ATTACKS[attack]
    xml = voc_xml("x.png", 64, 48, [("with_mask", 1, 1, 10, 10)], prolog='<?xml version="1.0"?>\n' + doctype)
    xml = xml.replace("<folder>images</folder>", f"<folder>{ref}</folder>")
    root = make_dataset({"x": (Image.new("RGB", (64, 48)), xml)})
    e = _data_error(load_annotations, root)
    assert "x.xml" in str(e) and "unsafe" in str(e)
    assert "root:" not in str(e)  # nothing of /etc/passwd leaked into the message


def test_box_outside_the_image_is_clipped_and_counted(make_dataset, voc_xml):
    xml = voc_xml(
        "c.png",
        64,
        48,
        [("with_mask", -5, -3, 70, 30), ("without_mask", 10, 10, 20, 20), ("with_mask", 50, 40, 64, 48)],
    )
    root = make_dataset({"c": (Image.new("RGB", (64, 48)), xml)})
    report = DataReport()
    (ann,) = load_annotations(root, report=report)
    assert ann.boxes.tolist() == [[0, 0, 64, 30], [10, 10, 20, 20], [50, 40, 64, 48]]
    assert report.clipped_boxes == 1 and report.dropped_degenerate == 0
    assert len(report.fixes) == 1 and "c.xml" in report.fixes[0][0] and "object[0]" in report.fixes[0][1]
    assert report.summary()["clipped_boxes"] == 1


def test_degenerate_boxes_are_dropped_and_counted(make_dataset, voc_xml):
    xml = voc_xml(
        "g.png",
        64,
        48,
        [
            ("with_mask", 10, 10, 10, 20),  # zero width
            ("without_mask", 5, 5, 30, 30),  # fine
            ("with_mask", 30, 20, 10, 40),  # inverted
            ("with_mask", 100, 100, 120, 120),  # entirely outside: clipped to nothing
            ("mask_weared_incorrect", 40, 8, 60, 40, 1),  # fine, difficult
        ],
    )
    root = make_dataset({"g": (Image.new("RGB", (64, 48)), xml)})
    report = DataReport()
    (ann,) = load_annotations(root, report=report)
    assert ann.boxes.tolist() == [[5, 5, 30, 30], [40, 8, 60, 40]]
    assert ann.labels.tolist() == [2, 3] and ann.difficult.tolist() == [False, True]
    assert report.dropped_degenerate == 3 and report.clipped_boxes == 1
    dropped = [what for _, what in report.fixes if "degenerate" in what]
    assert [w.split(":")[0] for w in dropped] == ["object[0]", "object[2]", "object[3]"]


def test_xml_size_mismatch_uses_the_image_and_is_reported(make_dataset, voc_xml):
    root = make_dataset(
        {"s": (Image.new("RGB", (64, 48)), voc_xml("s.png", 640, 480, [("with_mask", 1, 1, 9, 9)]))}
    )
    report = DataReport()
    (ann,) = load_annotations(root, report=report)
    assert (ann.width, ann.height) == (64, 48)
    assert report.size_mismatch == 1 and "640x480" in report.fixes[0][1]


@pytest.fixture
def mixed_root(make_dataset, good_sample, voc_xml, tmp_path: Path) -> Path:
    """Two good samples and one of every kind of bad sample that parsing catches."""
    img, xml = good_sample("x")
    bomb = io.BytesIO()
    Image.new("1", (7000, 7000)).save(bomb, format="PNG", optimize=True)
    xxe = voc_xml(
        "xxe.png",
        64,
        48,
        [("with_mask", 1, 1, 9, 9)],
        prolog='<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
    )
    samples = {
        "good1": good_sample("good1", seed=1),
        "bad_malformed": (img, xml.replace("</object>", "", 1)),
        "bad_noimage": (None, voc_xml("bad_noimage.png", 64, 48, [("with_mask", 1, 1, 9, 9)])),
        "bad_garbage": (b"\x89PNG\r\n\x1a\n but not really", voc_xml("bad_garbage.png", 64, 48)),
        "bad_class": (img, voc_xml("bad_class.png", 64, 48, [("dog", 1, 1, 9, 9)])),
        "bad_number": (img, voc_xml("bad_number.png", 64, 48, [("with_mask", "one", 1, 9, 9)])),
        "bad_bomb": (bomb.getvalue(), voc_xml("bad_bomb.png", 7000, 7000, [("with_mask", 1, 1, 9, 9)])),
        "bad_xxe": (img, xxe.replace("<folder>images</folder>", "<folder>&xxe;</folder>")),
        "good2": good_sample("good2", seed=2),
    }
    return make_dataset(samples)


def test_on_error_skip_skips_and_counts_bad_samples(mixed_root: Path):
    with pytest.raises(DataError):
        load_annotations(mixed_root)
    report = DataReport()
    anns = load_annotations(mixed_root, on_error="skip", report=report)
    assert [a.image_id for a in anns] == ["good1", "good2"]
    assert all(a.num_objects == 2 for a in anns)
    bad = ["bad_malformed", "bad_noimage", "bad_garbage", "bad_class", "bad_number", "bad_bomb", "bad_xxe"]
    assert len(report.skipped) == len(bad) == report.summary()["skipped_samples"]
    skipped_files = [Path(p).stem for p, _ in report.skipped]
    assert sorted(skipped_files) == sorted(bad)
    reasons = dict(zip(skipped_files, (why for _, why in report.skipped), strict=True))
    assert "object[0]/name" in reasons["bad_class"] and "unsafe" in reasons["bad_xxe"]
    assert "object[0]/bndbox/xmin" in reasons["bad_number"] and "line" in reasons["bad_malformed"]
    ds = FaceMaskDataset.from_root(mixed_root, None, on_error="skip", transform=eval_transform(32))
    assert len(ds) == 2 and ds[1]["image_id"] == "good2"
    with pytest.raises(ValueError):
        load_annotations(mixed_root, on_error="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def malformed_root(make_dataset, good_sample) -> Path:
    img, xml = good_sample("broken")
    return make_dataset({"ok": good_sample("ok"), "broken": (img, xml.replace("</size>", "", 1))})


def test_cli_stats_malformed_xml_is_one_clear_error(malformed_root: Path, capsys):
    assert cli_main(["data", "stats", str(malformed_root)]) == 2
    captured = capsys.readouterr()
    assert "broken.xml" in captured.err and "malformed XML" in captured.err and "line" in captured.err
    assert "Traceback" not in captured.err + captured.out
    # with --on-error skip the good sample is counted and the bad one listed
    assert cli_main(["data", "stats", str(malformed_root), "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.out and "broken.xml" in captured.out.replace("\n", "")


def test_cli_stats_error_in_a_real_process_has_no_traceback(malformed_root: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "maskssd", "data", "stats", str(malformed_root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "broken.xml" in proc.stderr.replace("\n", "")


def test_cli_stats_on_the_real_paper_split(real_data: Path, capsys):
    assert cli_main(["data", "stats", str(real_data), "--split-name", "paper"]) == 0
    text = capsys.readouterr().out
    for n in (3232, 717, 123, 4072, 853, 597, 128, 12):
        assert str(n) in text
    rows = {line.split()[1]: line for line in text.splitlines() if "paper/" in line}
    for split in SPLITS:
        row = rows[f"paper/{split}"]
        for n in (PAPER_IMAGES[split], *PAPER_COUNTS[split].values()):
            assert f" {n} " in row, row


def test_cli_synth_then_stats(tmp_path: Path, capsys):
    out = tmp_path / "synth30"
    assert cli_main(["data", "synth", str(out), "--images", "30"]) == 0
    assert "30" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.png"))) == 30
    assert cli_main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "default/train" in text and "kaggle" in text
    total = sum(a.num_objects for a in load_annotations(out))
    assert str(total) in text


def _read_split(root: Path, name: str) -> list[list[str]]:
    return [(root / "splits" / name / f"{s}.txt").read_text().split() for s in SPLITS]


def test_cli_split_is_stratified_and_seeded(synth_root: Path, tmp_path: Path, capsys):
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    assert cli_main(["data", "split", str(root), "--split-name", "s1", "--seed", "1"]) == 0
    assert "s1" in capsys.readouterr().out
    parts = _read_split(root, "s1")
    all_ids = VOCLayout.detect(root).all_ids()
    assert sorted(sum(parts, [])) == sorted(all_ids)
    assert sum(len(p) for p in parts) == len(set(sum(parts, []))) == len(all_ids)
    for split in SPLITS:
        counts = class_counts(load_split(root, split, "s1"), DEFAULT_CLASSES)
        assert all(n > 0 for n in counts.values()), (split, counts)
    assert cli_main(["data", "split", str(root), "--split-name", "s1again", "--seed", "1"]) == 0
    assert cli_main(["data", "split", str(root), "--split-name", "s2", "--seed", "2"]) == 0
    assert _read_split(root, "s1again") == parts
    assert _read_split(root, "s2") != parts


# -------------------------------------------------------------------------------- dataset + collate
@pytest.fixture(scope="module")
def synth_train(synth_root: Path) -> FaceMaskDataset:
    return FaceMaskDataset.from_root(synth_root, "train", "default", transform=train_transform(96))


def test_dataset_and_collate_make_a_batch(synth_train: FaceMaskDataset):
    samples = [synth_train[(7, i)] for i in range(4)]
    batch = collate(samples)
    assert isinstance(batch, Batch) and len(batch) == 4
    assert batch.images.shape == (4, 3, 96, 96) and batch.images.dtype == torch.float32
    assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
    assert batch.sizes.shape == (4, 2) and batch.sizes.dtype == torch.float32
    for i, ann in enumerate(synth_train.annotations[:4]):
        assert batch.image_ids[i] == ann.image_id
        assert batch.sizes[i].tolist() == [ann.width, ann.height]
    for b, lab, d in zip(batch.boxes, batch.labels, batch.difficult, strict=True):
        assert b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == 4
        assert lab.dtype == torch.int64 and lab.shape == (b.shape[0],)
        assert d.dtype == torch.bool and d.shape == (b.shape[0],)
        assert ((b >= 0) & (b <= 1)).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert ((lab >= 1) & (lab <= 3)).all()
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and moved.image_ids == batch.image_ids


def test_eval_samples_keep_boxes_normalised(synth_root: Path):
    ds = FaceMaskDataset.from_root(synth_root, "val", "default", transform=eval_transform(64))
    for i in range(len(ds)):
        s, ann = ds[i], ds.annotations[i]
        scale = np.array([ann.width, ann.height, ann.width, ann.height], np.float32)
        assert np.allclose(s["boxes"].numpy(), ann.boxes / scale, atol=1e-6)


def _same_sample(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["image"], b["image"])
        and torch.equal(a["boxes"], b["boxes"])
        and torch.equal(a["labels"], b["labels"])
        and torch.equal(a["difficult"], b["difficult"])
    )


def test_seeded_items_are_reproducible(synth_train: FaceMaskDataset):
    torch.manual_seed(0)
    first = [synth_train[(s, 3)] for s in (11, 12, 13)]
    torch.manual_seed(999)  # the global RNG does not matter, nor is it disturbed
    state = torch.random.get_rng_state()
    again = [synth_train[(s, 3)] for s in (11, 12, 13)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(_same_sample(a, b) for a, b in zip(first, again, strict=True))
    others = [synth_train[(s, 3)] for s in (21, 22, 23)]
    assert not all(_same_sample(a, b) for a, b in zip(first, others, strict=True))
    assert not _same_sample(first[0], first[1]) or not _same_sample(first[1], first[2])


def test_seeded_sampler_orders_and_shards():
    a = list(SeededSampler(50, seed=3))
    assert a == list(SeededSampler(50, seed=3))
    assert sorted(i for _, i in a) == list(range(50))
    assert [i for _, i in a] != list(range(50))
    s = SeededSampler(50, seed=3)
    s.set_epoch(1)
    b = list(s)
    assert [i for _, i in b] != [i for _, i in a]
    assert [i for _, i in SeededSampler(50, seed=4)] != [i for _, i in a]
    assert all(k == sample_seed(3, 1, i) for k, i in b)
    assert [i for _, i in SeededSampler(5, shuffle=False)] == list(range(5))

    for n in (50, 51):
        shards = []
        for rank in range(2):
            sampler = SeededSampler(n, seed=3, rank=rank, num_replicas=2)
            sampler.set_epoch(2)
            shards.append([i for _, i in sampler])
            assert len(shards[-1]) == len(sampler) == -(-n // 2)
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        overlap = set(shards[0]) & set(shards[1])
        assert len(overlap) == (0 if n % 2 == 0 else 1)  # odd n: one index padded, like DistributedSampler
    d = [list(SeededSampler(51, seed=3, rank=r, num_replicas=2, drop_last=True)) for r in range(2)]
    assert len(d[0]) == len(d[1]) == 25 and not {i for _, i in d[0]} & {i for _, i in d[1]}


def test_loader_batches_do_not_depend_on_workers(synth_root: Path):
    from maskssd.training.build import build_loader

    anns = load_split(synth_root, "train", "default")[:10]
    ds = FaceMaskDataset(anns, train_transform(64))
    runs = []
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=4, workers=workers, seed=5, shuffle=True)
        loader.sampler.set_epoch(1)
        runs.append(list(loader))
        del loader
    assert len(runs[0]) == len(runs[1]) == 3
    for b0, b2 in zip(*runs, strict=True):
        assert isinstance(b0, Batch) and b0.image_ids == b2.image_ids
        assert torch.equal(b0.images, b2.images)
        assert all(torch.equal(x, y) for x, y in zip(b0.boxes, b2.boxes, strict=True))


def test_split_lists_take_ids_with_spaces_and_the_classic_form(make_dataset, good_sample):
    """``maxresdefault (1)`` (its annotation exists) is one id, whole; ``img1 1`` (no annotation of that name)
    is the classic VOC ``id flag`` line: its first word."""
    ids = ["maxresdefault", "maxresdefault (1)", "img1"]
    root = make_dataset({i: good_sample(i) for i in ids})
    lists = root / "splits" / "mixed"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text(
        "maxresdefault (1)\n  maxresdefault  \n# a comment\n\nimg1 1\nimg1\t-1\n"
    )
    layout = VOCLayout.detect(root)
    assert layout.read_split("mixed", "train") == ["maxresdefault (1)", "maxresdefault", "img1", "img1"]
    anns = load_split(root, "train", "mixed")
    assert [a.image_id for a in anns] == ["maxresdefault (1)", "maxresdefault", "img1", "img1"]
    assert anns[0].image_path.name == "maxresdefault (1).png"


def test_cli_stats_takes_split_name_and_split(synth_root: Path, capsys):
    assert cli_main(["data", "stats", str(synth_root), "--split-name", "default", "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "default/val" in printed and "default/train" not in printed
