"""Pascal VOC face-mask annotations: safe parsing, dataset layouts, split lists, statistics.

Box conventions
---------------
* :class:`Annotation` keeps boxes as **absolute pixel** ``[x1, y1, x2, y2]`` in the original image,
  exactly as the XML gives them (after clipping to the image).
* A :class:`FaceMaskDataset` sample, after its transform, holds boxes as **normalised** ``[x1, y1, x2, y2]``
  in ``[0, 1]`` relative to the transformed image: the SSD tradition, which makes them independent
  of the input resolution. Decoded detections are mapped back to original pixels with ``sizes``.
* Labels are 1-based class indices into ``classes``; 0 is background.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from maskssd.data.images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, load_image, read_image_size
from maskssd.errors import DataError
from maskssd.files import write_text_atomic

DEFAULT_CLASSES: tuple[str, ...] = ("with_mask", "without_mask", "mask_weared_incorrect")
SPLITS: tuple[str, ...] = ("train", "val", "test")

OnError = Literal["raise", "skip"]


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Annotation:
    """One image and its objects, boxes in original pixels ``xyxy``."""

    image_id: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32, pixel xyxy
    labels: np.ndarray  # (n,) int64, 1..C
    difficult: np.ndarray  # (n,) bool

    @property
    def num_objects(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataReport:
    """Everything a loader found and fixed; never silent."""

    clipped_boxes: int = 0
    dropped_degenerate: int = 0
    size_mismatch: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    fixes: list[tuple[str, str]] = field(default_factory=list)  # (file, what was fixed)

    def merge(self, other: DataReport) -> None:
        self.clipped_boxes += other.clipped_boxes
        self.dropped_degenerate += other.dropped_degenerate
        self.size_mismatch += other.size_mismatch
        self.skipped.extend(other.skipped)
        self.fixes.extend(other.fixes)

    def summary(self) -> dict[str, int]:
        return {
            "clipped_boxes": self.clipped_boxes,
            "dropped_degenerate_boxes": self.dropped_degenerate,
            "xml_size_mismatches": self.size_mismatch,
            "skipped_samples": len(self.skipped),
        }


# ------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class VOCLayout:
    """Where a VOC-style dataset keeps its images, annotations and split lists."""

    root: Path
    images: Path
    annotations: Path
    kind: Literal["kaggle", "voc"]

    @classmethod
    def detect(cls, root: str | Path) -> VOCLayout:
        root = Path(root)
        if not root.is_dir():
            raise DataError("dataset root is not a directory", root)
        if (root / "annotations").is_dir() and (root / "images").is_dir():
            return cls(root, root / "images", root / "annotations", "kaggle")
        if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
            return cls(root, root / "JPEGImages", root / "Annotations", "voc")
        raise DataError(
            "not a VOC dataset: expected images/ + annotations/ (Kaggle layout) "
            "or JPEGImages/ + Annotations/ (+ ImageSets/Main/) (classic VOC layout)",
            root,
        )

    def all_ids(self) -> list[str]:
        return sorted((p.stem for p in self.annotations.glob("*.xml")), key=natural_key)

    def split_file(self, split_name: str, split: str) -> Path:
        """``ROOT/splits/NAME/SPLIT.txt``; for classic VOC, split name ``main`` is ``ImageSets/Main``."""
        if self.kind == "voc" and split_name in ("main", "voc"):
            return self.root / "ImageSets" / "Main" / f"{split}.txt"
        return self.root / "splits" / split_name / f"{split}.txt"

    def split_names(self) -> list[str]:
        names = []
        if (self.root / "splits").is_dir():
            names = sorted(p.name for p in (self.root / "splits").iterdir() if p.is_dir())
        if self.kind == "voc" and (self.root / "ImageSets" / "Main").is_dir():
            names.append("main")
        return names

    def read_split(self, split_name: str, split: str) -> list[str]:
        """The image ids of a split list, one per line: the whole line when it names an annotation (ids with
        spaces, ``maxresdefault (1)``), else its first token (the classic VOC ``id flag`` form)."""
        path = self.split_file(split_name, split)
        if not path.is_file():
            known = ", ".join(self.split_names()) or "none"
            raise DataError(f"split list not found (known split names: {known})", path)
        ids = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                whole = (self.annotations / f"{line}.xml").is_file()
                ids.append(line if whole else line.split()[0])
        return ids

    def image_path_for(self, image_id: str, filename: str | None) -> Path:
        if filename:
            p = self.images / Path(filename).name
            if p.exists():
                return p
        for ext in IMAGE_EXTENSIONS:
            p = self.images / f"{image_id}{ext}"
            if p.exists():
                return p
        return self.images / (Path(filename).name if filename else f"{image_id}.png")


def natural_key(s: str) -> list[Any]:
    """Sort ``img2`` before ``img10``."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ------------------------------------------------------------------------------------------- parsing
