"""VOC average precision (the paper's protocol: VOC07 11-point, IoU > 0.5, difficult ignored), batched.

Conventions
-----------
* Inputs are lists with **one entry per image**: boxes ``(n, 4)`` ``xyxy``, labels ``(n,)`` ints,
  scores ``(n,)`` and difficult flags ``(n,)``. Detections and ground truth must use the same
  coordinate system (pixels or normalised); IoU is continuous (no ``+1`` pixel).
* Labels are 1-based indices into ``class_names``; 0 is background. Labels outside ``1..C`` are ignored.
* Everything per class is keyed by class **name**.

The VOC protocol is exactly the one of the public "a-PyTorch-Tutorial-to-Object-Detection"
``calculate_mAP`` (the paper's numbers), computed with batched tensor ops instead of a Python loop
over detections: the ground-truth object a detection is compared with (its arg-max IoU) does not depend
on which objects were already detected, so a detection is a true positive iff it is the *first* one, in
score order, to pick a given non-difficult object with IoU strictly above the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from maskssd.evaluation._common import aligned_iou, check_lengths, flatten, nanmean, slots

__all__ = [
    "APMethod",
    "APResult",
    "ClassMatches",
    "ap_from_curve",
    "average_precision",
    "match_classes",
    "pr_curves",
]

APMethod = Literal["voc07", "voc12"]

#: Upper bound on ``detections x max objects per image`` IoU entries materialised at once (memory guard).
_IOU_CHUNK_ELEMENTS = 1 << 22


@dataclass
class APResult:
    """VOC average precision per class, the mean over classes with ground truth, and the PR curves."""

    ap: dict[str, float]
    map: float
    precision: dict[str, Tensor]
    recall: dict[str, Tensor]
    n_gt: dict[str, int]


def _match_class(
    det_boxes: Tensor,
    det_image: Tensor,
    gt_boxes: Tensor,
    gt_image: Tensor,
    gt_difficult: Tensor,
    n_images: int,
    iou_threshold: float,
) -> tuple[Tensor, Tensor]:
    """Match one class's score-sorted detections to its objects (tutorial protocol, batched).

    Returns ``(tp, counted)``: ``tp`` marks true positives; ``counted`` is False for detections whose
    best object is difficult (ignored: neither TP nor FP).
    """
    n_det = det_boxes.shape[0]
    slot, max_gt = slots(gt_image, n_images)
    if max_gt == 0 or n_det == 0:
        return torch.zeros(n_det, dtype=torch.bool), torch.ones(n_det, dtype=torch.bool)
    # table[i, j] = index (in this class's object list) of the j-th object of image i, -1 = padding.
    table = torch.full((n_images, max_gt), -1, dtype=torch.long)
    table[gt_image, slot] = torch.arange(gt_boxes.shape[0])

    best_iou = torch.empty(n_det, dtype=torch.float64)
    best_gt = torch.empty(n_det, dtype=torch.long)
    step = max(1, _IOU_CHUNK_ELEMENTS // max_gt)
    for start in range(0, n_det, step):  # chunks bound memory; one chunk in ordinary use
        cand = table[det_image[start : start + step]]  # (d, max_gt)
        iou = aligned_iou(det_boxes[start : start + step, None, :], gt_boxes[cand.clamp(min=0)])
        iou = iou.masked_fill(cand < 0, -1.0)  # padding never wins; a real object has IoU >= 0
        value, arg = iou.max(dim=1)  # first maximum on ties, like the tutorial's torch.max
        best_iou[start : start + step] = value
        best_gt[start : start + step] = cand.gather(1, arg[:, None]).squeeze(1)

    hit = best_iou > iou_threshold  # strictly greater; no object in the image gives -1
    gt_idx = best_gt.clamp(min=0)
    ignored = hit & gt_difficult[gt_idx]
    candidate = hit & ~ignored
    # The first candidate (in score order) of each object is the TP; later ones are duplicates (FP).
    order = torch.arange(n_det)
    first = torch.full((gt_boxes.shape[0],), n_det, dtype=torch.long)
    first = first.scatter_reduce(0, gt_idx[candidate], order[candidate], reduce="amin")
    tp = candidate & (first[gt_idx] == order)
    return tp, ~ignored


@dataclass
class ClassMatches:
    """One class's detections in score order (ties in input order), those matched to a difficult object
    dropped: each one's score and image and whether it is a true positive; and the class's non-difficult
    objects per image. What AP, the bootstrap and the operating thresholds are computed from."""

    name: str
    scores: Tensor  # (k,)
    image: Tensor  # (k,) image index
    tp: Tensor  # (k,) bool
    gt_per_image: Tensor  # (n_images,) non-difficult objects

    @property
    def n_gt(self) -> int:
        return int(self.gt_per_image.sum())


def match_classes(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor] | None,
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> list[ClassMatches]:
    """Match every class's detections once (the tutorial's protocol, batched); per-image input lists."""
    if gt_difficult is None:
        gt_difficult = [
            torch.zeros(torch.as_tensor(b).reshape(-1, 4).shape[0], dtype=torch.bool) for b in gt_boxes
        ]
    n_images = check_lengths(
        det_boxes=det_boxes,
        det_labels=det_labels,
        det_scores=det_scores,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_difficult=gt_difficult,
    )
    d_boxes, d_image, (d_labels, d_scores) = flatten(det_boxes, det_labels, det_scores)
    g_boxes, g_image, (g_labels, g_difficult) = flatten(gt_boxes, gt_labels, gt_difficult)
    d_labels, g_labels, g_difficult = d_labels.long(), g_labels.long(), g_difficult.bool()
    out = []
    for c, name in enumerate(class_names, start=1):
        g = g_labels == c
        d = torch.nonzero(d_labels == c).squeeze(1)
        # Stable sort: ties keep input order (image order, then order within the image).
        order = d[torch.sort(d_scores[d], descending=True, stable=True).indices]
        tp, counted = _match_class(
            d_boxes[order], d_image[order], g_boxes[g], g_image[g], g_difficult[g], n_images, iou_threshold
        )
        kept = order[counted]
        per_image = torch.bincount(g_image[g & ~g_difficult], minlength=n_images)
        out.append(ClassMatches(name, d_scores[kept], d_image[kept], tp[counted], per_image))
    return out


def pr_curves(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor] | None,
    class_names: Sequence[str],
    iou_threshold: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """Cumulative precision/recall curves (float64, score order, ignored detections dropped) per class."""
    precision: dict[str, Tensor] = {}
    recall: dict[str, Tensor] = {}
    n_gt: dict[str, int] = {}
    matches = match_classes(
        det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult, class_names, iou_threshold
    )
    for m in matches:
        tp = m.tp.double()
        cum_tp = torch.cumsum(tp, 0)
        cum_fp = torch.cumsum(1.0 - tp, 0)
        precision[m.name] = cum_tp / (cum_tp + cum_fp + 1e-10)
        recall[m.name] = cum_tp / m.n_gt if m.n_gt > 0 else torch.full_like(cum_tp, math.nan)
        n_gt[m.name] = m.n_gt
    return precision, recall, n_gt


def ap_from_curve(precision: Tensor, recall: Tensor, n_gt: int, method: APMethod) -> float:
    """AP of one class from its cumulative curves: nan without ground truth, 0 without detections."""
    if n_gt == 0:
        return math.nan
    n = precision.shape[0]
    if n == 0:
        return 0.0
    if method == "voc07":
        # Mean over t in {0, .1, ..., 1} of the max precision at recall >= t. t = i / 10 and recall = k / n
        # are both correctly rounded, so the comparison is exact (0.1 * 3 would not be).
        envelope = precision.flip(0).cummax(0).values.flip(0)  # envelope[i] = max(precision[i:])
        thresholds = torch.arange(11, dtype=torch.float64) / 10
        first = torch.searchsorted(recall.contiguous(), thresholds, side="left")  # first recall >= t
        values = torch.where(first < n, envelope[first.clamp(max=n - 1)], 0.0)
        return float(values.sum() / 11)
    if method == "voc12":
        # VOC2010+ devkit: sentinels, monotone precision envelope, area under the step curve.
        zero, one = precision.new_zeros(1), precision.new_ones(1)
        mrec = torch.cat([zero, recall, one])
        mpre = torch.cat([zero, precision, zero]).flip(0).cummax(0).values.flip(0)
        return float(((mrec[1:] - mrec[:-1]) * mpre[1:]).sum())
    raise ValueError(f"unknown AP method {method!r} (expected 'voc07' or 'voc12')")


def average_precision(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    method: APMethod = "voc07",
) -> APResult:
    """VOC average precision per class and mAP, exactly as the paper's protocol (see the module docstring).

    ``method="voc07"`` is the 11-point interpolation the paper reports; ``"voc12"`` is all-point.
    A class without non-difficult ground truth gets AP nan and is left out of the mean.
    """
    if method not in ("voc07", "voc12"):
        raise ValueError(f"unknown AP method {method!r} (expected 'voc07' or 'voc12')")
    precision, recall, n_gt = pr_curves(
        det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult, class_names, iou_threshold
    )
    ap = {name: ap_from_curve(precision[name], recall[name], n_gt[name], method) for name in class_names}
    return APResult(ap=ap, map=nanmean(list(ap.values())), precision=precision, recall=recall, n_gt=n_gt)
