"""The saved-detections file (``maskssd evaluate --save-detections``, a run's ``detections/<split>.json``): every
detection of a split in original pixels at full precision, each image's id and size, the metrics printed for
it (with their bootstrap intervals when computed), the settings that produced it and where its data lives.

Ground truth is not stored: it comes from the dataset (:func:`score_detections` takes the split's
annotations), so a file re-scores to exactly the numbers printed when it was written. Boxes and scores are
written with Python's float repr (JSON doubles), which reads back to the very float32 values the model gave.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from maskssd.data.voc import Annotation
from maskssd.errors import MaskSSDError
from maskssd.evaluation.bootstrap import BootstrapResult, Marked, PairedResult, mark, paired_bootstrap
from maskssd.evaluation.metrics import EvalResult, evaluate_set
from maskssd.evaluation.records import Detections, EvalSet, Target
from maskssd.evaluation.voc import match

__all__ = [
    "compare_detections",
    "detections_doc",
    "doc_evalset",
    "load_detections",
    "mark_doc",
    "score_detections",
    "write_detections",
]

FORMAT = 2  # 1: boxes rounded to 0.01 px and scores to 5 digits (could not be re-scored exactly)


def _rows(d: Detections, class_names: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"box": [float(v) for v in b], "label": class_names[int(lab) - 1], "score": float(s)}
        for b, lab, s in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist())
    ]


def detections_doc(
    evalset: EvalSet,
    result: EvalResult,
    settings: Mapping[str, Any],
    *,
    bootstrap: BootstrapResult | None = None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The file's content: the set's images in evaluation order, each with its (width, height) and detections,
    the metrics, the settings, the bootstrap intervals (if any) and the data (``root``, ``split_name``,
    ``split``) the ground truth comes from."""
    names = evalset.class_names
    doc: dict[str, Any] = {
        "format": FORMAT,
        "classes": list(names),
        "images": [
            {"id": i, "width": size[0], "height": size[1], "detections": _rows(d, names)}
            for i, size, d in zip(evalset.image_ids, evalset.sizes, evalset.detections, strict=True)
        ],
        "metrics": {
            "map": result.map,
            "ap": result.ap,
            "map_voc12": result.map_voc12,
            "ap_voc12": result.ap_voc12,
            "map_coco": result.map_coco,
            "ap50_coco": result.ap50_coco,
            "n_gt": result.n_gt,
        },
        "settings": dict(settings),
    }
    if bootstrap is not None:
        doc["bootstrap"] = bootstrap.to_dict()
    if data is not None:
        doc["data"] = dict(data)
    return doc