def _text(node: Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"missing <{tag}>", path, where)
    return child.text.strip()


def _number(node: Element, tag: str, path: Path, where: str) -> float:
    raw = _text(node, tag, path, where)
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"<{tag}> is not a number: {raw!r}", path, f"{where}/{tag}") from None
    if not np.isfinite(value):
        raise DataError(f"<{tag}> is not finite: {raw!r}", path, f"{where}/{tag}")
    return value


def _parse_object(
    obj: Element,
    where: str,
    xml_path: Path,
    class_index: dict[str, int],
    width: int,
    height: int,
    report: DataReport,
) -> tuple[tuple[float, float, float, float], int, bool] | None:
    """One ``<object>``: its box clipped to the image, label and difficult flag; None for a degenerate box."""
    name = _text(obj, "name", xml_path, where)
    if name not in class_index:
        raise DataError(
            f"unknown class {name!r} (known: {', '.join(class_index)})", xml_path, f"{where}/name"
        )
    bnd = obj.find("bndbox")
    if bnd is None:
        raise DataError("missing <bndbox>", xml_path, where)
    x1, y1, x2, y2 = (_number(bnd, t, xml_path, f"{where}/bndbox") for t in ("xmin", "ymin", "xmax", "ymax"))
    diff_node = obj.find("difficult")
    is_difficult = False
    if diff_node is not None and diff_node.text and diff_node.text.strip():
        try:
            is_difficult = bool(int(float(diff_node.text.strip())))
        except ValueError:
            raise DataError(
                f"<difficult> is not 0/1: {diff_node.text!r}", xml_path, f"{where}/difficult"
            ) from None
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        report.clipped_boxes += 1
        report.fixes.append(
            (
                str(xml_path),
                f"{where}: box ({x1:g},{y1:g},{x2:g},{y2:g}) clipped to the {width}x{height} image",
            )
        )
    if cx2 - cx1 < 1.0 or cy2 - cy1 < 1.0:
        report.dropped_degenerate += 1
        report.fixes.append((str(xml_path), f"{where}: degenerate box ({x1:g},{y1:g},{x2:g},{y2:g}) dropped"))
        return None
    return (cx1, cy1, cx2, cy2), class_index[name], is_difficult


