"""Datasets as users have them, COCO JSON or YOLO txt, written in the layout every maskssd command reads
(Kaggle-style VOC: ``images/``, ``annotations/*.xml``, ``splits/NAME/{train,val,test}.txt``).

* **COCO**: a folder holding the images (anywhere under it) and one ``*.json`` per split (``train.json``,
  ``instances_val2017.json``, ...: the split is the part of the name that says train, val or test). Classes
  are the ``categories``, in id order; ``bbox`` is ``[x, y, width, height]`` in pixels; ``iscrowd`` boxes become
  VOC's ``difficult`` (ignored by AP, as COCO ignores crowds).
* **YOLO**: an Ultralytics folder with ``data.yaml`` (``names``, and ``train``/``val``/``test`` image folders
  or lists), or darknet-style ``images/`` + ``labels/`` + ``classes.txt``. A label line is ``class cx cy w h``,
  normalised to the image.

The source's own splits become the split list ``source``; a stratified 70/15/15 split ``default`` is made as
well (every class in every part), so a dataset with one split trains at once. Everything is read and checked
before anything is written: a bad file is named with its reason (no traceback), and the output appears whole
(written beside ``DST``, then renamed) or not at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskssd.data.images import IMAGE_EXTENSIONS, read_image_size
from maskssd.data.voc import SPLITS, Annotation, stratified_split, voc_xml, write_split
from maskssd.errors import DataError

__all__ = ["FORMATS", "ImportSummary", "import_dataset"]

FORMATS = ("coco", "yolo")


@dataclass
class _Image:
    """One image of the source: where it is, its size, its boxes (xyxy pixels), labels (0-based) and flags."""

    path: Path
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)
    split: str | None = None


@dataclass
class ImportSummary:
    """What :func:`import_dataset` wrote."""

    root: Path
    classes: list[str]
    images: int
    boxes: dict[str, int]
    splits: dict[str, dict[str, int]]  # split list -> part -> images

    def config_lines(self) -> str:
        """The ``[data]`` lines of an experiment on the imported dataset."""
        names = ", ".join(json.dumps(c) for c in self.classes)
        return f'[data]\nroot = "{self.root}"\nsplit_name = "default"\nclasses = [{names}]'


def _split_of(name: str) -> str | None:
    low = name.lower()
    for split, words in (("train", ("train",)), ("val", ("val", "valid")), ("test", ("test",))):
        if any(re.search(rf"(^|[^a-z]){w}", low) for w in words):
            return split
    return None


def _index_images(src: Path) -> dict[str, list[Path]]:
    """Every image under ``src`` by file name (for COCO ``file_name`` entries that are bare names)."""
    found: dict[str, list[Path]] = {}
    for p in src.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.setdefault(p.name, []).append(p)
    return found


# -------------------------------------------------------------------------------------------- COCO
def _read_coco(src: Path) -> tuple[list[str], list[_Image]]:
    files = sorted(src.glob("*.json")) or sorted((src / "annotations").glob("*.json"))
    if not files:
        raise DataError("no COCO *.json file (one per split, e.g. train.json, val.json)", src)
    index = None
    classes: list[str] | None = None
    images: list[_Image] = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
            cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
            entries, anns = doc["images"], doc.get("annotations", [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"not a COCO annotation file ({type(e).__name__}: {e})", f) from None
        names = [str(c["name"]) for c in cats]
        if classes is not None and names != classes:
            raise DataError(f"categories {names} differ from another file's {classes}", f)
        classes = names
        cat_index = {int(c["id"]): k for k, c in enumerate(cats)}
        split = _split_of(f.stem)
        by_id: dict[Any, _Image] = {}
        for k, im in enumerate(entries):
            where = f"images[{k}]"
            try:
                name, w, h = str(im["file_name"]), int(im["width"]), int(im["height"])
            except (KeyError, TypeError, ValueError):
                raise DataError("needs file_name, width and height", f, where) from None
            path = src / name if (src / name).is_file() else src / "images" / name
            if not path.is_file():
                index = index if index is not None else _index_images(src)
                hits = index.get(Path(name).name, [])
                if len(hits) != 1:
                    raise DataError(
                        f"image {name!r} not found under {src}"
                        if not hits
                        else f"image {name!r} found {len(hits)} times",
                        f,
                        where,
                    )
                path = hits[0]
            by_id[im["id"]] = _Image(path, w, h, split=split)
        for k, a in enumerate(anns):
            where = f"annotations[{k}]"
            try:
                img, cat = by_id[a["image_id"]], cat_index[int(a["category_id"])]
                x, y, bw, bh = (float(v) for v in a["bbox"])
            except KeyError as e:
                raise DataError(f"refers to an unknown {e.args[0]!r}", f, where) from None
            except (TypeError, ValueError):
                raise DataError("bbox must be [x, y, width, height]", f, where) from None
            img.boxes.append((x, y, x + bw, y + bh))
            img.labels.append(cat)
            img.difficult.append(bool(a.get("iscrowd", 0)))
        images += by_id.values()
    assert classes is not None
    return classes, images


# -------------------------------------------------------------------------------------------- YOLO
def _yolo_names(src: Path) -> tuple[list[str], dict[str, Any]]:
    yaml_path = next((p for p in (src / "data.yaml", src / "dataset.yaml") if p.is_file()), None)
    if yaml_path is not None:
        import yaml

        try:
            cfg = yaml.safe_load(yaml_path.read_text()) or {}
            names = cfg["names"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise DataError(f"not a YOLO data.yaml with names ({type(e).__name__}: {e})", yaml_path) from None
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
        return [str(n) for n in names], cfg
    classes = src / "classes.txt"
    if not classes.is_file():
        raise DataError("no data.yaml (Ultralytics) nor classes.txt (darknet) naming the classes", src)
    return [ln.strip() for ln in classes.read_text().splitlines() if ln.strip()], {}


def _yolo_sources(src: Path, cfg: dict[str, Any]) -> list[tuple[str | None, list[Path]]]:
    """``(split, image paths)``: the data.yaml's train/val/test (folders or list files), else ``images/``."""
    base = src / cfg.get("path", "") if cfg.get("path") and not Path(cfg["path"]).is_absolute() else src
    out = []
    for split in SPLITS:
        entry = cfg.get(split) or (cfg.get("valid") if split == "val" else None)
        if not entry:
            continue
        for part in entry if isinstance(entry, list) else [entry]:
            p = base / part
            if p.is_dir():
                out.append((split, sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)))
            elif p.is_file():
                out.append((split, [base / ln.strip() for ln in p.read_text().splitlines() if ln.strip()]))
            else:
                raise DataError(
                    f"the {split} images {part!r} are neither a folder nor a list", src / "data.yaml"
                )
    if not out:
        images = src / "images"
        if not images.is_dir():
            raise DataError("no images/ folder and no train/val/test in data.yaml", src)
        out.append((None, sorted(q for q in images.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)))
    return out


