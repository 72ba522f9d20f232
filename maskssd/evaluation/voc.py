"""VOC average precision (the paper's protocol: VOC07 11-point, IoU > 0.5, difficult ignored), batched, and the
one matching every metric is computed from (:func:`match` -> :class:`Matched`).

Inputs are :class:`~maskssd.evaluation.records.EvalSet` records (per image: detections, ground truth, id, size);
their conventions are in :mod:`maskssd.evaluation.records`. IoU is continuous (no ``+1`` pixel).

The VOC protocol is exactly the one of the public "a-PyTorch-Tutorial-to-Object-Detection"
``calculate_mAP`` (the paper's numbers), computed with batched tensor ops instead of a Python loop
over detections: the ground-truth object a detection is compared with (its arg-max IoU) does not depend
on which objects were already detected, so a detection is a true positive iff it is the *first* one, in
score order, to pick a given non-difficult object with IoU strictly above the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from maskssd.evaluation._common import aligned_iou, nanmean, slots
from maskssd.evaluation.confusion import confusion_matrix
from maskssd.evaluation.records import EvalSet

__all__ = [
    "APMethod",
    "APResult",
    "ClassMatches",
    "Matched",
    "ap_from_curve",
    "average_precision",
    "match",
    "pr_curves",
    "voc_ap",
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Match one class's score-sorted detections to its objects (tutorial protocol, batched).

    Returns ``(tp, counted, best)``: ``tp`` marks true positives; ``counted`` is False for detections whose
    best object is difficult (ignored: neither TP nor FP); ``best`` is the object (index into this class's
    objects) each detection matched with IoU above the threshold, -1 for none.
    """
    n_det = det_boxes.shape[0]
    slot, max_gt = slots(gt_image, n_images)
    if max_gt == 0 or n_det == 0:
        none = torch.full((n_det,), -1, dtype=torch.long)
        return torch.zeros(n_det, dtype=torch.bool), torch.ones(n_det, dtype=torch.bool), none
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
    return tp, ~ignored, torch.where(hit, best_gt, -1)


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
    det: Tensor  # (k,) each detection's index in the set's flat detections

    @property
    def n_gt(self) -> int:
        return int(self.gt_per_image.sum())


@dataclass
class Matched:
    """One evaluation set matched once (per IoU threshold): per class, its counted detections in score order
    (:class:`ClassMatches`, what AP, the bootstrap and the operating thresholds need), and per detection of the
    set's flat list (:attr:`EvalSet.flat`) the object it matched, whether it is a true positive and whether it
    is ignored (what the error analysis needs). The confusion matrix at a score threshold is computed once per
    threshold and kept (:meth:`confusion`)."""

    evalset: EvalSet
    iou_threshold: float
    classes: list[ClassMatches]
    det_object: Tensor  # (D,) flat index of the matched object (IoU above the threshold), -1: none
    det_tp: Tensor  # (D,) bool
    det_ignored: Tensor  # (D,) bool: its best object is difficult
    _confusion: dict[float, Tensor] = field(default_factory=dict, repr=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.evalset.class_names

    def by_name(self) -> dict[str, ClassMatches]:
        return {m.name: m for m in self.classes}

    def confusion(self, score_threshold: float) -> Tensor:
        """The ``(C + 1, C + 1)`` confusion matrix of the detections scoring ``>= score_threshold``
        (:func:`maskssd.evaluation.confusion.confusion_matrix`), computed once per threshold."""
        key = float(score_threshold)
        if key not in self._confusion:
            self._confusion[key] = confusion_matrix(
                self.evalset, score_threshold=key, iou_threshold=self.iou_threshold
            )
        return self._confusion[key]


def match(evalset: EvalSet, iou_threshold: float = 0.5) -> Matched:
    """Match every class's detections to the ground truth once (the tutorial's protocol, batched)."""
    f = evalset.flat
    n_images = len(evalset)
    n_det = f.det_labels.shape[0]
    det_object = torch.full((n_det,), -1, dtype=torch.long)
    det_tp = torch.zeros(n_det, dtype=torch.bool)
    det_ignored = torch.zeros(n_det, dtype=torch.bool)
    out = []
    for c, name in enumerate(evalset.class_names, start=1):
        g_idx = torch.nonzero(f.gt_labels == c).squeeze(1)
        d = torch.nonzero(f.det_labels == c).squeeze(1)
        # Stable sort: ties keep input order (image order, then order within the image).
        order = d[torch.sort(f.det_scores[d], descending=True, stable=True).indices]
        tp, counted, best = _match_class(
            f.det_boxes[order],
            f.det_image[order],
            f.gt_boxes[g_idx],
            f.gt_image[g_idx],
            f.gt_difficult[g_idx],
            n_images,
            iou_threshold,
        )
        det_object[order] = torch.where(best >= 0, g_idx[best.clamp(min=0)] if g_idx.numel() else best, -1)
        det_tp[order], det_ignored[order] = tp, ~counted
        kept = order[counted]
        g = f.gt_labels == c
        per_image = torch.bincount(f.gt_image[g & ~f.gt_difficult], minlength=n_images)
        out.append(ClassMatches(name, f.det_scores[kept], f.det_image[kept], tp[counted], per_image, kept))
    return Matched(evalset, iou_threshold, out, det_object, det_tp, det_ignored)


def pr_curves(
    matched: Matched, classes: list[ClassMatches] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """Cumulative precision/recall curves (float64, score order, ignored detections dropped) per class."""
    precision: dict[str, Tensor] = {}
    recall: dict[str, Tensor] = {}
    n_gt: dict[str, int] = {}
    for m in matched.classes if classes is None else classes:
        precision[m.name], recall[m.name] = curve(m.tp, m.n_gt)
        n_gt[m.name] = m.n_gt
    return precision, recall, n_gt


def curve(tp: Tensor, n_gt: int) -> tuple[Tensor, Tensor]:
    """Cumulative precision and recall of score-sorted true-positive flags against ``n_gt`` objects."""
    tp = tp.double()
    cum_tp = torch.cumsum(tp, 0)
    cum_fp = torch.cumsum(1.0 - tp, 0)
    precision = cum_tp / (cum_tp + cum_fp + 1e-10)
    recall = cum_tp / n_gt if n_gt > 0 else torch.full_like(cum_tp, math.nan)
    return precision, recall


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


def voc_ap(matched: Matched, method: APMethod = "voc07") -> APResult:
    """VOC average precision per class and mAP, exactly as the paper's protocol (see the module docstring).

    ``method="voc07"`` is the 11-point interpolation the paper reports; ``"voc12"`` is all-point.
    A class without non-difficult ground truth gets AP nan and is left out of the mean.
    """
    if method not in ("voc07", "voc12"):
        raise ValueError(f"unknown AP method {method!r} (expected 'voc07' or 'voc12')")
    precision, recall, n_gt = pr_curves(matched)
    names = matched.class_names
    ap = {name: ap_from_curve(precision[name], recall[name], n_gt[name], method) for name in names}
    return APResult(ap=ap, map=nanmean(list(ap.values())), precision=precision, recall=recall, n_gt=n_gt)


def average_precision(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor] | None,
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    method: APMethod = "voc07",
) -> APResult:
    """:func:`voc_ap` of six parallel per-image lists: the tutorial's ``calculate_mAP`` shape, which the oracle
    tests compare against."""
    if method not in ("voc07", "voc12"):
        raise ValueError(f"unknown AP method {method!r} (expected 'voc07' or 'voc12')")
    evalset = EvalSet.from_lists(
        det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult, class_names
    )
    return voc_ap(match(evalset, iou_threshold), method)
