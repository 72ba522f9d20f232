"""The detection confusion matrix: which class each ground-truth face got, background included."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from maskssd.evaluation._common import aligned_iou
from maskssd.evaluation.records import EvalSet

__all__ = ["confusion_matrix"]


def _pad(tensors: Sequence[Tensor], shape: tuple[int, ...], fill: float) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence(
        [t.reshape(-1, *shape) for t in tensors], batch_first=True, padding_value=fill
    )


def confusion_matrix(evalset: EvalSet, *, score_threshold: float, iou_threshold: float = 0.5) -> Tensor:
    """``(C + 1, C + 1)`` int64 counts, row = true class, column = predicted class, index 0 = background.

    Per image, detections with score >= ``score_threshold`` take, highest score first, the still unmatched
    object of any class with the highest IoU > ``iou_threshold``. A matched pair counts at
    ``[object class, detection class]``, an unmatched detection at ``[0, class]``, a missed object at
    ``[class, 0]``. The greedy loop runs over detection ranks, batched over all images.
    """
    n_images = len(evalset)
    n_cls = len(evalset.class_names)
    size = n_cls + 1
    if n_images == 0:
        return torch.zeros((size, size), dtype=torch.long)

    d_boxes, d_labels, g_boxes, g_labels = [], [], [], []
    for det, target in zip(evalset.detections, evalset.targets, strict=True):  # per image, not per detection
        boxes, labels, scores = det.boxes.double(), det.labels, det.scores
        keep = torch.nonzero((scores >= score_threshold) & (labels >= 1) & (labels <= n_cls)).squeeze(1)
        keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
        d_boxes.append(boxes[keep])
        d_labels.append(labels[keep])
        gl = target.labels
        gkeep = (gl >= 1) & (gl <= n_cls)
        g_boxes.append(target.boxes.double()[gkeep])
        g_labels.append(gl[gkeep])

    det_l = _pad(d_labels, (), 0)  # (N, D), 0 = padding
    gt_l = _pad(g_labels, (), 0)  # (N, G)
    n_det, n_gt = det_l.shape[1], gt_l.shape[1]
    matched_gt = torch.full((n_images, n_det), -1, dtype=torch.long)
    gt_taken = torch.zeros((n_images, n_gt), dtype=torch.bool)
    if n_det and n_gt:
        iou = aligned_iou(_pad(d_boxes, (4,), 0.0)[:, :, None, :], _pad(g_boxes, (4,), 0.0)[:, None, :, :])
        iou = iou.masked_fill((gt_l == 0)[:, None, :], -1.0)
        rows = torch.arange(n_images)
        for r in range(n_det):
            value, arg = iou[:, r].masked_fill(gt_taken, -1.0).max(dim=1)
            ok = (value > iou_threshold) & (det_l[:, r] > 0)
            matched_gt[ok, r] = arg[ok]
            gt_taken[rows[ok], arg[ok]] = True

    det_valid = det_l > 0
    true_cls = torch.zeros_like(det_l)  # background unless matched
    if n_gt:
        true_cls = torch.where(matched_gt >= 0, gt_l.gather(1, matched_gt.clamp(min=0)), true_cls)
    missed = gt_l[(gt_l > 0) & ~gt_taken]
    rows_idx = torch.cat([true_cls[det_valid], missed])
    cols_idx = torch.cat([det_l[det_valid], torch.zeros_like(missed)])
    return torch.bincount(rows_idx * size + cols_idx, minlength=size * size).reshape(size, size)
