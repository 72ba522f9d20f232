"""Detection evaluation: VOC mAP (the paper's protocol), COCO mAP, confusion matrix and plots.

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

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "APResult",
    "DetectionEvaluator",
    "EvalResult",
    "average_precision",
    "coco_map",
    "confusion_matrix",
    "plot_confusion_matrix",
    "plot_pr_curves",
]

APMethod = Literal["voc07", "voc12"]

#: Upper bound on ``detections x max objects per image`` IoU entries materialised at once (memory guard).
_IOU_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------- results
@dataclass
class APResult:
    """VOC average precision per class, the mean over classes with ground truth, and the PR curves."""

    ap: dict[str, float]
    map: float
    precision: dict[str, Tensor]
    recall: dict[str, Tensor]
    n_gt: dict[str, int]


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


# --------------------------------------------------------------------------------------------- helpers
def _check_lengths(**lists: Sequence[object]) -> int:
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-image inputs must have one entry per image, got lengths {lengths}")
    return next(iter(lengths.values()), 0)


def _flatten(
    boxes: Sequence[Tensor], *per_box: Sequence[Tensor]
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Concatenate per-image tensors: ``(boxes (N, 4) float64, image index (N,), [other fields])``."""
    counts = torch.tensor([int(torch.as_tensor(b).reshape(-1, 4).shape[0]) for b in boxes], dtype=torch.long)
    image = torch.repeat_interleave(torch.arange(len(boxes)), counts)
    if len(boxes) == 0:
        return torch.zeros((0, 4), dtype=torch.float64), image, [torch.zeros(0) for _ in per_box]
    flat_boxes = torch.cat([torch.as_tensor(b).detach().cpu().reshape(-1, 4).double() for b in boxes])
    fields = [torch.cat([torch.as_tensor(t).detach().cpu().reshape(-1) for t in field_]) for field_ in per_box]
    for f in fields:
        if f.shape[0] != flat_boxes.shape[0]:
            raise ValueError("every per-image tensor must have one entry per box")
    return flat_boxes, image, fields


def _aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[..., 4]`` and ``b[..., 4]`` element by element (broadcasting); 0 where the union is empty.

    Same operation order as ``torchvision.ops.box_iou`` so results agree bit for bit.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.where(union > 0, torch.ones_like(union)), 0.0)