def write_detections(
    path: str | Path,
    evalset: EvalSet,
    result: EvalResult,
    settings: Mapping[str, Any],
    *,
    bootstrap: BootstrapResult | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write :func:`detections_doc` as JSON (NaN metrics as JSON ``NaN``, which Python reads back); every image
    of the set needs its size."""
    if any(s is None for s in evalset.sizes):
        raise ValueError("a detections file needs every image's size")
    doc = detections_doc(evalset, result, settings, bootstrap=bootstrap, data=data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_detections(path: str | Path) -> dict[str, Any]:
    """Read a saved-detections file; refuses (MaskSSDError) one that is not one or cannot be re-scored."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MaskSSDError(f"{path}: not a readable detections file ({e})") from None
    if not isinstance(doc, dict) or not {"classes", "images"} <= set(doc):
        raise MaskSSDError(f"{path}: not a maskssd detections file (no 'classes' and 'images')")
    if doc.get("format", 1) < FORMAT:
        raise MaskSSDError(
            f"{path}: an old detections file (boxes rounded to 0.01 px): it cannot reproduce its metrics; "
            "write it again with maskssd evaluate --save-detections"
        )
    for k, im in enumerate(doc["images"]):
        if not {"id", "width", "height", "detections"} <= set(im):
            raise MaskSSDError(f"{path} [images[{k}]]: needs id, width, height and detections")
    doc["path"] = str(path)
    return doc


def doc_evalset(doc: Mapping[str, Any], annotations: Sequence[Annotation]) -> EvalSet:
    """A saved file's detections with the annotations of its images, in its order; refuses images the dataset
    does not have and images whose size differs."""
    index = {name: i + 1 for i, name in enumerate(doc["classes"])}
    by_id = {a.image_id: a for a in annotations}
    where = doc.get("path", "the detections file")
    missing = [im["id"] for im in doc["images"] if im["id"] not in by_id]
    if missing:
        raise MaskSSDError(
            f"{where}: {len(missing)} of its {len(doc['images'])} images are not in the dataset "
            f"(first: {missing[0]!r}); pass the data the detections were made on"
        )
    out = EvalSet(doc["classes"])
    for im in doc["images"]:
        ann = by_id[im["id"]]
        if (ann.width, ann.height) != (im["width"], im["height"]):
            raise MaskSSDError(
                f"{where}: image {im['id']!r} is {im['width']}x{im['height']} in the file but "
                f"{ann.width}x{ann.height} in the dataset"
            )
        dets = im["detections"]
        det = Detections(
            torch.tensor([d["box"] for d in dets], dtype=torch.float64).reshape(-1, 4),
            torch.tensor([index[d["label"]] for d in dets], dtype=torch.long),
            torch.tensor([d["score"] for d in dets], dtype=torch.float64),
        )
        out.add(im["id"], det, Target.from_annotation(ann), (im["width"], im["height"]))
    return out


def score_detections(
    doc: Mapping[str, Any],
    annotations: Sequence[Annotation],
    *,
    iou_threshold: float = 0.5,
    coco: bool = False,
) -> EvalResult:
    """Every metric of a saved file against the dataset's ground truth (annotations loaded with the file's
    ``classes``); equal to what was printed when the file was written."""
    return evaluate_set(doc_evalset(doc, annotations), iou_threshold=iou_threshold, coco=coco)


def mark_doc(
    doc: Mapping[str, Any], annotations: Sequence[Annotation], *, iou_threshold: float = 0.5
) -> Marked:
    """A saved file's detections sorted and marked once, ready to be resampled (:mod:`.bootstrap`)."""
    return mark(match(doc_evalset(doc, annotations), iou_threshold))


def _aligned(doc: Mapping[str, Any], ids: Sequence[str], reference: str) -> Mapping[str, Any]:
    """``doc`` with its images in the order ``ids``; refuses a file on other images."""
    own = [im["id"] for im in doc["images"]]
    if own == list(ids):
        return doc
    if sorted(own) != sorted(ids):
        only = sorted(set(own) ^ set(ids))
        raise MaskSSDError(
            f"{doc.get('path', 'a detections file')} and {reference} are not on the same images "
            f"({len(own)} vs {len(ids)} images; {len(only)} differ, e.g. {only[0]!r}): a paired comparison "
            "needs both runs' detections on the same split"
        )
    by_id = {im["id"]: im for im in doc["images"]}
    return {**doc, "images": [by_id[i] for i in ids]}


def compare_detections(
    docs_a: Sequence[Mapping[str, Any]],
    docs_b: Sequence[Mapping[str, Any]],
    annotations: Sequence[Annotation],
    *,
    n: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    iou_threshold: float = 0.5,
) -> PairedResult:
    """The paired bootstrap of saved files: A − B on the same images (each side one file or several, pooled)."""
    docs = [*docs_a, *docs_b]
    if not docs_a or not docs_b:
        raise MaskSSDError("a comparison needs at least one detections file on each side")
    ref = docs[0]
    ids = [im["id"] for im in ref["images"]]
    for d in docs[1:]:
        if list(d["classes"]) != list(ref["classes"]):
            raise MaskSSDError(f"{d.get('path')}: classes {d['classes']} differ from {ref['classes']}")
    marked = [
        mark_doc(_aligned(d, ids, str(ref.get("path"))), annotations, iou_threshold=iou_threshold)
        for d in docs
    ]
    return paired_bootstrap(marked[: len(docs_a)], marked[len(docs_a) :], n=n, seed=seed, ci=ci)
