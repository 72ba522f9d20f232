"""Every detection metric of one evaluation in one object: VOC07 (the paper's protocol), VOC12, COCO, the
confusion matrix at the operating threshold and the PR curves (:func:`evaluate_set` -> :class:`EvalResult`),
all from one matching of the set (:class:`~maskssd.evaluation.voc.Matched`, kept in the result for the
intervals, thresholds and error analysis that follow). Inputs are records (:mod:`maskssd.evaluation.records`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from maskssd.evaluation._common import nanmean
from maskssd.evaluation.coco import coco_map
from maskssd.evaluation.records import Detections, EvalSet, Target
from maskssd.evaluation.voc import APResult, Matched, ap_from_curve, average_precision, match, pr_curves
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD

__all__ = [
    "OPERATING_THRESHOLD",
    "APResult",
    "DetectionEvaluator",
    "EvalResult",
    "average_precision",
    "coco_map",
    "evaluate_set",
]

#: The score from which a detection counts as shown (recall, false boxes and the confusion matrix there): the
#: display threshold of ``detect``, one number for every report of a run (``eval.operating_threshold``).
OPERATING_THRESHOLD = DISPLAY_THRESHOLD


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
    confusion: Tensor  # at ``operating_threshold``
    n_gt: dict[str, int]
    ap_coco: dict[str, float] = field(default_factory=dict)
    operating_threshold: float = OPERATING_THRESHOLD
    matched: Matched | None = field(default=None, repr=False)  # the matching it was computed from

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat ``{name: value}`` for experiment logging; COCO entries are left out when they are nan."""
        out: dict[str, float] = {f"{prefix}_map": self.map}
        out.update({f"{prefix}_ap_{name}": value for name, value in self.ap.items()})
        out[f"{prefix}_map_voc12"] = self.map_voc12
        for key, value in ((f"{prefix}_map_coco", self.map_coco), (f"{prefix}_ap50_coco", self.ap50_coco)):
            if not math.isnan(value):
                out[key] = value
        return out


def evaluate_set(
    evalset: EvalSet,
    *,
    iou_threshold: float = 0.5,
    coco: bool = True,
    operating_threshold: float = OPERATING_THRESHOLD,
) -> EvalResult:
    """VOC07 (paper), VOC12, optionally COCO (pycocotools, the slow part) and the confusion matrix at the
    operating threshold, from one matching of ``evalset``."""
    matched = match(evalset, iou_threshold)
    names = evalset.class_names
    precision, recall, n_gt = pr_curves(matched)
    ap07 = {n: ap_from_curve(precision[n], recall[n], n_gt[n], "voc07") for n in names}
    ap12 = {n: ap_from_curve(precision[n], recall[n], n_gt[n], "voc12") for n in names}
    map_coco = ap50_coco = math.nan
    ap_coco: dict[str, float] = {}
    if coco:
        result = coco_map(evalset)
        map_coco, ap50_coco = result["map"], result["ap50"]
        ap_coco = {n: result[f"ap_{n}"] for n in names}
    return EvalResult(
        map=nanmean(list(ap07.values())),
        ap=ap07,
        map_voc12=nanmean(list(ap12.values())),
        ap_voc12=ap12,
        map_coco=map_coco,
        ap50_coco=ap50_coco,
        precision=precision,
        recall=recall,
        confusion=matched.confusion(operating_threshold),
        n_gt=n_gt,
        ap_coco=ap_coco,
        operating_threshold=operating_threshold,
        matched=matched,
    )


class DetectionEvaluator:
    """Accumulates images over batches (``update``, keyed by image id as torchvision's ``CocoEvaluator``),
    then computes every metric once (:func:`evaluate_set`)."""

    def __init__(
        self,
        class_names: Sequence[str],
        iou_threshold: float = 0.5,
        operating_threshold: float = OPERATING_THRESHOLD,
    ):
        self.class_names = tuple(class_names)
        self.iou_threshold = iou_threshold
        self.operating_threshold = operating_threshold
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.evalset = EvalSet(self.class_names)

    def __len__(self) -> int:
        return len(self.evalset)

    def update(
        self,
        predictions: Mapping[str, Detections],
        targets: Mapping[str, Target],
        sizes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """Add a batch: ``{image_id: Detections}`` with ``{image_id: Target}`` (and ``(width, height)``)."""
        self.evalset.update(predictions, targets, sizes)

    def compute(self, coco: bool = True) -> EvalResult:
        """Every metric of what was added (COCO optional: pycocotools is the slow part)."""
        return evaluate_set(
            self.evalset,
            iou_threshold=self.iou_threshold,
            coco=coco,
            operating_threshold=self.operating_threshold,
        )
