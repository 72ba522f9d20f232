"""Error analysis a researcher can act on: AP and recall by face size, recall and false boxes at the operating
threshold, the confusion matrix there, and the images with the most errors (:func:`analyse`).

Conventions
-----------
* **Face size** is the box's *shorter side* in original pixels (as ``maskssd data stats`` counts boxes), in
  buckets ``< 16``, ``16-32``, ``32-64`` and ``>= 64`` px (:data:`SIZE_BUCKETS`).
* **AP by size** (COCO's "area range" idea on the paper's VOC07 protocol): in bucket *b*, objects of other
  buckets are ignored like difficult ones; a detection belongs to the bucket of the object it matches (its
  best-IoU object of its class above the IoU threshold, so duplicates count as false positives where their
  object is), and a detection that matches no object belongs to the bucket of its own size. Every candidate
  of an object shares its bucket, so the set's one matching (:class:`~maskssd.evaluation.voc.Matched`) gives
  each bucket's true positives: nothing is matched again.
* **Operating threshold**: detections scoring at least ``threshold``
  (:data:`~maskssd.evaluation.metrics.OPERATING_THRESHOLD`, the display threshold) are what a user sees. Recall there is the share of non-difficult objects found by a true positive above it (the same
  matching as AP: the TP status of a detection does not depend on lower-scoring ones); false boxes are the
  detections above it that are neither true positives nor matched to a difficult object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskssd.data.images import load_image
from maskssd.data.voc import Annotation
from maskssd.evaluation._common import nanmean
from maskssd.evaluation.metrics import OPERATING_THRESHOLD
from maskssd.evaluation.voc import Matched, ap_from_curve, curve
from maskssd.ssd.postprocess import Detections

__all__ = ["SIZE_BUCKETS", "SIZE_EDGES", "ErrorAnalysis", "analyse", "render_worst", "size_bucket"]

#: Bucket edges on the shorter box side, in original pixels.
SIZE_EDGES: tuple[float, ...] = (16.0, 32.0, 64.0)
#: ``(key, label)`` of each bucket; keys name metrics (``val_map_size_lt16``).
SIZE_BUCKETS: tuple[tuple[str, str], ...] = (
    ("lt16", "< 16 px"),
    ("16_32", "16-32 px"),
    ("32_64", "32-64 px"),
    ("ge64", ">= 64 px"),
)


def size_bucket(boxes: Tensor) -> Tensor:
    """Bucket index (into :data:`SIZE_BUCKETS`) of each ``xyxy`` pixel box, by its shorter side."""
    b = torch.as_tensor(boxes).reshape(-1, 4).double()
    side = torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    return torch.bucketize(side, torch.tensor(SIZE_EDGES, dtype=torch.float64), right=True)


@dataclass
class ErrorAnalysis:
    """What :func:`analyse` finds. Dicts are keyed by class name, then by bucket key (and ``"all"``)."""

    class_names: tuple[str, ...]
    threshold: float
    n_gt: dict[str, dict[str, int]]
    ap: dict[str, dict[str, float]]  # VOC07 by size bucket
    map_by_size: dict[str, float]
    recall: dict[str, dict[str, float]]  # at the operating threshold; "all" classes too
    detections: dict[str, dict[str, int]]  # above the threshold: "above", "tp", "false"
    confusion: Tensor  # (C + 1, C + 1) at the operating threshold, row = true class, 0 = background
    images: list[dict[str, Any]] = field(default_factory=list)  # per image: id, index, missed, false
    size_measure: str = "shorter box side, original pixels"

    def worst(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` images with the most errors (missed + false boxes) at the threshold, worst first."""
        ranked = sorted(self.images, key=lambda r: (-(r["missed"] + r["false"]), r["index"]))
        return [r for r in ranked if r["missed"] + r["false"] > 0][:k]

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """A few numbers per run: mAP by size, recall at the threshold (all classes and each)."""
        out = {f"{prefix}_map_size_{k}": v for k, v in self.map_by_size.items()}
        out[f"{prefix}_recall_op"] = self.recall["all"]["all"]
        out.update({f"{prefix}_recall_op_{c}": self.recall[c]["all"] for c in self.class_names})
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def to_dict(self, worst: int = 20) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "size_measure": self.size_measure,
            "size_buckets": [
                {"key": k, "label": label, "min": lo, "max": hi}
                for (k, label), lo, hi in zip(SIZE_BUCKETS, (0.0, *SIZE_EDGES), (*SIZE_EDGES, math.inf))
            ],
            "n_gt": self.n_gt,
            "ap_by_size": self.ap,
            "map_by_size": self.map_by_size,
            "recall_at_threshold": self.recall,
            "detections_at_threshold": self.detections,
            "confusion_at_threshold": {
                "labels": ["background", *self.class_names],
                "rows_true_columns_predicted": self.confusion.tolist(),
            },
            "worst_images": self.worst(worst),
        }


def _owner_bucket(matched: Matched, gt_bucket: Tensor) -> Tensor:
    """Each detection's bucket: its matched object's, else its own size's."""
    own = size_bucket(matched.evalset.flat.det_boxes)
    if gt_bucket.numel() == 0:
        return own
    return torch.where(matched.det_object >= 0, gt_bucket[matched.det_object.clamp(min=0)], own)


def _ap_by_size(matched: Matched, owner: Tensor, gt_bucket: Tensor) -> list[dict[str, float]]:
    """VOC07 AP per class in each size bucket (objects of other buckets ignored like difficult ones)."""
    f = matched.evalset.flat
    counted = ~f.gt_difficult
    out = []
    for b in range(len(SIZE_BUCKETS)):
        ap = {}
        for c, m in enumerate(matched.classes, start=1):
            keep = owner[m.det] == b
            n_gt = int((counted & (f.gt_labels == c) & (gt_bucket == b)).sum())
            precision, recall = curve(m.tp[keep], n_gt)
            ap[m.name] = ap_from_curve(precision, recall, n_gt, "voc07")
        out.append(ap)
    return out


