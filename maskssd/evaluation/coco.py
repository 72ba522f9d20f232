"""COCO box mAP through pycocotools (information beside the paper's VOC protocol)."""

from __future__ import annotations

import contextlib
import io
import math

import torch
from torch import Tensor

from maskssd.evaluation.records import EvalSet

__all__ = ["coco_map"]


def _annotations(
    image: Tensor, labels: Tensor, boxes: Tensor, *, crowd: Tensor | None = None, scores: Tensor | None = None
) -> list[dict]:
    """COCO annotation records (ids from 1: COCOeval uses 0 for "unmatched"); ground truth has ``crowd``
    (difficult objects are ignored as crowds), detections have ``scores``."""
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    out = []
    for k, (img, cat, box) in enumerate(zip(image.tolist(), labels.long().tolist(), xywh, strict=True)):
        rec = {"id": k + 1, "image_id": img + 1, "category_id": cat, "bbox": box, "area": box[2] * box[3]}
        if scores is not None:
            rec.update(score=float(scores[k]), iscrowd=0)
        else:
            rec["iscrowd"] = int(bool(crowd[k])) if crowd is not None else 0
        out.append(rec)
    return out


def coco_map(evalset: EvalSet, *, max_detections: int = 100) -> dict[str, float]:
    """COCO box mAP with pycocotools: ``{"map": AP@[.5:.95], "ap50": AP@.5, "ap_<class>": AP@[.5:.95]}``.

    Difficult objects become ``iscrowd=1`` (ignored, COCO's way). The images' sizes (where every image has
    one) only fill the image records. ``max_detections`` is COCO's per-image, per-class cap (100 by
    default). Values are nan where no class has ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n_images = len(evalset)
    class_names = evalset.class_names
    image_sizes = None if any(s is None for s in evalset.sizes) else evalset.sizes
    nan_result = {"map": math.nan, "ap50": math.nan, **{f"ap_{name}": math.nan for name in class_names}}
    n_cls = len(class_names)
    f = evalset.flat
    d_boxes, d_image, d_labels, d_scores = f.det_boxes, f.det_image, f.det_labels, f.det_scores
    g_boxes, g_image, g_labels, g_difficult = f.gt_boxes, f.gt_image, f.gt_labels, f.gt_difficult
    d_keep = (d_labels >= 1) & (d_labels <= n_cls)
    g_keep = (g_labels >= 1) & (g_labels <= n_cls)
    if n_images == 0 or not bool((g_keep & ~g_difficult).any()):
        return nan_result

    images = [
        {
            "id": i + 1,
            "width": int(image_sizes[i][0]) if image_sizes else 0,
            "height": int(image_sizes[i][1]) if image_sizes else 0,
        }
        for i in range(n_images)
    ]
    categories = [{"id": c, "name": name} for c, name in enumerate(class_names, start=1)]
    gt_anns = _annotations(g_image[g_keep], g_labels[g_keep], g_boxes[g_keep], crowd=g_difficult[g_keep])
    dt_anns = _annotations(d_image[d_keep], d_labels[d_keep], d_boxes[d_keep], scores=d_scores[d_keep])
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
