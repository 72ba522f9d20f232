"""Error analysis a researcher can act on: AP and recall by face size, recall and false boxes at the operating
threshold, the confusion matrix there, and the images with the most errors (:func:`analyse`).

Conventions
-----------
* **Face size** is the box's *shorter side* in original pixels (as ``maskssd data stats`` counts boxes), in
  buckets ``< 16``, ``16-32``, ``32-64`` and ``>= 64`` px (:data:`SIZE_BUCKETS`).
* **AP by size** (COCO's "area range" idea on the paper's VOC07 protocol): in bucket *b*, objects of other
  buckets are ignored like difficult ones; a detection belongs to the bucket of the object it matches (its
  best-IoU object of its class above the IoU threshold, so duplicates count as false positives where their
  object is), and a detection that matches no object belongs to the bucket of its own size.
* **Operating threshold**: detections scoring at least ``threshold`` (the display threshold, 0.4) are what a
  user sees. Recall there is the share of non-difficult objects found by a true positive above it (the same
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
from maskssd.evaluation._common import aligned_iou, check_lengths, nanmean
from maskssd.evaluation.confusion import confusion_matrix
from maskssd.evaluation.voc import average_precision
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD
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


@dataclass
class _Matches:
    """Per image: each detection's matched object (-1: none above the IoU threshold), TP flag, ignored flag."""

    best_gt: list[Tensor]
    tp: list[Tensor]
    ignored: list[Tensor]


def _match_images(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor],
    iou_threshold: float,
) -> _Matches:
    """The VOC matching of :mod:`.voc`, image by image, keeping which object each detection matched."""
    out = _Matches([], [], [])
    for db, dl, ds, gb, gl, gd in zip(det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult):
        db, dl, ds = (
            torch.as_tensor(db).reshape(-1, 4).double(),
            torch.as_tensor(dl).long(),
            torch.as_tensor(ds),
        )
        gb, gl, gd = (
            torch.as_tensor(gb).reshape(-1, 4).double(),
            torch.as_tensor(gl).long(),
            torch.as_tensor(gd),
        )
        n = db.shape[0]
        best, tp, ignored = (
            torch.full((n,), -1),
            torch.zeros(n, dtype=torch.bool),
            torch.zeros(n, dtype=torch.bool),
        )
        for c in torch.unique(dl).tolist():
            d = torch.nonzero(dl == c).squeeze(1)
            d = d[torch.sort(ds[d], descending=True, stable=True).indices]
            g = torch.nonzero(gl == c).squeeze(1)
            if g.numel() == 0 or d.numel() == 0:
                continue
            value, arg = aligned_iou(db[d][:, None, :], gb[g][None, :, :]).max(dim=1)
            hit = value > iou_threshold
            obj = g[arg]
            best[d[hit]] = obj[hit]
            ign = hit & gd[obj].bool()
            ignored[d] = ign
            taken = torch.zeros(gb.shape[0], dtype=torch.bool)
            for k in torch.nonzero(hit & ~ign).squeeze(1).tolist():  # score order: the first one takes it
                if not taken[obj[k]]:
                    taken[obj[k]] = True
                    tp[d[k]] = True
        out.best_gt.append(best)
        out.tp.append(tp)
        out.ignored.append(ignored)
    return out


def _ap_by_size(data: tuple[Sequence[Tensor], ...], m: _Matches, class_names: Sequence[str]) -> list[Any]:
    """VOC07 AP per class in each size bucket (objects of other buckets ignored like difficult ones)."""
    det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult = data
    det_bucket = [size_bucket(b) for b in det_boxes]
    gt_bucket = [size_bucket(b) for b in gt_boxes]
    out = []
    for b in range(len(SIZE_BUCKETS)):
        keep = []
        for i, best in enumerate(m.best_gt):
            owner = torch.where(best >= 0, gt_bucket[i][best.clamp(min=0)], det_bucket[i])
            keep.append(owner == b)
        other = [torch.as_tensor(d).bool() | (g != b) for d, g in zip(gt_difficult, gt_bucket)]
        out.append(
            average_precision(
                [torch.as_tensor(x)[k] for x, k in zip(det_boxes, keep)],
                [torch.as_tensor(x)[k] for x, k in zip(det_labels, keep)],
                [torch.as_tensor(x)[k] for x, k in zip(det_scores, keep)],
                gt_boxes,
                gt_labels,
                other,
                class_names,
            )
        )
    return out