def parse_voc_xml(
    xml_path: str | Path,
    layout: VOCLayout,
    classes: Sequence[str] = DEFAULT_CLASSES,
    report: DataReport | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Annotation:
    """Parse one annotation safely (no external entities, no entity expansion) and check its image.

    Boxes are clipped to the image and degenerate ones dropped; both are counted in ``report``.
    """
    xml_path = Path(xml_path)
    report = report if report is not None else DataReport()
    try:
        tree = SafeET.parse(xml_path)
    except FileNotFoundError:
        raise DataError("annotation file not found", xml_path) from None
    except ParseError as e:
        line, col = getattr(e, "position", (None, None))
        raise DataError(f"malformed XML: {e}", xml_path, f"line {line}, column {col}") from None
    except DefusedXmlException as e:
        raise DataError(f"refused unsafe XML ({type(e).__name__}: {e})", xml_path) from None
    root = tree.getroot()
    if root.tag != "annotation":
        raise DataError(f"root element is <{root.tag}>, expected <annotation>", xml_path)

    image_id = xml_path.stem
    fn_node = root.find("filename")
    filename = fn_node.text.strip() if fn_node is not None and fn_node.text else None
    image_path = layout.image_path_for(image_id, filename)
    if not image_path.exists():
        raise DataError(f"image file not found (expected {image_path})", xml_path, "filename")
    width, height = read_image_size(image_path, max_pixels)
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        xw, xh = _number(size, "width", xml_path, "size"), _number(size, "height", xml_path, "size")
        if (int(xw), int(xh)) != (width, height):
            report.size_mismatch += 1
            report.fixes.append(
                (
                    str(xml_path),
                    f"<size> {int(xw)}x{int(xh)} differs from the image {width}x{height}; used the image's",
                )
            )

    class_index = {name: i + 1 for i, name in enumerate(classes)}
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        parsed = _parse_object(obj, f"object[{k}]", xml_path, class_index, width, height, report)
        if parsed is not None:
            boxes.append(parsed[0])
            labels.append(parsed[1])
            difficult.append(parsed[2])

    return Annotation(
        image_id=image_id,
        image_path=image_path,
        annotation_path=xml_path,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
    )


def load_annotations(
    root: str | Path,
    ids: Iterable[str] | None = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    on_error: OnError = "raise",
    report: DataReport | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify_images: bool = False,
) -> list[Annotation]:
    """Parse every annotation (or those of ``ids``); with ``on_error="skip"`` bad samples are counted.

    Parsing reads only image headers; ``verify_images`` also decodes every image, so a truncated file is
    found (and skipped) now rather than mid-training.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    layout = VOCLayout.detect(root)
    report = report if report is not None else DataReport()
    ids = layout.all_ids() if ids is None else list(ids)
    out = []
    for image_id in ids:
        try:
            ann = parse_voc_xml(layout.annotations / f"{image_id}.xml", layout, classes, report, max_pixels)
            if verify_images:
                load_image(ann.image_path, max_pixels)
            out.append(ann)
        except DataError as e:
            if on_error == "raise":
                raise
            report.skipped.append(
                (e.path or image_id, e.reason if e.element is None else f"[{e.element}] {e.reason}")
            )
    return out


# ------------------------------------------------------------------------------------------- splits
def load_split(
    root: str | Path,
    split: str,
    split_name: str = "paper",
    classes: Sequence[str] = DEFAULT_CLASSES,
    on_error: OnError = "raise",
    report: DataReport | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify_images: bool = False,
) -> list[Annotation]:
    """Annotations of one split (``train``/``val``/``test``) of a named split list."""
    layout = VOCLayout.detect(root)
    return load_annotations(
        root, layout.read_split(split_name, split), classes, on_error, report, max_pixels, verify_images
    )


def stratified_split(
    annotations: Sequence[Annotation],
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    num_classes: int | None = None,
) -> list[list[str]]:
    """Seeded iterative stratification: every split gets its share of every class's images.

    Rarest classes are placed first, each image going to the split that most lacks that class
    (ties: the split furthest from its image quota). Returns image ids per split.
    """
    if abs(sum(ratios) - 1.0) > 1e-6 or any(r <= 0 for r in ratios):
        raise ValueError(f"split ratios must be positive and sum to 1, got {list(ratios)}")
    rng = random.Random(seed)
    items = list(annotations)
    rng.shuffle(items)
    n_cls = num_classes or max((int(a.labels.max()) for a in items if a.num_objects), default=0)
    has = [set(int(x) for x in a.labels) for a in items]
    want_images = [r * len(items) for r in ratios]
    class_images = Counter(c for s in has for c in s)
    want_class = {c: [r * class_images[c] for r in ratios] for c in range(1, n_cls + 1)}
    assigned: list[list[str]] = [[] for _ in ratios]
    remaining = set(range(len(items)))
    while remaining:
        counts = Counter(c for i in remaining for c in has[i])
        if counts:
            c = min(counts, key=lambda k: (counts[k], k))
            pool = [i for i in sorted(remaining) if c in has[i]]
        else:
            c, pool = None, sorted(remaining)
        for i in pool:
            if c is None:
                score = [(want_images[s], rng.random()) for s in range(len(ratios))]
            else:
                score = [(want_class[c][s], want_images[s], rng.random()) for s in range(len(ratios))]
            s = max(range(len(ratios)), key=lambda k: score[k])
            assigned[s].append(items[i].image_id)
            want_images[s] -= 1
            for cc in has[i]:
                want_class[cc][s] -= 1
            remaining.discard(i)
    return [sorted(ids, key=natural_key) for ids in assigned]


def split_digest(root: str | Path, split_name: str) -> str:
    """A short hash of a split's lists: which images each part held (lineage)."""
    import hashlib

    layout = VOCLayout.detect(root)
    h = hashlib.sha256()
    for split in SPLITS:
        f = layout.split_file(split_name, split)
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()[:12]


def voc_xml(
    filename: str,
    width: int,
    height: int,
    objects: Sequence[tuple[str, tuple[int, int, int, int], bool] | tuple],
) -> str:
    """A Pascal VOC annotation: the image's file name and size, and per object its class name, pixel box
    ``(xmin, ymin, xmax, ymax)`` and, optionally, its difficult flag."""
    from xml.sax.saxutils import escape

    lines = [
        "<annotation>",
        "    <folder>images</folder>",
        f"    <filename>{escape(filename)}</filename>",
        "    <size>",
        f"        <width>{width}</width>",
        f"        <height>{height}</height>",
        "        <depth>3</depth>",
        "    </size>",
        "    <segmented>0</segmented>",
    ]
    for obj in objects:
        name, (x1, y1, x2, y2), difficult = obj[0], obj[1], bool(obj[2]) if len(obj) > 2 else False
        lines += [
            "    <object>",
            f"        <name>{escape(name)}</name>",
            "        <pose>Unspecified</pose>",
            "        <truncated>0</truncated>",
            "        <occluded>0</occluded>",
            f"        <difficult>{int(difficult)}</difficult>",
            "        <bndbox>",
            f"            <xmin>{x1}</xmin>",
            f"            <ymin>{y1}</ymin>",
            f"            <xmax>{x2}</xmax>",
            f"            <ymax>{y2}</ymax>",
            "        </bndbox>",
            "    </object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def write_split(root: str | Path, name: str, ids_per_split: Sequence[Sequence[str]]) -> Path:
    """Write ``ROOT/splits/NAME/{train,val,test}.txt`` (atomically per file)."""
    out = Path(root) / "splits" / name
    out.mkdir(parents=True, exist_ok=True)
    for split, ids in zip(SPLITS, ids_per_split):
        write_text_atomic(out / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    return out


# -------------------------------------------------------------------------------------------- stats
SIZE_BINS: tuple[float, ...] = (8, 16, 32, 64, 128)


def box_size_histogram(annotations: Iterable[Annotation]) -> dict[str, int]:
    """Count boxes by the shorter side in pixels: the small faces are the hard ones."""
    sides = [np.minimum(a.boxes[:, 2] - a.boxes[:, 0], a.boxes[:, 3] - a.boxes[:, 1]) for a in annotations]
    s = np.concatenate(sides) if sides else np.zeros(0)
    edges = (0.0, *SIZE_BINS, float("inf"))
    names = [f"<{SIZE_BINS[0]:g}px"] + [f"{a:g}-{b:g}px" for a, b in zip(SIZE_BINS[:-1], SIZE_BINS[1:])]
    names.append(f">={SIZE_BINS[-1]:g}px")
    return {n: int(((s >= lo) & (s < hi)).sum()) for n, lo, hi in zip(names, edges[:-1], edges[1:])}


def relative_area_quantiles(
    annotations: Iterable[Annotation], qs: Sequence[float] = (0.1, 0.5, 0.9)
) -> list[float]:
    areas = [
        ((a.boxes[:, 2] - a.boxes[:, 0]) * (a.boxes[:, 3] - a.boxes[:, 1])) / (a.width * a.height)
        for a in annotations
    ]
    v = np.concatenate(areas) if areas else np.zeros(0)
    return [float(np.quantile(v, q)) if v.size else float("nan") for q in qs]


def class_counts(annotations: Iterable[Annotation], classes: Sequence[str]) -> dict[str, int]:
    c = Counter(int(x) for a in annotations for x in a.labels)
    return {name: c.get(i + 1, 0) for i, name in enumerate(classes)}