def _slots(image: Tensor, n_images: int) -> Tensor:
    """Each flat entry's position within its image (``image`` sorted ascending)."""
    counts = torch.bincount(image, minlength=n_images)
    return torch.arange(image.shape[0]) - (torch.cumsum(counts, 0) - counts)[image]


def _recall_tables(
    matched: Matched, gt_bucket: Tensor, threshold: float
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]], dict[str, dict[str, int]], list[dict]]:
    """Objects per class and bucket, recall at the threshold, detections above it, and errors per image."""
    es, f = matched.evalset, matched.evalset.flat
    class_names, n_images = es.class_names, len(es)
    keys = [k for k, _ in SIZE_BUCKETS]
    n_cls, n_b = len(class_names), len(keys)
    counted = ~f.gt_difficult & (f.gt_labels >= 1) & (f.gt_labels <= n_cls)
    valid = (f.det_labels >= 1) & (f.det_labels <= n_cls)
    above = (f.det_scores >= threshold) & valid
    hit_tp = above & matched.det_tp
    got = torch.zeros(f.gt_labels.shape[0], dtype=torch.bool)
    got[matched.det_object[hit_tp]] = True
    false = above & ~matched.det_tp & ~matched.det_ignored
    total = torch.zeros((n_cls + 1, n_b), dtype=torch.long)  # row n_cls: every class
    found = torch.zeros((n_cls + 1, n_b), dtype=torch.long)
    for row, mask in ((f.gt_labels - 1, counted), (torch.full_like(f.gt_labels, n_cls), counted)):
        total.index_put_((row[mask], gt_bucket[mask]), torch.ones_like(row[mask]), accumulate=True)
        ok = mask & got
        found.index_put_((row[ok], gt_bucket[ok]), torch.ones_like(row[ok]), accumulate=True)
    dets = torch.stack(
        [torch.bincount(f.det_labels[m] - 1, minlength=n_cls)[:n_cls] for m in (above, hit_tp, false)], 1
    )
    missed = counted & ~got
    gt_slot, det_slot = _slots(f.gt_image, n_images), _slots(f.det_image, n_images)
    images = []
    for i in range(n_images):
        miss = gt_slot[missed & (f.gt_image == i)]
        fp = det_slot[false & (f.det_image == i)]
        images.append(
            {
                "index": i,
                "missed": int(miss.numel()),
                "false": int(fp.numel()),
                "missed_objects": miss.tolist(),
                "false_detections": fp.tolist(),
            }
        )
    names = [*class_names, "all"]
    n_gt = {c: {k: int(total[r, b]) for b, k in enumerate(keys)} for r, c in enumerate(names)}
    recall = {}
    for r, c in enumerate(names):
        t, fd = total[r], found[r]
        recall[c] = {k: float(fd[b] / t[b]) if t[b] else math.nan for b, k in enumerate(keys)}
        recall[c]["all"] = float(fd.sum() / t.sum()) if t.sum() else math.nan
        n_gt[c]["all"] = int(t.sum())
    detections = {c: dict(zip(("above", "tp", "false"), dets[r].tolist())) for r, c in enumerate(class_names)}
    return n_gt, recall, detections, images


def analyse(matched: Matched, *, threshold: float = OPERATING_THRESHOLD) -> ErrorAnalysis:
    """AP by size, recall and false boxes at ``threshold``, the confusion matrix there and errors per image
    (see the module docstring for the conventions), from the set's one matching (original pixels)."""
    es = matched.evalset
    gt_bucket = size_bucket(es.flat.gt_boxes)
    by_size = _ap_by_size(matched, _owner_bucket(matched, gt_bucket), gt_bucket)
    keys = [k for k, _ in SIZE_BUCKETS]
    ap = {c: {k: r[c] for k, r in zip(keys, by_size)} for c in es.class_names}
    map_by_size = {k: nanmean(list(r.values())) for k, r in zip(keys, by_size)}
    n_gt, recall, detections, images = _recall_tables(matched, gt_bucket, threshold)
    for row in images:
        row["id"] = es.image_ids[row["index"]]
    return ErrorAnalysis(
        es.class_names,
        threshold,
        n_gt,
        ap,
        map_by_size,
        recall,
        detections,
        matched.confusion(threshold),
        images,
    )


def render_worst(
    analysis: ErrorAnalysis,
    annotations: Sequence[Annotation],
    detections: Sequence[Detections],
    out_dir: str | Path,
    k: int = 8,
) -> list[Path]:
    """Draw the ``k`` images with the most errors at the threshold (:meth:`ErrorAnalysis.worst`): detections
    above it, false ones marked ``FP``, missed objects in magenta. ``annotations`` and ``detections`` are in the
    order the analysis was run on. Returns the PNG paths, worst first."""
    from maskssd.evaluation.drawing import draw_review

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, row in enumerate(analysis.worst(k), start=1):
        ann, dets = annotations[row["index"]], detections[row["index"]]
        missed = row["missed_objects"]
        img = draw_review(
            load_image(ann.image_path),
            dets,
            analysis.class_names,
            min_score=analysis.threshold,
            false_detections=row["false_detections"],
            missed_boxes=ann.boxes[missed].tolist(),
            missed_labels=ann.labels[missed].tolist(),
            text=f"#{rank} {ann.image_id}: {row['missed']} missed, {row['false']} false "
            f"(score >= {analysis.threshold:g})",
        )
        path = out / f"{rank:02d}_{ann.image_id}.png"
        img.save(path)
        paths.append(path)
    return paths