def _label_file(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _read_yolo(src: Path) -> tuple[list[str], list[_Image]]:
    classes, cfg = _yolo_names(src)
    images = []
    for split, paths in _yolo_sources(src, cfg):
        for path in paths:
            if not path.is_file():
                raise DataError("listed image not found", path)
            w, h = read_image_size(path)
            img = _Image(path, w, h, split=split)
            label = _label_file(path)
            lines = (
                label.read_text().splitlines() if label.is_file() else []
            )  # none: an image without objects
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    c, cx, cy, bw, bh = line.split()[:5]
                    c, cx, cy, bw, bh = int(c), float(cx), float(cy), float(bw), float(bh)
                except ValueError:
                    raise DataError(
                        f"line {n}: expected 'class cx cy w h', got {line.strip()!r}", label
                    ) from None
                if not 0 <= c < len(classes):
                    raise DataError(f"line {n}: class {c} is not one of the {len(classes)} named", label)
                img.boxes.append(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
                img.labels.append(c)
                img.difficult.append(False)
            images.append(img)
    return classes, images


# ------------------------------------------------------------------------------------------ writing
def _clip(img: _Image, where: str) -> list[tuple[int, int, int, int]]:
    out = []
    for k, (x1, y1, x2, y2) in enumerate(img.boxes):
        if not all(map(np.isfinite, (x1, y1, x2, y2))):
            raise DataError(f"box {k} is not finite", where)
        a = (max(0, round(x1)), max(0, round(y1)), min(img.width, round(x2)), min(img.height, round(y2)))
        if a[2] <= a[0] or a[3] <= a[1]:
            raise DataError(
                f"box {k} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty inside the {img.width}x{img.height} image",
                where,
            )
        out.append(a)
    return out


def _ids(images: Sequence[_Image]) -> list[str]:
    """Unique image ids: the file stem, made unique with its split (or a counter) where stems repeat."""
    stems = [re.sub(r"[^\w.\- ()]", "_", im.path.stem) for im in images]
    seen: dict[str, int] = {}
    out = []
    for stem, im in zip(stems, images, strict=True):
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}_{im.split or 'x'}{n}")
    return out


def _write(dst: Path, classes: list[str], images: list[_Image], seed: int) -> dict[str, dict[str, int]]:
    (dst / "images").mkdir(parents=True)
    (dst / "annotations").mkdir()
    ids = _ids(images)
    anns = []
    for image_id, im in zip(ids, images, strict=True):
        boxes = _clip(im, str(im.path))
        name = image_id + im.path.suffix.lower()
        shutil.copy2(im.path, dst / "images" / name)
        objects = [(classes[c], b, d) for c, b, d in zip(im.labels, boxes, im.difficult, strict=True)]
        (dst / "annotations" / f"{image_id}.xml").write_text(voc_xml(name, im.width, im.height, objects))
        arr = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.array([c + 1 for c in im.labels], dtype=np.int64)
        xml = dst / "annotations" / f"{image_id}.xml"
        flags = np.array(im.difficult, dtype=bool)
        anns.append(Annotation(image_id, dst / "images" / name, xml, im.width, im.height, arr, labels, flags))
    splits: dict[str, dict[str, int]] = {}
    if any(im.split for im in images):
        parts = [[i for i, im in zip(ids, images, strict=True) if im.split == s] for s in SPLITS]
        write_split(dst, "source", parts)
        splits["source"] = {s: len(p) for s, p in zip(SPLITS, parts, strict=True)}
    parts = stratified_split(anns, (0.7, 0.15, 0.15), seed, len(classes))
    write_split(dst, "default", parts)
    splits["default"] = {s: len(p) for s, p in zip(SPLITS, parts, strict=True)}
    (dst / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return splits


def import_dataset(fmt: str, src: str | Path, dst: str | Path, *, seed: int = 0) -> ImportSummary:
    """Read a COCO or YOLO dataset at ``src`` and write it at ``dst`` (which must not exist, or be empty)."""
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", src)
    if not src.is_dir():
        raise DataError("not a folder", src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError("the output exists and is not an empty folder: choose a new one", dst)
    classes, images = (_read_coco if fmt == "coco" else _read_yolo)(src)
    if not images:
        raise DataError("no image found", src)
    for im in images:  # every box checked before anything is written
        _clip(im, str(im.path))
    tmp = dst.with_name(f".{dst.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        splits = _write(tmp, classes, images, seed)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {c: 0 for c in classes}
    for im in images:
        for c in im.labels:
            counts[classes[c]] += 1
    return ImportSummary(dst, classes, len(images), counts, splits)
