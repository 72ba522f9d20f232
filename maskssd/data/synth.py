"""Synthetic face-mask scenes: the embedded default dataset for machines without the real one.

:func:`generate` draws cartoon-like "photos" of people and writes them in the Kaggle VOC layout of the
real face-mask dataset (``images/*.png`` + ``annotations/*.xml`` with the same XML structure), plus a
stratified split ``splits/NAME/{train,val,test}.txt`` made with :func:`maskssd.data.stratified_split`.
:func:`ensure_synth` generates only when no complete dataset with the same parameters is there; the
quickstart configs call it on first use.

What a scene looks like
-----------------------
* A background of gradients, low-frequency colour noise and random shapes (shelves, windows,
  furniture, blurred lights), with a floor band sometimes.
* 1-6 people (``faces_per_image``), each a head on a neck and shoulders (sometimes the body is left
  out, as for faces in a crowd). Faces of one image share a scale (a group photo) with some spread; the
  face height is log-uniform in ``face_size`` (fraction of the image height). Faces do not overlap
  (IoU < 0.1) and lie fully inside the image.
* A face: skin-toned head (several skin tones) with ears, hair (short, long, cap, hood or bald),
  eyebrows, eyes, nose, mouth, sometimes a beard or glasses, a small yaw (features shifted to one side)
  and roll (a few degrees). Drawn at 2x (4x for tiny faces) and downscaled: anti-aliased.
* The class decides the mask, drawn like the real ones (surgical light blue/white with pleats, cloth
  black/grey/colour with a seam, or KN95 white), with straps to the ears:

  - ``with_mask`` (``classes[0]``): the mask covers nose *and* mouth, from just below the eyes to the chin;
  - ``without_mask`` (``classes[1]``): no mask; nose and mouth visible;
  - ``mask_weared_incorrect`` (``classes[2]``): the same masks pulled *below the nose* (nose and nostrils
    visible, mouth and chin covered), or in a quarter of the cases down on the chin (mouth visible too).

* The box annotates the face like the real data: forehead (hairline) to chin, ear to ear (the
  visible face for hoods). It is measured on the drawn face, rotation included, in integer pixels.

Classes are drawn per face with ``class_probs`` (by default the real imbalance: 80 / 17 / 3 %).
So that the stratified split can give every split every class, after the scenes are planned each
class with a non-zero probability is made present in at least ``ceil(1 / min(split_ratios))`` images
(7 with the default ratios; fewer if there are fewer images) by relabelling faces of the most frequent
class where chance left it short. :attr:`SynthSummary.forced_faces` counts them: 0 on most seeds with
200 images, a few with 30 (the rarest class is ~3 % of the faces). Classes with probability 0 stay absent.

Everything is deterministic per ``seed`` (``numpy`` Generators seeded from it, no global RNG): same
seed, byte-identical annotations and identical image pixels.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskssd.data.synth_draw import MAX_FACE_IOU, Face, Plan, hair_box, iou, overlap, render
from maskssd.data.voc import DEFAULT_CLASSES, SPLITS, load_annotations, stratified_split, voc_xml, write_split
from maskssd.errors import DataError
from maskssd.files import atomic_path, write_text_atomic

#: Bumped whenever the drawing changes, so :func:`ensure_synth` regenerates old datasets.
SYNTH_VERSION = 1
GENERATOR = "maskssd.synth"
MARKER = ".synth.json"
README_TITLE = "# Synthetic face-mask dataset (maskssd.synth)"
PREFIX = "synth_"


@dataclass
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    images: int
    boxes: dict[str, int]  # per class name
    split_name: str
    forced_faces: int = 0  # faces relabelled so that every class is in every split
    split_sizes: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- parameters
def _params(
    n_images: int,
    seed: int,
    class_probs: Sequence[float],
    faces_per_image: tuple[int, int],
    image_size: tuple[int, int],
    face_size: tuple[float, float],
    split_name: str,
    split_ratios: Sequence[float],
    classes: Sequence[str],
) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "version": SYNTH_VERSION,
        "n_images": int(n_images),
        "seed": int(seed),
        "class_probs": [float(p) for p in class_probs],
        "faces_per_image": [int(v) for v in faces_per_image],
        "image_size": [int(v) for v in image_size],
        "face_size": [float(v) for v in face_size],
        "split_name": str(split_name),
        "split_ratios": [float(r) for r in split_ratios],
        "classes": [str(c) for c in classes],
    }


def _validate(p: dict[str, Any]) -> None:
    if p["n_images"] < 1:
        raise ValueError(f"n_images must be >= 1, got {p['n_images']}")
    if p["seed"] < 0:
        raise ValueError(f"seed must be >= 0, got {p['seed']}")
    classes = p["classes"]
    if len(classes) not in (2, 3) or len(set(classes)) != len(classes) or not all(classes):
        raise ValueError(
            "classes must be 2 or 3 distinct names (with mask, without mask[, mask worn "
            f"incorrectly]), got {classes}"
        )
    probs = p["class_probs"]
    if len(probs) != len(classes) or any(not math.isfinite(x) or x < 0 for x in probs) or sum(probs) <= 0:
        raise ValueError(
            f"class_probs must be {len(classes)} non-negative numbers with a positive sum, got {probs}"
        )
    lo, hi = p["faces_per_image"]
    if not 1 <= lo <= hi <= 50:
        raise ValueError(f"faces_per_image must be (min, max) with 1 <= min <= max <= 50, got {(lo, hi)}")
    lo, hi = p["image_size"]
    if not 64 <= lo <= hi <= 4096:
        raise ValueError(
            f"image_size must be (min, max) long side with 64 <= min <= max <= 4096, got {(lo, hi)}"
        )
    lo, hi = p["face_size"]
    if not 0 < lo <= hi <= 0.8:
        raise ValueError(f"face_size must be (min, max) fractions with 0 < min <= max <= 0.8, got {(lo, hi)}")
    ratios = p["split_ratios"]
    if len(ratios) != len(SPLITS) or any(r <= 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split_ratios must be {len(SPLITS)} positive numbers summing to 1, got {ratios}")
    name = p["split_name"]
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"split_name must be a plain directory name, got {name!r}")


# -------------------------------------------------------------------------------------------- planning
def _plan_image(rng: np.random.Generator, p: dict[str, Any], probs: np.ndarray) -> Plan:
    lo, hi = p["image_size"]
    long_side = int(rng.integers(lo, hi + 1))
    short_side = max(48, round(long_side * rng.uniform(0.56, 0.9)))
    w, h = (short_side, long_side) if rng.random() < 0.2 else (long_side, short_side)
    k = int(rng.integers(p["faces_per_image"][0], p["faces_per_image"][1] + 1))
    f_lo, f_hi = p["face_size"]
    base = math.exp(rng.uniform(math.log(f_lo), math.log(f_hi)))
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(k):
        for _attempt in range(40):
            frac = float(np.clip(base * math.exp(rng.normal(0.0, 0.25)), f_lo, f_hi))
            fh = max(10.0, frac * h)
            fw = fh * rng.uniform(0.74, 0.9)
            margin = max(2.0, 0.05 * fh)  # room for the roll
            if fw + 2 * margin > w or fh + 2 * margin > h:
                scale = min((w - 2 * margin) / fw, (h - 2 * margin) / fh)
                fw, fh = fw * scale, fh * scale
            x1 = rng.uniform(margin, w - margin - fw)
            y1 = rng.uniform(margin, h - margin - fh)
            box = (x1, y1, x1 + fw, y1 + fh)
            if all(
                iou(box, b) < MAX_FACE_IOU * 0.8
                and overlap(hair_box(box), b) < 0.2
                and overlap(hair_box(b), box) < 0.2
                for b in boxes
            ):
                boxes.append(box)
                break
    kinds = rng.choice(len(probs), size=len(boxes), p=probs)
    faces = [Face(b, int(c)) for b, c in zip(boxes, kinds, strict=True)]
    faces.sort(key=lambda f: f.box[3] - f.box[1])  # far (small) first, near (large) painted last
    return Plan(w, h, faces)


def _force_every_class(rng: np.random.Generator, plans: list[Plan], probs: np.ndarray, need: int) -> int:
    """Relabel faces so each class with p > 0 is in >= ``need`` images (if enough faces). Returns how many."""
    forced = 0
    n_cls = len(probs)
    for c in sorted((c for c in range(n_cls) if probs[c] > 0), key=lambda c: probs[c]):
        while True:
            per_image = [Counter(f.kind for f in plan.faces) for plan in plans]
            image_count = Counter(k for cnt in per_image for k in cnt)
            if image_count[c] >= need:
                break
            candidates = [
                (i, j)
                for i, plan in enumerate(plans)
                if c not in per_image[i]
                for j, f in enumerate(plan.faces)
                if per_image[i][f.kind] > 1 or image_count[f.kind] > need
            ]
            if not candidates:
                break
            # prefer relabelling the most frequent class
            top = max(image_count[plans[i].faces[j].kind] for i, j in candidates)
            candidates = [(i, j) for i, j in candidates if image_count[plans[i].faces[j].kind] == top]
            i, j = candidates[int(rng.integers(len(candidates)))]
            plans[i].faces[j].kind = c
            forced += 1
    return forced


# ---------------------------------------------------------------------------------------------- writing
def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def _is_synth_dir(root: Path) -> bool:
    if _read_marker(root) is not None:
        return True
    try:
        with open(root / "README.md", encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == README_TITLE
    except OSError:
        return False


def _readme(
    p: dict[str, Any],
    boxes: dict[str, int],
    forced: int,
    faces_images: dict[str, int],
    split_sizes: dict[str, int],
) -> str:
    counts = "\n".join(f"| `{name}` | {boxes[name]} | {faces_images[name]} |" for name in p["classes"])
    return f"""{README_TITLE}