def _slots(image: Tensor, n_images: int) -> tuple[Tensor, int]:
    """Position of each object within its image (``image`` sorted ascending) and the max per image."""
    counts = torch.bincount(image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(image.shape[0]) - starts[image]
    return slot, int(counts.max()) if counts.numel() else 0


def _match_class(
    det_boxes: Tensor, det_image: Tensor, gt_boxes: Tensor, gt_image: Tensor, gt_difficult: Tensor,
    n_images: int, iou_threshold: float,
) -> tuple[Tensor, Tensor]:
    """Match one class's score-sorted detections to its objects (tutorial protocol, batched).

    Returns ``(tp, counted)``: ``tp`` marks true positives; ``counted`` is False for detections whose
    best object is difficult (ignored: neither TP nor FP).
    """
    n_det = det_boxes.shape[0]
    slot, max_gt = _slots(gt_image, n_images)
    if max_gt == 0 or n_det == 0:
        return torch.zeros(n_det, dtype=torch.bool), torch.ones(n_det, dtype=torch.bool)
    # table[i, j] = index (in this class's object list) of the j-th object of image i, -1 = padding.
    table = torch.full((n_images, max_gt), -1, dtype=torch.long)
    table[gt_image, slot] = torch.arange(gt_boxes.shape[0])

    best_iou = torch.empty(n_det, dtype=torch.float64)
    best_gt = torch.empty(n_det, dtype=torch.long)
    step = max(1, _IOU_CHUNK_ELEMENTS // max_gt)
    for start in range(0, n_det, step):  # chunks bound memory; one chunk in ordinary use
        cand = table[det_image[start:start + step]]  # (d, max_gt)
        iou = _aligned_iou(det_boxes[start:start + step, None, :], gt_boxes[cand.clamp(min=0)])
        iou = iou.masked_fill(cand < 0, -1.0)  # padding never wins; a real object has IoU >= 0
        value, arg = iou.max(dim=1)  # first maximum on ties, like the tutorial's torch.max
        best_iou[start:start + step] = value
        best_gt[start:start + step] = cand.gather(1, arg[:, None]).squeeze(1)

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


def _pr_curves(
    det_boxes: Sequence[Tensor], det_labels: Sequence[Tensor], det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], gt_difficult: Sequence[Tensor] | None,
    class_names: Sequence[str], iou_threshold: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """Cumulative precision/recall curves (float64, score order, ignored detections dropped) per class."""
    if gt_difficult is None:
        gt_difficult = [torch.zeros(torch.as_tensor(b).reshape(-1, 4).shape[0], dtype=torch.bool) for b in gt_boxes]
    n_images = _check_lengths(det_boxes=det_boxes, det_labels=det_labels, det_scores=det_scores,
                              gt_boxes=gt_boxes, gt_labels=gt_labels, gt_difficult=gt_difficult)
    d_boxes, d_image, (d_labels, d_scores) = _flatten(det_boxes, det_labels, det_scores)
    g_boxes, g_image, (g_labels, g_difficult) = _flatten(gt_boxes, gt_labels, gt_difficult)
    d_labels, g_labels, g_difficult = d_labels.long(), g_labels.long(), g_difficult.bool()

    precision: dict[str, Tensor] = {}
    recall: dict[str, Tensor] = {}
    n_gt: dict[str, int] = {}
    for c, name in enumerate(class_names, start=1):
        g = g_labels == c
        n_easy = int((g & ~g_difficult).sum())
        d = torch.nonzero(d_labels == c).squeeze(1)
        # Stable sort: ties keep input order (image order, then order within the image).
        order = d[torch.sort(d_scores[d], descending=True, stable=True).indices]
        tp, counted = _match_class(d_boxes[order], d_image[order], g_boxes[g], g_image[g], g_difficult[g],
                                   n_images, iou_threshold)
        tp = tp[counted].double()
        cum_tp = torch.cumsum(tp, 0)
        cum_fp = torch.cumsum(1.0 - tp, 0)
        precision[name] = cum_tp / (cum_tp + cum_fp + 1e-10)
        recall[name] = cum_tp / n_easy if n_easy > 0 else torch.full_like(cum_tp, math.nan)
        n_gt[name] = n_easy
    return precision, recall, n_gt


def _ap_from_curve(precision: Tensor, recall: Tensor, n_gt: int, method: APMethod) -> float:
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


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


# --------------------------------------------------------------------------------------------- VOC mAP
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
    precision, recall, n_gt = _pr_curves(det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult,
                                         class_names, iou_threshold)
    ap = {name: _ap_from_curve(precision[name], recall[name], n_gt[name], method) for name in class_names}
    return APResult(ap=ap, map=_nanmean(list(ap.values())), precision=precision, recall=recall, n_gt=n_gt)


# --------------------------------------------------------------------------------------------- COCO mAP
def coco_map(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    gt_difficult: Sequence[Tensor],
    class_names: Sequence[str],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    *,
    max_detections: int = 100,
) -> dict[str, float]:
    """COCO box mAP with pycocotools: ``{"map": AP@[.5:.95], "ap50": AP@.5, "ap_<class>": AP@[.5:.95]}``.

    Difficult objects become ``iscrowd=1`` (ignored, COCO's way). ``image_sizes`` are ``(width, height)``
    and only fill the image records. ``max_detections`` is COCO's per-image, per-class cap (100 by
    default). Values are nan where no class has ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n_images = _check_lengths(det_boxes=det_boxes, det_labels=det_labels, det_scores=det_scores,
                              gt_boxes=gt_boxes, gt_labels=gt_labels, gt_difficult=gt_difficult)
    if image_sizes is not None and len(image_sizes) != n_images:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for {n_images} images")
    nan_result = {"map": math.nan, "ap50": math.nan, **{f"ap_{name}": math.nan for name in class_names}}
    n_cls = len(class_names)
    d_boxes, d_image, (d_labels, d_scores) = _flatten(det_boxes, det_labels, det_scores)
    g_boxes, g_image, (g_labels, g_difficult) = _flatten(gt_boxes, gt_labels, gt_difficult)
    d_keep = (d_labels >= 1) & (d_labels <= n_cls)
    g_keep = (g_labels >= 1) & (g_labels <= n_cls)
    if n_images == 0 or not bool((g_keep & ~g_difficult.bool()).any()):
        return nan_result

    def xywh(boxes: Tensor) -> list[list[float]]:
        return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()

    images = [{"id": i + 1, "width": int(image_sizes[i][0]) if image_sizes else 0,
               "height": int(image_sizes[i][1]) if image_sizes else 0} for i in range(n_images)]
    categories = [{"id": c, "name": name} for c, name in enumerate(class_names, start=1)]
    # Annotation ids start at 1: COCOeval uses 0 to mean "unmatched".
    gt_anns = [
        {"id": k, "image_id": img + 1, "category_id": cat, "bbox": box, "area": box[2] * box[3],
         "iscrowd": int(crowd)}
        for k, (img, cat, box, crowd) in enumerate(
            zip(g_image[g_keep].tolist(), g_labels[g_keep].long().tolist(), xywh(g_boxes[g_keep]),
                g_difficult[g_keep].bool().tolist(), strict=True), start=1)
    ]
    dt_anns = [
        {"id": k, "image_id": img + 1, "category_id": cat, "bbox": box, "area": box[2] * box[3],
         "score": score, "iscrowd": 0}
        for k, (img, cat, box, score) in enumerate(
            zip(d_image[d_keep].tolist(), d_labels[d_keep].long().tolist(), xywh(d_boxes[d_keep]),
                d_scores[d_keep].double().tolist(), strict=True), start=1)
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": gt_anns}
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": dt_anns}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    def mean_valid(p: Tensor) -> float:
        p = p[p > -1]  # -1 marks "no ground truth"
        return float(p.mean()) if p.numel() else math.nan

    # precision: (iou thresholds, recall thresholds, classes, area ranges, max dets); "all" area, max dets.
    prec = torch.from_numpy(evaluator.eval["precision"])[:, :, :, 0, -1]
    out = {"map": mean_valid(prec), "ap50": mean_valid(prec[0])}
    category_ids = evaluator.params.catIds
    for c, name in enumerate(class_names, start=1):
        out[f"ap_{name}"] = mean_valid(prec[:, :, category_ids.index(c)])
    return out


# --------------------------------------------------------------------------------------------- confusion
def _pad(tensors: Sequence[Tensor], shape: tuple[int, ...], fill: float) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence([t.reshape(-1, *shape) for t in tensors], batch_first=True,
                                           padding_value=fill)


def confusion_matrix(
    det_boxes: Sequence[Tensor],
    det_labels: Sequence[Tensor],
    det_scores: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> Tensor:
    """``(C + 1, C + 1)`` int64 counts, row = true class, column = predicted class, index 0 = background.

    Per image, detections with score >= ``score_threshold`` take, highest score first, the still unmatched
    object of any class with the highest IoU > ``iou_threshold``. A matched pair counts at
    ``[object class, detection class]``, an unmatched detection at ``[0, class]``, a missed object at
    ``[class, 0]``. The greedy loop runs over detection ranks, batched over all images.
    """
    n_images = _check_lengths(det_boxes=det_boxes, det_labels=det_labels, det_scores=det_scores,
                              gt_boxes=gt_boxes, gt_labels=gt_labels)
    n_cls = len(class_names)
    size = n_cls + 1
    if n_images == 0:
        return torch.zeros((size, size), dtype=torch.long)

    d_boxes, d_labels, g_boxes, g_labels = [], [], [], []
    for i in range(n_images):  # per image, not per detection
        boxes = torch.as_tensor(det_boxes[i]).detach().cpu().reshape(-1, 4).double()
        labels = torch.as_tensor(det_labels[i]).detach().cpu().reshape(-1).long()
        scores = torch.as_tensor(det_scores[i]).detach().cpu().reshape(-1)
        keep = torch.nonzero((scores >= score_threshold) & (labels >= 1) & (labels <= n_cls)).squeeze(1)
        keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
        d_boxes.append(boxes[keep])
        d_labels.append(labels[keep])
        gl = torch.as_tensor(gt_labels[i]).detach().cpu().reshape(-1).long()
        gkeep = (gl >= 1) & (gl <= n_cls)
        g_boxes.append(torch.as_tensor(gt_boxes[i]).detach().cpu().reshape(-1, 4).double()[gkeep])
        g_labels.append(gl[gkeep])

    det_l = _pad(d_labels, (), 0)  # (N, D), 0 = padding
    gt_l = _pad(g_labels, (), 0)  # (N, G)
    n_det, n_gt = det_l.shape[1], gt_l.shape[1]
    matched_gt = torch.full((n_images, n_det), -1, dtype=torch.long)
    gt_taken = torch.zeros((n_images, n_gt), dtype=torch.bool)
    if n_det and n_gt:
        iou = _aligned_iou(_pad(d_boxes, (4,), 0.0)[:, :, None, :], _pad(g_boxes, (4,), 0.0)[:, None, :, :])
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


# --------------------------------------------------------------------------------------------- evaluator
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
        n = _check_lengths(det_boxes=det_boxes, det_labels=det_labels, det_scores=det_scores,
                           gt_boxes=gt_boxes, gt_labels=gt_labels, gt_difficult=gt_difficult)
        if image_sizes is not None and len(image_sizes) != n:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for {n} images")
        for store, items in zip((*self._det, *self._gt),
                                (det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult),
                                strict=True):
            store.extend(torch.as_tensor(t).detach().cpu() for t in items)
        if image_sizes is None:
            self._sizes.extend([None] * n)
        else:
            self._sizes.extend((int(w), int(h)) for w, h in image_sizes)

    def compute(self, coco: bool = True) -> EvalResult:
        """VOC07 (paper), VOC12, optionally COCO (pycocotools, the slow part) and the confusion matrix."""
        names = self.class_names
        precision, recall, n_gt = _pr_curves(*self._det, *self._gt, names, self.iou_threshold)
        ap07 = {n: _ap_from_curve(precision[n], recall[n], n_gt[n], "voc07") for n in names}
        ap12 = {n: _ap_from_curve(precision[n], recall[n], n_gt[n], "voc12") for n in names}
        map_coco = ap50_coco = math.nan
        ap_coco: dict[str, float] = {}
        if coco:
            sizes = None if any(s is None for s in self._sizes) else self._sizes
            result = coco_map(*self._det, *self._gt, names, image_sizes=sizes)
            map_coco, ap50_coco = result["map"], result["ap50"]
            ap_coco = {n: result[f"ap_{n}"] for n in names}
        confusion = confusion_matrix(*self._det, self._gt[0], self._gt[1], names,
                                     iou_threshold=self.iou_threshold)
        return EvalResult(
            map=_nanmean(list(ap07.values())), ap=ap07, map_voc12=_nanmean(list(ap12.values())), ap_voc12=ap12,
            map_coco=map_coco, ap50_coco=ap50_coco, precision=precision, recall=recall, confusion=confusion,
            n_gt=n_gt, ap_coco=ap_coco,
        )


# --------------------------------------------------------------------------------------------- plots
def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot global state (safe in servers and threads)
    return fig


def plot_pr_curves(result: EvalResult | APResult, path: str | Path) -> Path:
    """Save one precision-recall curve per class, AP in the legend, as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _new_figure((6.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, prec in result.precision.items():
        rec = result.recall[name]
        ap = result.ap.get(name, math.nan)
        ax.plot(rec.tolist(), prec.tolist(), label=f"{name} (AP {ap:.3f})", drawstyle="steps-post")
    title = "Precision-recall"
    if not math.isnan(result.map):
        title += f" (mAP {result.map:.3f})"
    ax.set(xlabel="recall", ylabel="precision", xlim=(0.0, 1.0), ylim=(0.0, 1.05), title=title)
    ax.grid(True, alpha=0.3)
    if result.precision:
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_confusion_matrix(confusion: Tensor, class_names: Sequence[str], path: str | Path) -> Path:
    """Save the confusion matrix (rows true, columns predicted, index 0 background) with counts as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = torch.as_tensor(confusion).detach().cpu().long()
    labels = ["background", *class_names]
    if counts.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion has shape {tuple(counts.shape)}, expected {(len(labels), len(labels))}")
    n = len(labels)
    fig = _new_figure((1.6 + 1.1 * n, 1.2 + 1.0 * n))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(counts.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = counts.max().item() / 2 if counts.numel() else 0
    for i in range(n):
        for j in range(n):
            value = int(counts[i, j])
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
