"""Pascal VOC face-mask datasets: safe parsing, image loading, splits, torch Dataset and collate.

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

import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

import numpy as np
import torch
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET
from PIL import Image, UnidentifiedImageError

from maskssd.errors import DataError

DEFAULT_CLASSES: tuple[str, ...] = ("with_mask", "without_mask", "mask_weared_incorrect")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Images larger than this many pixels are refused before decoding (decompression-bomb guard).
MAX_IMAGE_PIXELS = 40_000_000

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


# ------------------------------------------------------------------------------------------ images
def _check_pixels(img: Image.Image, path: Path, max_pixels: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DataError(f"image has an empty size {w}x{h}", path)
    if w * h > max_pixels:
        raise DataError(
            f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise max_pixels if this is a genuine image)",
            path,
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit and float greyscale are scaled (not clipped), alpha is dropped."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 256.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray((arr / scale).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_image_size(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the image header only, with the same checks as :func:`load_image`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img, path, max_pixels)
                return img.size
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"unreadable image ({type(e).__name__}: {e})", path) from None


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image of any mode (RGB, RGBA, L, P, ...) as RGB; alpha is dropped like every known loader."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img, path, max_pixels)
                img.load()
                return _to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"unreadable or corrupt image ({type(e).__name__}: {e})", path) from None


def decode_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "<bytes>") -> Image.Image:
    """Like :func:`load_image` for in-memory bytes (uploads, video frames)."""
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_pixels(img, Path(name), max_pixels)
                img.load()
                return _to_rgb(img)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"not a readable image ({type(e).__name__}: {e})", name) from None


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
        path = self.split_file(split_name, split)
        if not path.is_file():
            known = ", ".join(self.split_names()) or "none"
            raise DataError(f"split list not found (known split names: {known})", path)
        ids = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                ids.append(line.split()[0])
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
            report.fixes.append((str(xml_path), f"<size> {int(xw)}x{int(xh)} differs from the image "
                                                f"{width}x{height}; used the image's"))

    class_index = {name: i + 1 for i, name in enumerate(classes)}
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        where = f"object[{k}]"
        name = _text(obj, "name", xml_path, where)
        if name not in class_index:
            raise DataError(f"unknown class {name!r} (known: {', '.join(classes)})", xml_path, f"{where}/name")
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
                raise DataError(f"<difficult> is not 0/1: {diff_node.text!r}", xml_path, f"{where}/difficult") from None
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            report.clipped_boxes += 1
            report.fixes.append((str(xml_path), f"{where}: box ({x1:g},{y1:g},{x2:g},{y2:g}) clipped to the "
                                                f"{width}x{height} image"))
        if cx2 - cx1 < 1.0 or cy2 - cy1 < 1.0:
            report.dropped_degenerate += 1
            report.fixes.append((str(xml_path), f"{where}: degenerate box ({x1:g},{y1:g},{x2:g},{y2:g}) dropped"))
            continue
        boxes.append((cx1, cy1, cx2, cy2))
        labels.append(class_index[name])
        difficult.append(is_difficult)

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
            report.skipped.append((e.path or image_id, e.reason if e.element is None else f"[{e.element}] {e.reason}"))
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
    return load_annotations(root, layout.read_split(split_name, split), classes, on_error, report, max_pixels,
                            verify_images)


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


def write_split(root: str | Path, name: str, ids_per_split: Sequence[Sequence[str]]) -> Path:
    """Write ``ROOT/splits/NAME/{train,val,test}.txt`` (atomically per file)."""
    out = Path(root) / "splits" / name
    out.mkdir(parents=True, exist_ok=True)
    for split, ids in zip(SPLITS, ids_per_split):
        tmp = out / f".{split}.txt.tmp"
        tmp.write_text("".join(f"{i}\n" for i in ids))
        os.replace(tmp, out / f"{split}.txt")
    return out


# ------------------------------------------------------------------------------------- torch dataset
@dataclass
class Batch:
    """A collated batch. ``boxes`` are normalised xyxy per image; ``sizes`` are original (width, height)."""

    images: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    boxes: list[torch.Tensor]  # each (n_i, 4) normalised xyxy
    labels: list[torch.Tensor]  # each (n_i,) int64, 1..C
    difficult: list[torch.Tensor]  # each (n_i,) bool
    image_ids: list[str]
    sizes: torch.Tensor  # (N, 2) original (width, height)

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            [b.to(device, non_blocking=non_blocking) for b in self.boxes],
            [x.to(device, non_blocking=non_blocking) for x in self.labels],
            [d.to(device, non_blocking=non_blocking) for d in self.difficult],
            self.image_ids,
            self.sizes.to(device),
        )

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.boxes, self.labels, self.difficult, self.image_ids, self.sizes)


Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]


class FaceMaskDataset(torch.utils.data.Dataset):
    """A VOC face-mask split as a torch dataset.

    A sample is a dict: ``image`` (uint8 ``tv_tensors.Image`` before the transform; the transform
    returns a float image in [0, 1]), ``boxes`` (``tv_tensors.BoundingBoxes``), ``labels``,
    ``difficult``, ``image_id`` and ``size`` (original width, height).
    ``cache_images`` keeps decoded images in memory: worth it for small datasets read for many epochs.
    """

    def __init__(
        self,
        annotations: Sequence[Annotation],
        transform: Transform | None = None,
        classes: Sequence[str] = DEFAULT_CLASSES,
        cache_images: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.annotations = list(annotations)
        self.transform = transform
        self.classes = tuple(classes)
        self.cache_images = cache_images
        self.max_pixels = max_pixels
        self._cache: dict[int, torch.Tensor] = {}

    @classmethod
    def from_root(
        cls,
        root: str | Path,
        split: str | None = "train",
        split_name: str = "paper",
        classes: Sequence[str] = DEFAULT_CLASSES,
        transform: Transform | None = None,
        on_error: OnError = "raise",
        report: DataReport | None = None,
        cache_images: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> FaceMaskDataset:
        if split is None:
            anns = load_annotations(root, None, classes, on_error, report, max_pixels)
        else:
            anns = load_split(root, split, split_name, classes, on_error, report, max_pixels)
        return cls(anns, transform, classes, cache_images, max_pixels)

    def __len__(self) -> int:
        return len(self.annotations)

    def _image_tensor(self, index: int) -> torch.Tensor:
        if index in self._cache:
            return self._cache[index]
        from torchvision.transforms.v2 import functional as F

        img = F.pil_to_tensor(load_image(self.annotations[index].image_path, self.max_pixels))
        if self.cache_images:
            self._cache[index] = img
        return img

    def raw_sample(self, index: int) -> Sample:
        from torchvision import tv_tensors

        ann = self.annotations[index]
        img = self._image_tensor(index)
        h, w = img.shape[-2:]
        return {
            "image": tv_tensors.Image(img),
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(ann.boxes.copy()), format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(ann.labels.copy()),
            "difficult": torch.from_numpy(ann.difficult.copy()),
            "image_id": ann.image_id,
            "size": (ann.width, ann.height),
        }

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        """``dataset[i]``, or ``dataset[(seed, i)]`` to draw the augmentation from a fixed seed."""
        seed, index = key if isinstance(key, tuple) else (None, key)
        sample = self.raw_sample(index)
        if self.transform is None:
            return sample
        if seed is None:
            return self.transform(sample)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(sample)

    def class_box_counts(self) -> dict[str, int]:
        counts = Counter(int(x) for a in self.annotations for x in a.labels)
        return {name: counts.get(i + 1, 0) for i, name in enumerate(self.classes)}


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack transformed samples (same image size) into a :class:`Batch`."""
    return Batch(
        images=torch.stack([s["image"].as_subclass(torch.Tensor) for s in samples]),
        boxes=[s["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4) for s in samples],
        labels=[s["labels"].long() for s in samples],
        difficult=[s["difficult"].bool() for s in samples],
        image_ids=[s["image_id"] for s in samples],
        sizes=torch.tensor([s["size"] for s in samples], dtype=torch.float32).reshape(-1, 2),
    )


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


def relative_area_quantiles(annotations: Iterable[Annotation], qs: Sequence[float] = (0.1, 0.5, 0.9)) -> list[float]:
    areas = [((a.boxes[:, 2] - a.boxes[:, 0]) * (a.boxes[:, 3] - a.boxes[:, 1])) / (a.width * a.height)
             for a in annotations]
    v = np.concatenate(areas) if areas else np.zeros(0)
    return [float(np.quantile(v, q)) if v.size else float("nan") for q in qs]


def class_counts(annotations: Iterable[Annotation], classes: Sequence[str]) -> dict[str, int]:
    c = Counter(int(x) for a in annotations for x in a.labels)
    return {name: c.get(i + 1, 0) for i, name in enumerate(classes)}


# ------------------------------------------------------------------------------------------ sampling
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: a pure function, so any worker count, a resumed run
    and a distributed run all draw the same augmentation for the same sample."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class SeededSampler(torch.utils.data.Sampler):
    """Shuffles per epoch from ``(seed, epoch)`` and yields ``(sample_seed, index)`` keys.

    With ``num_replicas > 1`` each rank takes every ``num_replicas``-th index of the padded permutation
    (like ``DistributedSampler``), so ranks see disjoint shards of equal length.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, num_replicas: int = 1,
                 drop_last: bool = False, pad: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.num_replicas, self.drop_last, self.pad = rank, num_replicas, drop_last, pad
        self.epoch = 0
        if not pad:  # uneven shards, every index exactly once (evaluation)
            self.num_samples = len(range(rank, n, num_replicas))
        else:
            self.num_samples = (n // num_replicas) if drop_last else -(-n // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if not self.pad:
            for index in order[self.rank::self.num_replicas]:
                yield sample_seed(self.seed, self.epoch, index), index
            return
        total = self.num_samples * self.num_replicas
        order = (order + order[: max(total - len(order), 0)])[:total]
        for index in order[self.rank:total:self.num_replicas]:
            yield sample_seed(self.seed, self.epoch, index), index
