"""From raw SSD outputs to detections: decode, per-class score filter, NMS, top-k; batched over images.

The whole batch is processed at once: a logit test discards confident-background priors before any softmax
or decoding, and greedy NMS runs per (image, class) group (:func:`grouped_nms`). ``class_agnostic=True``
groups by image only: overlapping boxes of different classes
suppress each other and the most probable class survives (the reference paper's proposed fix for faces that
get two classes in "transition" frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms, nms

from maskssd.ssd import kernels
from maskssd.ssd.decode_spec import DecodeSpec
from maskssd.ssd.priors import VARIANCES, cxcywh_to_xyxy, decode


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (a few classes): several times faster on CPU than ``F.softmax``,
    whose kernel is tuned for long rows."""
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


@dataclass
class Detections:
    """Detections of one image: ``boxes (n, 4)`` xyxy, ``labels (n,)`` 1..C-1, ``scores (n,)``."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_cpu(self) -> Detections:
        return Detections(self.boxes.cpu(), self.labels.cpu(), self.scores.cpu())

    def above(self, threshold: float | torch.Tensor) -> Detections:
        """The detections scoring at least ``threshold`` (a display or operating threshold, not the decode one):
        one number, or a tensor ``(C-1,)`` of per-class thresholds indexed by ``label - 1``."""
        if isinstance(threshold, torch.Tensor) and threshold.dim() == 1:
            threshold = threshold.to(self.scores.device, self.scores.dtype)[(self.labels - 1).clamp(min=0)]
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.labels[keep], self.scores[keep])

    def to_list(self, class_names: tuple[str, ...] | list[str]) -> list[dict]:
        return [
            {
                "box": [round(float(v), 2) for v in b],
                "label": class_names[int(lab) - 1],
                "score": round(float(s), 5),
            }
            for b, lab, s in zip(self.boxes.tolist(), self.labels.tolist(), self.scores.tolist())
        ]


def postprocess(
    locs: torch.Tensor,
    scores: torch.Tensor,
    priors_cxcy: torch.Tensor,
    spec: DecodeSpec = DecodeSpec(),
    sizes: torch.Tensor | None = None,
    min_score: torch.Tensor | None = None,
) -> list[Detections]:
    """``locs (N,P,4)``, ``scores (N,P,C)`` logits -> one :class:`Detections` per image.

    Boxes are normalised xyxy clipped to [0, 1], or original pixels when ``sizes`` ``(N, 2)`` gives each image's
    (width, height). ``min_score`` may be a per-class tensor ``(C-1,)`` overriding ``spec.min_score``.
    """
    n, p, c = scores.shape
    device = scores.device
    thresh = (min_score if min_score is not None else torch.tensor(spec.min_score)).to(device, torch.float32)
    if device.type == "cpu" and kernels.ENABLED:
        counts, out_boxes, labels, out_scores = kernels.detect(
            locs,
            scores,
            priors_cxcy,
            thresh.expand(c - 1),
            spec.max_overlap,
            spec.top_k,
            spec.pre_nms_top_k,
            spec.class_agnostic,
            VARIANCES,
        )
        split = counts.tolist()
        img_k = torch.repeat_interleave(torch.arange(n), counts)
    else:
        img_k, out_boxes, labels, out_scores = postprocess_tensors(locs, scores, priors_cxcy, spec, thresh)
        split = torch.bincount(img_k, minlength=n).tolist()
    if sizes is not None:
        wh = sizes.to(out_boxes.device, torch.float32)[img_k]
        out_boxes = out_boxes * torch.cat([wh, wh], 1)
    return [
        Detections(b, lab, s)
        for b, lab, s in zip(out_boxes.split(split), labels.split(split), out_scores.split(split))
    ]


def postprocess_tensors(
    locs: torch.Tensor,
    scores: torch.Tensor,
    priors_cxcy: torch.Tensor,
    spec: DecodeSpec,
    thresh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`postprocess` in batched tensor operations (GPUs; the CPU runs :func:`maskssd.kernels.detect`).
    Returns image index, boxes, labels and scores of the detections, image by image, best first."""
    n, p, c = scores.shape
    device = scores.device
    scores, locs = scores.float(), locs.float()
    # 1. priors that can pass: p_c > t needs logit_c - logit_0 > log t (p_c < sigmoid(logit_c - logit_0)), a
    #    cheap test that skips the softmax and decoding of the ~95 % of priors that are confident background;
    #    the margin only widens this superset, the softmax below decides
    floor = float(thresh.min())
    if floor > 0:
        bound = math.log(floor) - 0.01
        img, prior = (scores[..., 1:].amax(-1) - scores[..., 0] > bound).nonzero(as_tuple=True)
        rows = scores[img, prior]
    else:
        img = torch.arange(n, device=device).repeat_interleave(p)
        prior = torch.arange(p, device=device).repeat(n)
        rows = scores.reshape(-1, c)
    # 2. the (prior, class) candidates above min_score
    probs = softmax_last(rows)[:, 1:]
    row, cls_idx = (probs > thresh).nonzero(as_tuple=True)
    cand_scores = probs[row, cls_idx]
    img_idx, prior_idx = img[row], prior[row]
    if spec.pre_nms_top_k is not None:
        order = torch.sort(cand_scores, descending=True, stable=True).indices
        sel = order[_first_k_per_image(img_idx[order], spec.pre_nms_top_k, n)]
        img_idx, prior_idx, cls_idx, cand_scores = (
            img_idx[sel],
            prior_idx[sel],
            cls_idx[sel],
            cand_scores[sel],
        )
    cand_boxes = cxcywh_to_xyxy(decode(locs[img_idx, prior_idx], priors_cxcy[prior_idx])).clamp_(0.0, 1.0)
    # 3. NMS per image and class (or per image), 4. the top_k of each image
    groups = img_idx if spec.class_agnostic else img_idx * (c - 1) + cls_idx
    keep = grouped_nms(cand_boxes, cand_scores, groups, spec.max_overlap)  # by descending score
    keep = keep[_first_k_per_image(img_idx[keep], spec.top_k, n)]  # image by image, best first within each
    return img_idx[keep], cand_boxes[keep], cls_idx[keep] + 1, cand_scores[keep]


def _first_k_per_image(img: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Positions of the first ``k`` entries of each image, grouped image by image (entries keep their order
    inside an image). With entries in descending score order, these are each image's ``k`` best."""
    order = torch.sort(img, stable=True).indices
    counts = torch.bincount(img, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=img.device) - starts[img[order]]
    return order[rank < k]


def grouped_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Greedy NMS within each group; kept indices, by descending score. Keeps the same boxes as
    ``torchvision.ops.batched_nms``.

    On CPU, one ``nms`` call per group on contiguous slices: torchvision's single call with offset boxes is
    quadratic in *all* candidates (~7 ms for 3000 on a batch of 8), its fallback re-scans them per group.
    """
    if boxes.device.type != "cpu" or boxes.numel() == 0:
        return batched_nms(boxes, scores, groups, iou_threshold)
    order = torch.sort(groups, stable=True).indices
    counts = torch.bincount(groups).tolist()
    b, s = boxes[order], scores[order]
    keep, start = [], 0
    for count in counts:
        if count:
            keep.append(nms(b[start : start + count], s[start : start + count], iou_threshold) + start)
            start += count
    kept = order[torch.cat(keep)]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
