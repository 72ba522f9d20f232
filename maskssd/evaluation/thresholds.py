"""Per-class operating thresholds: the score above which a detection is shown, chosen per class on the
validation split to maximise F1 at IoU > 0.5 (the paper's matching, :mod:`maskssd.evaluation.voc`).

AP integrates over every threshold; a deployed detector shows the detections above one. With 80/17/3 class
imbalance one threshold for all classes is wrong for most of them: the rare class needs a lower one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from maskssd.evaluation.voc import match_classes

__all__ = ["ThresholdFit", "fit_f1_thresholds", "fit_on_annotations", "thresholds_of"]


@dataclass(frozen=True)
class ThresholdFit:
    """One class's operating point: keep detections scoring ``>= threshold``."""

    threshold: float
    f1: float
    precision: float
    recall: float
    n_gt: int
    n_detections: int  # counted (not ignored) detections at or above the threshold


def fit_f1_thresholds(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor] | None,
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> dict[str, ThresholdFit]:
    """Per class, the score threshold maximising F1 (lists with one entry per image, as for AP).

    Detections are matched as for VOC AP (a detection is a true positive iff it is the first, in score order,
    to pick a non-difficult object with IoU > ``iou_threshold``; ones whose best object is difficult are
    ignored). Only cuts between distinct scores are considered (equal scores are kept or dropped together);
    on equal F1 the higher threshold wins. A class without ground truth or without any true positive gets no
    entry: the caller's default applies to it.
    """
    fits: dict[str, ThresholdFit] = {}
    matches = match_classes(
        det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult, class_names, iou_threshold
    )
    for m in matches:
        fit = _best_cut(m.scores.double(), m.tp.double(), m.n_gt)
        if fit is not None:
            fits[m.name] = fit
    return fits


def _best_cut(scores: Tensor, tp: Tensor, n_gt: int) -> ThresholdFit | None:
    """The F1-maximising cut of one class's score-sorted (descending) detections."""
    if n_gt == 0 or scores.numel() == 0 or tp.sum() == 0:
        return None
    cum_tp = torch.cumsum(tp, 0)
    kept = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    f1 = 2 * cum_tp / (kept + n_gt)
    # a cut after position i is possible only where the next score is strictly lower (or at the end)
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[:-1] = scores[1:] < scores[:-1]
    f1 = f1.masked_fill(~valid, -1.0)
    i = int(torch.argmax(f1))  # the first maximum: the fewest detections, i.e. the highest threshold
    precision = float(cum_tp[i] / kept[i])
    recall = float(cum_tp[i] / n_gt)
    return ThresholdFit(float(scores[i]), float(f1[i]), precision, recall, n_gt, i + 1)


def thresholds_of(fits: Mapping[str, ThresholdFit]) -> dict[str, float]:
    """``{class: threshold}``: what a checkpoint stores (``"thresholds"``); exact scores, so the detection at
    the cut stays in."""
    return {name: fit.threshold for name, fit in fits.items()}


def fit_on_annotations(
    detections: Sequence[tuple[str, Any]], annotations: Sequence[Any], class_names: Sequence[str]
) -> dict[str, ThresholdFit]:
    """:func:`fit_f1_thresholds` of ``(image_id, Detections)`` pairs (original pixels, as ``evaluate(...,
    collect=...)`` gives them) against the annotations of those images."""
    by_id = {image_id: d for image_id, d in detections}
    missing = [a.image_id for a in annotations if a.image_id not in by_id]
    if missing:
        raise ValueError(f"no detections for {len(missing)} annotated images (first: {missing[0]})")
    dets = [by_id[a.image_id] for a in annotations]
    return fit_f1_thresholds(
        [d.boxes for d in dets],
        [d.labels for d in dets],
        [d.scores for d in dets],
        [torch.as_tensor(a.boxes).reshape(-1, 4) for a in annotations],
        [torch.as_tensor(a.labels) for a in annotations],
        [torch.as_tensor(a.difficult) for a in annotations],
        class_names,
    )
