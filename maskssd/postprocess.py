"""From raw SSD outputs to detections: decode, per-class score filter, NMS, top-k; batched over images.

One ``torchvision.ops.batched_nms`` call handles every image and class of a batch (image and class folded
into the NMS group id). ``class_agnostic=True`` groups by image only: overlapping boxes of different classes
suppress each other and the most probable class survives (the reference paper's proposed fix for faces that
get two classes in "transition" frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from maskssd.priors import cxcywh_to_xyxy, decode


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

    def to_list(self, class_names: tuple[str, ...] | list[str]) -> list[dict]:
        return [
            {"box": [round(float(v), 2) for v in b], "label": class_names[int(lab) - 1], "score": round(float(s), 5)}
            for b, lab, s in zip(self.boxes.tolist(), self.labels.tolist(), self.scores.tolist())
        ]


@dataclass(frozen=True)
class DecodeSpec:
    """Detection settings; the defaults are the reference paper's evaluation protocol."""

    min_score: float = 0.01
    max_overlap: float = 0.45
    top_k: int = 200
    class_agnostic: bool = False
    pre_nms_top_k: int | None = None  # per image, before NMS; None keeps every candidate (the paper's code)


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
    probs = softmax_last(scores.float())[..., 1:]  # (N, P, C-1)
    boxes = cxcywh_to_xyxy(decode(locs.float(), priors_cxcy)).clamp_(0.0, 1.0)  # (N, P, 4)
    thresh = min_score if min_score is not None else torch.tensor(spec.min_score)
    mask = probs > thresh.to(probs.device)
    if spec.pre_nms_top_k is not None:
        flat = probs.masked_fill(~mask, 0).reshape(n, -1)
        k = min(spec.pre_nms_top_k, flat.shape[1])
        kth = flat.topk(k, dim=1).values[:, -1:]
        mask &= (flat >= kth).view_as(mask)
    img_idx, prior_idx, cls_idx = mask.nonzero(as_tuple=True)
    cand_scores = probs[img_idx, prior_idx, cls_idx]
    cand_boxes = boxes[img_idx, prior_idx]
    groups = img_idx if spec.class_agnostic else img_idx * (c - 1) + cls_idx
    keep = batched_nms(cand_boxes, cand_scores, groups, spec.max_overlap)  # sorted by score, descending
    img_k = img_idx[keep]
    # per-image top_k: a stable sort by image keeps the score order inside each image
    order = torch.sort(img_k, stable=True).indices
    keep, img_k = keep[order], img_k[order]
    counts = torch.bincount(img_k, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(img_k.numel(), device=img_k.device) - starts[img_k]
    sel = rank < spec.top_k
    keep, img_k = keep[sel], img_k[sel]
    out_boxes = cand_boxes[keep]
    if sizes is not None:
        wh = sizes.to(out_boxes.device, torch.float32)[img_k]
        out_boxes = out_boxes * torch.cat([wh, wh], 1)
    split = torch.bincount(img_k, minlength=n).tolist()
    return [
        Detections(b, lab, s)
        for b, lab, s in zip(out_boxes.split(split), (cls_idx[keep] + 1).split(split), cand_scores[keep].split(split))
    ]