def _recall_tables(
    data: tuple[Sequence[Tensor], ...], m: _Matches, class_names: Sequence[str], threshold: float
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]], dict[str, dict[str, int]], list[dict]]:
    """Objects per class and bucket, recall at the threshold, detections above it, and errors per image."""
    det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult = data
    keys = [k for k, _ in SIZE_BUCKETS]
    n_cls, n_b = len(class_names), len(keys)
    total = torch.zeros((n_cls + 1, n_b), dtype=torch.long)  # row n_cls: every class
    found = torch.zeros((n_cls + 1, n_b), dtype=torch.long)
    dets = torch.zeros((n_cls, 3), dtype=torch.long)  # above, tp, false
    images = []
    for i in range(len(det_boxes)):
        gl, gd = torch.as_tensor(gt_labels[i]).long(), torch.as_tensor(gt_difficult[i]).bool()
        counted = (~gd) & (gl >= 1) & (gl <= n_cls)
        above = torch.as_tensor(det_scores[i]) >= threshold
        dl = torch.as_tensor(det_labels[i]).long()
        hit_tp = above & m.tp[i]
        got = torch.zeros(gl.shape[0], dtype=torch.bool)
        got[m.best_gt[i][hit_tp]] = True
        bucket = size_bucket(gt_boxes[i])
        for row, mask in ((gl - 1, counted), (torch.full_like(gl, n_cls), counted)):
            total.index_put_((row[mask], bucket[mask]), torch.ones_like(row[mask]), accumulate=True)
            ok = mask & got
            found.index_put_((row[ok], bucket[ok]), torch.ones_like(row[ok]), accumulate=True)
        false = above & ~m.tp[i] & ~m.ignored[i] & (dl >= 1) & (dl <= n_cls)
        for col, mask in enumerate((above & (dl >= 1) & (dl <= n_cls), hit_tp, false)):
            dets[:, col] += torch.bincount(dl[mask] - 1, minlength=n_cls)[:n_cls]
        missed = torch.nonzero(counted & ~got).squeeze(1)
        images.append(
            {
                "index": i,
                "missed": int(missed.numel()),
                "false": int(false.sum()),
                "missed_objects": missed.tolist(),
                "false_detections": torch.nonzero(false).squeeze(1).tolist(),
            }
        )
    names = [*class_names, "all"]
    n_gt = {c: {k: int(total[r, b]) for b, k in enumerate(keys)} for r, c in enumerate(names)}
    recall = {}
    for r, c in enumerate(names):
        t, f = total[r], found[r]
        recall[c] = {k: float(f[b] / t[b]) if t[b] else math.nan for b, k in enumerate(keys)}
        recall[c]["all"] = float(f.sum() / t.sum()) if t.sum() else math.nan
        n_gt[c]["all"] = int(t.sum())
    detections = {c: dict(zip(("above", "tp", "false"), dets[r].tolist())) for r, c in enumerate(class_names)}
    return n_gt, recall, detections, images


def analyse(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor],
    class_names: Sequence[str],
    *,
    image_ids: Sequence[str] | None = None,
    threshold: float = DISPLAY_THRESHOLD,
    iou_threshold: float = 0.5,
) -> ErrorAnalysis:
    """AP by size, recall and false boxes at ``threshold``, the confusion matrix there and errors per image
    (see the module docstring for the conventions); inputs are per-image lists in original pixels."""
    n = check_lengths(
        det_boxes=det_boxes,
        det_labels=det_labels,
        det_scores=det_scores,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_difficult=gt_difficult,
    )
    data = (det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult)
    m = _match_images(*data, iou_threshold)
    by_size = _ap_by_size(data, m, class_names)
    keys = [k for k, _ in SIZE_BUCKETS]
    ap = {c: {k: r.ap[c] for k, r in zip(keys, by_size)} for c in class_names}
    map_by_size = {k: nanmean(list(r.ap.values())) for k, r in zip(keys, by_size)}
    n_gt, recall, detections, images = _recall_tables(data, m, class_names, threshold)
    ids = list(image_ids) if image_ids is not None else [str(i) for i in range(n)]
    for row in images:
        row["id"] = ids[row["index"]]
    confusion = confusion_matrix(
        det_boxes,
        det_labels,
        det_scores,
        gt_boxes,
        gt_labels,
        class_names,
        score_threshold=threshold,
        iou_threshold=iou_threshold,
    )
    return ErrorAnalysis(
        tuple(class_names), threshold, n_gt, ap, map_by_size, recall, detections, confusion, images
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
