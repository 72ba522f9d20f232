"""Per-class operating thresholds: the score above which a detection is shown, chosen per class on the
validation split to maximise F1 at IoU > 0.5 (the paper's matching, :mod:`maskssd.evaluation.voc`).

AP integrates over every threshold; a deployed detector shows the detections above one. With 80/17/3 class
imbalance one threshold for all classes is wrong for most of them: the rare class needs a lower one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from maskssd.evaluation.voc import Matched

__all__ = ["ThresholdFit", "fit_f1_thresholds", "thresholds_of"]


@dataclass(frozen=True)
class ThresholdFit:
    """One class's operating point: keep detections scoring ``>= threshold``."""

    threshold: float
    f1: float
    precision: float
    recall: float
    n_gt: int
    n_detections: int  # counted (not ignored) detections at or above the threshold


def fit_f1_thresholds(matched: Matched) -> dict[str, ThresholdFit]:
    """Per class, the score threshold maximising F1, from the set's matching (the one AP is computed from).

    Detections are matched as for VOC AP (a detection is a true positive iff it is the first, in score order,
    to pick a non-difficult object with IoU > ``iou_threshold``; ones whose best object is difficult are
    ignored). Only cuts between distinct scores are considered (equal scores are kept or dropped together);
    on equal F1 the higher threshold wins. A class without ground truth or without any true positive gets no
    entry: the caller's default applies to it.
    """
    fits: dict[str, ThresholdFit] = {}
    for m in matched.classes:
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
