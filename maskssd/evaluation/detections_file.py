"""The saved-detections file (``maskssd evaluate --save-detections``, a run's ``detections/<split>.json``): every
detection of a split in original pixels at full precision, each image's id and size, the metrics printed for
it (with their bootstrap intervals when computed), the settings that produced it and where its data lives.

A name ending in ``.gz`` is read and written gzip-compressed (a pooled out-of-fold file is megabytes of
JSON; compressed, small enough to commit beside the record it backs). A fold run's file (``data.fold``) holds one
fold of a cross-validation; :func:`merge_folds` joins a cross-validation's fold files, trained in different
runs or on different machines, into its out-of-fold file.

Ground truth is not stored: it comes from the dataset (:func:`score_detections` takes the split's
annotations), so a file re-scores to exactly the numbers printed when it was written. Boxes and scores are
the model's float32 values, each written as the shortest decimal that reads back to it (format 3), and read
back through float32: the very values the model gave.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
    "merge_folds",
    "restrict",
    "score_detections",
    "write_detections",
    "write_doc",
]

#: 1: boxes rounded to 0.01 px and scores to 5 digits (could not be re-scored exactly); 2: every float32 written
#: as the float64 it converts to (17 digits); 3: the shortest decimal that reads back to the same float32 (about
#: half the size), read back through float32
FORMAT = 3
EXACT = 2  # the oldest format that re-scores exactly


def _f32(v: float) -> float:
    """A model's float32 value as the shortest decimal that reads back to it (numpy's shortest repr)."""
    return float(str(np.float32(v)))


def _rows(d: Detections, class_names: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"box": [_f32(v) for v in b], "label": class_names[int(lab) - 1], "score": _f32(s)}
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
    return write_doc(path, detections_doc(evalset, result, settings, bootstrap=bootstrap, data=data))


def write_doc(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write a detections doc (one read with :func:`load_detections`: its ``path`` and ``ref`` are left out)."""
    doc = _shortest({k: v for k, v in doc.items() if k not in ("path", "ref")})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":  # compact, and mtime 0: the same detections give the same bytes
        path.write_bytes(gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0))
    else:
        path.write_text(json.dumps(doc, indent=1))
    return path


def _shortest(doc: dict[str, Any]) -> dict[str, Any]:
    """A format-2 doc written again in format 3 when every number is a float32 (what a model gives): the same
    values, about half the bytes. One holding another number is left as it is."""
    if doc.get("format") != EXACT:
        return doc
    images = []
    for im in doc["images"]:
        rows = []
        for d in im["detections"]:
            row = {**d, "box": [_f32(v) for v in d["box"]], "score": _f32(d["score"])}
            if any(
                float(np.float32(a)) != b
                for a, b in zip([*row["box"], row["score"]], [*d["box"], d["score"]])
            ):
                return doc
            rows.append(row)
        images.append({**im, "detections": rows})
    return {**doc, "format": FORMAT, "images": images}


def load_detections(path: str | Path) -> dict[str, Any]:
    """Read a saved-detections file; refuses (MaskSSDError) one that is not one or cannot be re-scored."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        doc = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except (OSError, ValueError, EOFError) as e:
        raise MaskSSDError(f"{path}: not a readable detections file ({e})") from None
    if not isinstance(doc, dict) or not {"classes", "images"} <= set(doc):
        raise MaskSSDError(f"{path}: not a maskssd detections file (no 'classes' and 'images')")
    if doc.get("format", 1) < EXACT:
        raise MaskSSDError(
            f"{path}: an old detections file (boxes rounded to 0.01 px): it cannot reproduce its metrics; "
            "write it again with maskssd evaluate --save-detections"
        )
    for k, im in enumerate(doc["images"]):
        if not {"id", "width", "height", "detections"} <= set(im):
            raise MaskSSDError(f"{path} [images[{k}]]: needs id, width, height and detections")
    doc["path"] = str(path)
    return doc


def merge_folds(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fold files (``data.fold``: one fold's images scored by the model that did not train on them) joined,
    per seed, into one out-of-fold doc of the folds given, in fold order; other docs pass through unchanged.

    The joined doc's ``data.folds_present`` lists its folds: all ``1..data.folds`` is the whole out-of-fold set,
    fewer a part of it (a cross-validation still being trained, fold by fold). Refuses fold files of different
    folds (digest) or classes, one without its folds' digest, and the same fold twice for a seed."""
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    for d in docs:
        data = d.get("data") or {}
        if not data.get("fold"):
            out.append(dict(d))
            continue
        where = d.get("path") or d.get("ref") or "a fold file"
        if not data.get("folds_hash"):
            raise MaskSSDError(
                f"{where}: fold {data['fold']}'s detections do not say which folds they belong to (an older "
                "file): write them again with maskssd evaluate --model FOLD_RUN --split oof --save-detections F"
            )
        groups.setdefault((data["folds_hash"], data.get("seed")), []).append(d)
    hashes = {h for h, _ in groups}
    if len(hashes) > 1:
        raise MaskSSDError(
            f"fold files of different folds (digests {', '.join(sorted(hashes))}): one cross-validation's folds "
            "are made with the same data.folds and data.fold_seed on the same images"
        )
    for (_, seed), members in groups.items():
        members = sorted(members, key=lambda d: int(d["data"]["fold"]))
        folds = [int(d["data"]["fold"]) for d in members]
        twice = sorted({k for k in folds if folds.count(k) > 1})
        if twice:
            raise MaskSSDError(
                f"fold {twice[0]} given twice" + (f" for seed {seed}" if seed is not None else "")
            )
        first = members[0]
        for d in members[1:]:
            if list(d["classes"]) != list(first["classes"]):
                raise MaskSSDError(f"{d.get('path')}: classes {d['classes']} differ from {first['classes']}")
        data = {k: v for k, v in first["data"].items() if k not in ("fold", "split")}
        out.append(
            {
                "format": max(d.get("format", FORMAT) for d in members),
                "classes": list(first["classes"]),
                "images": [im for d in members for im in d["images"]],
                "settings": {**first.get("settings", {}), "split": "oof"},
                "data": {**data, "splits": ["train", "val"], "folds_present": folds},
                "path": ", ".join(str(d.get("path") or d.get("ref")) for d in members),
                "ref": ",".join(str(d.get("ref") or d.get("path")) for d in members),
            }
        )
    return out


def restrict(doc: Mapping[str, Any], ids: set[str]) -> dict[str, Any]:
    """``doc`` on the images ``ids`` only (in its own order): a part of an out-of-fold set."""
    return {**doc, "images": [im for im in doc["images"] if im["id"] in ids]}


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
    read = torch.float32 if doc.get("format", EXACT) >= 3 else torch.float64  # shortest float32 decimals
    for im in doc["images"]:
        ann = by_id[im["id"]]
        if (ann.width, ann.height) != (im["width"], im["height"]):
            raise MaskSSDError(
                f"{where}: image {im['id']!r} is {im['width']}x{im['height']} in the file but "
                f"{ann.width}x{ann.height} in the dataset"
            )
        dets = im["detections"]
        det = Detections(
            torch.tensor([d["box"] for d in dets], dtype=read).double().reshape(-1, 4),
            torch.tensor([index[d["label"]] for d in dets], dtype=torch.long),
            torch.tensor([d["score"] for d in dets], dtype=read).double(),
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