**Synthetic data, not photographs.** Generated by `maskssd.synth.generate` (generator version
{p["version"]}) as the default dataset for machines without the real face-mask dataset: cartoon-like
scenes of people with and without masks, in the same Kaggle VOC layout (`images/`, `annotations/`,
`splits/{p["split_name"]}/`). Do not report results on it as results on real data.

- seed: {p["seed"]}
- images: {p["n_images"]}
- faces: {sum(boxes.values())} ({forced} relabelled so that every class is in every split)
- class probabilities: {", ".join(f"{c}={x:g}" for c, x in zip(p["classes"], p["class_probs"], strict=True))}
- faces per image: {p["faces_per_image"][0]}-{p["faces_per_image"][1]}; image long side:
  {p["image_size"][0]}-{p["image_size"][1]} px; face height: {p["face_size"][0]:g}-{p["face_size"][1]:g}
  of the image height
- split `{p["split_name"]}`: ratios {", ".join(f"{r:g}" for r in p["split_ratios"])} (stratified):
  {", ".join(f"{s} {n} images" for s, n in split_sizes.items())}

| class | boxes | images |
|---|---|---|
{counts}

Regenerate with `maskssd.synth.generate` and the parameters recorded in `{MARKER}`, which is
written last and marks the dataset complete.
"""


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _prepare_output(root: Path, ids: list[str], split_name: str) -> tuple[Path, Path]:
    """Forget completeness and remove what an earlier generation left that this one will not write."""
    old = _read_marker(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    # the README's first line marks the directory as ours from the start (an interrupted run is redone)
    write_text_atomic(
        root / "README.md", f"{README_TITLE}\n\nSynthetic data: generation in progress or interrupted.\n"
    )
    images_dir, ann_dir = root / "images", root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    keep = set(ids)
    for d, ext in ((images_dir, ".png"), (ann_dir, ".xml")):
        for f in d.glob(f"{PREFIX}*{ext}"):
            if f.stem not in keep:
                f.unlink()
        for f in d.glob(f".{PREFIX}*.tmp"):  # left by an interrupted generation
            f.unlink()
    if old is not None and isinstance(old.get("split_name"), str) and old["split_name"] != split_name:
        old_split = root / "splits" / old["split_name"]
        if old_split.is_dir() and "/" not in old["split_name"] and old["split_name"] not in (".", ".."):
            for s in SPLITS:
                (old_split / f"{s}.txt").unlink(missing_ok=True)
            try:
                old_split.rmdir()
            except OSError:
                pass
    return images_dir, ann_dir


def generate(
    out: str | Path,
    n_images: int = 200,
    seed: int = 0,
    class_probs: Sequence[float] = (0.80, 0.17, 0.03),
    faces_per_image: tuple[int, int] = (1, 6),
    image_size: tuple[int, int] = (256, 480),
    face_size: tuple[float, float] = (0.06, 0.35),
    split_name: str = "default",
    split_ratios: Sequence[float] = (0.7, 0.15, 0.15),
    classes: Sequence[str] = DEFAULT_CLASSES,
    *,
    workers: int | None = None,
) -> SynthSummary:
    """Write ``n_images`` synthetic scenes to ``out`` (Kaggle VOC layout) with a stratified split.

    ``class_probs`` is per face, by class position (with mask, without mask, mask worn incorrectly).
    Refuses (:class:`DataError`) a non-empty ``out`` that is not a synthetic dataset; an earlier synthetic
    dataset there is overwritten (its extra ``synth_*`` files removed). ``workers`` threads draw and
    save the images (default: the CPU count, at most 4); the output does not depend on it.
    """
    params = _params(
        n_images, seed, class_probs, faces_per_image, image_size, face_size, split_name, split_ratios, classes
    )
    _validate(params)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DataError("output path exists and is not a directory", root)
    if root.is_dir() and any(root.iterdir()) and not _is_synth_dir(root):
        raise DataError(
            "refusing to write a synthetic dataset into a non-empty directory that is not one "
            f"(no {MARKER} or synthetic README.md); choose an empty or new directory",
            root,
        )
    probs = np.asarray(params["class_probs"], dtype=np.float64)
    probs = probs / probs.sum()
    classes = params["classes"]

    # plan every scene first (sizes, face boxes, classes), so the class guarantee can be applied
    plan_rng = np.random.default_rng([params["seed"], 0])
    plans = [_plan_image(plan_rng, params, probs) for _ in range(params["n_images"])]
    # the stratified split gives a class to every split once it is in >= 1 / min(ratio) images
    need = min(params["n_images"], math.ceil(1.0 / min(params["split_ratios"]) - 1e-9))
    forced = _force_every_class(plan_rng, plans, probs, need)

    ids = [f"{PREFIX}{i:05d}" for i in range(params["n_images"])]
    images_dir, ann_dir = _prepare_output(root, ids, split_name)

    def make(i: int) -> list[str]:
        image_id, plan = ids[i], plans[i]
        img, objects = render(plan, np.random.default_rng([params["seed"], 1, i]))
        filename = f"{image_id}.png"
        with atomic_path(images_dir / filename) as tmp:
            img.save(tmp, format="PNG", compress_level=1)
        named = [(classes[k], b) for k, b in objects]
        write_text_atomic(ann_dir / f"{image_id}.xml", voc_xml(filename, plan.width, plan.height, named))
        return [name for name, _ in named]

    # PIL releases the GIL while encoding, resampling and blurring: two threads use two cores
    n_workers = max(1, min(_cores() if workers is None else workers, 4, len(ids)))
    drawn: Counter[str] = Counter()  # faces per class, as written
    image_counts: Counter[str] = Counter()  # images holding each class
    if n_workers == 1:
        results = [make(i) for i in range(len(ids))]
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            results = list(pool.map(make, range(len(ids))))
    for names in results:
        drawn.update(names)
        image_counts.update(set(names))

    anns = load_annotations(root, ids, classes)
    per_split = stratified_split(anns, params["split_ratios"], seed=params["seed"], num_classes=len(classes))
    write_split(root, params["split_name"], per_split)
    summary = SynthSummary(
        root=root,
        images=len(ids),
        boxes={c: drawn.get(c, 0) for c in classes},
        split_name=params["split_name"],
        forced_faces=forced,
        split_sizes={s: len(x) for s, x in zip(SPLITS, per_split, strict=True)},
    )
    write_text_atomic(
        root / "README.md",
        _readme(
            params, summary.boxes, forced, {c: image_counts.get(c, 0) for c in classes}, summary.split_sizes
        ),
    )
    marker = dict(params, boxes=summary.boxes, forced_faces=forced, split_sizes=summary.split_sizes)
    write_text_atomic(root / MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return summary


def _defaults_of(fn: Any) -> dict[str, Any]:
    import inspect

    return {
        k: v.default
        for k, v in inspect.signature(fn).parameters.items()
        if k not in ("out", "n_images", "seed", "split_name", "workers")
    }


#: The other parameters of :func:`generate` and their defaults (what ``options`` may hold).
_GENERATE_DEFAULTS = _defaults_of(generate)


def is_complete(
    out: str | Path, n_images: int = 200, seed: int = 0, split_name: str = "default", **options: Any
) -> bool:
    """True when ``out`` holds a complete synthetic dataset made with these parameters."""
    root = Path(out)
    kwargs = _GENERATE_DEFAULTS | options
    want = _params(
        n_images,
        seed,
        kwargs["class_probs"],
        kwargs["faces_per_image"],
        kwargs["image_size"],
        kwargs["face_size"],
        split_name,
        kwargs["split_ratios"],
        kwargs["classes"],
    )
    marker = _read_marker(root)
    if marker is None or {k: marker.get(k) for k in want} != want:
        return False
    if not all((root / "splits" / split_name / f"{s}.txt").is_file() for s in SPLITS):
        return False
    for i in range(n_images):
        stem = f"{PREFIX}{i:05d}"
        if (
            not (root / "images" / f"{stem}.png").is_file()
            or not (root / "annotations" / f"{stem}.xml").is_file()
        ):
            return False
    return True


def ensure_synth(
    out: str | Path, n_images: int = 200, seed: int = 0, split_name: str = "default", **options: Any
) -> Path:
    """Generate the synthetic dataset at ``out`` unless a complete one with these parameters is there.

    Completeness is the ``.synth.json`` marker (written last, after every image and the split) with the
    same parameters, plus the files it promises; an interrupted generation is redone. ``options`` are
    the other :func:`generate` parameters. Returns ``out`` as a :class:`Path`.
    """
    unknown = set(options) - set(_GENERATE_DEFAULTS) - {"workers"}
    if unknown:
        raise TypeError(f"ensure_synth() got unexpected options: {', '.join(sorted(unknown))}")
    root = Path(out)
    if not is_complete(root, n_images, seed, split_name, **options):
        generate(root, n_images=n_images, seed=seed, split_name=split_name, **options)
    return root
