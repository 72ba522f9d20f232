"""Every detection metric of one evaluation in one object: VOC07 (the paper's protocol), VOC12, COCO, the
confusion matrix and the PR curves (:class:`DetectionEvaluator` -> :class:`EvalResult`).

Conventions
-----------
* Inputs are lists with **one entry per image**: boxes ``(n, 4)`` ``xyxy``, labels ``(n,)`` ints,
  scores ``(n,)`` and difficult flags ``(n,)``. Detections and ground truth must use the same
  coordinate system (pixels or normalised); IoU is continuous (no ``+1`` pixel).
* Labels are 1-based indices into ``class_names``; 0 is background. Labels outside ``1..C`` are ignored.
* Everything per class is keyed by class **name**.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from maskssd.evaluation._common import check_lengths, nanmean
from maskssd.evaluation.coco import coco_map
from maskssd.evaluation.confusion import confusion_matrix
from maskssd.evaluation.voc import APResult, ap_from_curve, average_precision, pr_curves

__all__ = [
    "APResult",
    "DetectionEvaluator",
    "EvalResult",
    "average_precision",
    "coco_map",
    "confusion_matrix",
]


@dataclass
class EvalResult:
    """Every metric of one evaluation. ``map``/``ap`` are VOC07 11-point, the paper's protocol."""

    map: float
    ap: dict[str, float]
    map_voc12: float
    ap_voc12: dict[str, float]
    map_coco: float
    ap50_coco: float
    precision: dict[str, Tensor]
    recall: dict[str, Tensor]
    confusion: Tensor
    n_gt: dict[str, int]
    ap_coco: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat ``{name: value}`` for experiment logging; COCO entries are left out when they are nan."""
        out: dict[str, float] = {f"{prefix}_map": self.map}
        out.update({f"{prefix}_ap_{name}": value for name, value in self.ap.items()})
        out[f"{prefix}_map_voc12"] = self.map_voc12
        for key, value in ((f"{prefix}_map_coco", self.map_coco), (f"{prefix}_ap50_coco", self.ap50_coco)):
            if not math.isnan(value):
                out[key] = value
        return out


class DetectionEvaluator:
    """Accumulates detections and ground truth over batches, then computes every metric once."""

    def __init__(self, class_names: Sequence[str], iou_threshold: float = 0.5):
        self.class_names = tuple(class_names)
        self.iou_threshold = iou_threshold
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._det: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        self._gt: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        self._sizes: list[tuple[int, int] | None] = []

    def __len__(self) -> int:
        return len(self._sizes)

    def update(
        self,
        det_boxes: Sequence[Tensor],
        det_labels: Sequence[Tensor],
        det_scores: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        gt_difficult: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """Add a batch (lists with one entry per image); tensors are detached and moved to the CPU."""
        n = check_lengths(
            det_boxes=det_boxes,
            det_labels=det_labels,
            det_scores=det_scores,
            gt_boxes=gt_boxes,
            gt_labels=gt_labels,
            gt_difficult=gt_difficult,
        )
        if image_sizes is not None and len(image_sizes) != n:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for {n} images")
        for store, items in zip(
            (*self._det, *self._gt),
            (det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult),
            strict=True,
        ):
            store.extend(torch.as_tensor(t).detach().cpu() for t in items)
        if image_sizes is None:
            self._sizes.extend([None] * n)
        else:
            self._sizes.extend((int(w), int(h)) for w, h in image_sizes)

    def compute(self, coco: bool = True) -> EvalResult:
        """VOC07 (paper), VOC12, optionally COCO (pycocotools, the slow part) and the confusion matrix."""
        names = self.class_names
        precision, recall, n_gt = pr_curves(*self._det, *self._gt, names, self.iou_threshold)
        ap07 = {n: ap_from_curve(precision[n], recall[n], n_gt[n], "voc07") for n in names}
        ap12 = {n: ap_from_curve(precision[n], recall[n], n_gt[n], "voc12") for n in names}
        map_coco = ap50_coco = math.nan
        ap_coco: dict[str, float] = {}
        if coco:
            sizes = None if any(s is None for s in self._sizes) else self._sizes
            result = coco_map(*self._det, *self._gt, names, image_sizes=sizes)
            map_coco, ap50_coco = result["map"], result["ap50"]
            ap_coco = {n: result[f"ap_{n}"] for n in names}
        confusion = confusion_matrix(
            *self._det, self._gt[0], self._gt[1], names, iou_threshold=self.iou_threshold
        )
        return EvalResult(
            map=nanmean(list(ap07.values())),
            ap=ap07,
            map_voc12=nanmean(list(ap12.values())),
            ap_voc12=ap12,
            map_coco=map_coco,
            ap50_coco=ap50_coco,
            precision=precision,
            recall=recall,
            confusion=confusion,
            n_gt=n_gt,
            ap_coco=ap_coco,
        )
