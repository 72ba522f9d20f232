"""MultiBox loss, batched over images, with every knob the studies search.

Matching follows the reference paper's code (the PyTorch SSD300 tutorial): each prior takes its best-IoU
object, each object forces its best prior (overlap set to 1), priors under ``threshold`` are background.
Confidence loss is weighted cross-entropy (optionally focal, label-smoothed) summed over positives and the
per-image hardest ``neg_pos_ratio x positives`` negatives, divided by the batch's number of positives.
Localisation loss is ``"l1"`` (the paper's code: mean absolute error over the 4 offsets of every positive)
or ``"smooth_l1"`` (the SSD paper: summed over offsets, divided by the number of positives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from maskssd.priors import box_iou, cxcywh_to_xyxy, encode, xyxy_to_cxcywh

LocLoss = Literal["l1", "smooth_l1"]


@dataclass
class LossOutput:
    """``total = conf + alpha * loc``; ``n_positives`` is the batch's number of matched priors."""

    total: torch.Tensor
    conf: torch.Tensor
    loc: torch.Tensor
    n_positives: int


def pad_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged per-image targets -> ``boxes (N, M, 4)``, ``labels (N, M)``, ``valid (N, M)`` with M >= 1."""
    n = len(boxes)
    m = max([int(b.shape[0]) for b in boxes] + [1])
    out_b = torch.zeros(n, m, 4, device=device)
    out_l = torch.zeros(n, m, dtype=torch.long, device=device)
    valid = torch.zeros(n, m, dtype=torch.bool, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):  # a copy per image, no per-box work
        k = int(b.shape[0])
        if k:
            out_b[i, :k] = b
            out_l[i, :k] = lab
            valid[i, :k] = True
    return out_b, out_l, valid


class MultiBoxLoss(nn.Module):
    """SSD MultiBox loss. Call as ``loss(pred_locs (N,P,4), pred_scores (N,P,C), boxes, labels)``.

    ``boxes``: list of ``(n_i, 4)`` normalised xyxy; ``labels``: list of ``(n_i,)`` in ``1..C-1``.
    ``class_weights``: cross-entropy weight per class, background first (length C), or None.
    """

    def __init__(
        self,
        priors_cxcy: torch.Tensor,
        threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        alpha: float = 1.0,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        loc_loss: LocLoss = "l1",
        focal_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if neg_pos_ratio < 0 or alpha < 0 or focal_gamma < 0 or not 0 <= label_smoothing < 1:
            raise ValueError("neg_pos_ratio, alpha and focal_gamma must be >= 0; label_smoothing in [0, 1)")
        if loc_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"loc_loss must be 'l1' or 'smooth_l1', got {loc_loss!r}")
        self.register_buffer("priors_cxcy", priors_cxcy.float().clone(), persistent=False)
        self.register_buffer("priors_xy", cxcywh_to_xyxy(priors_cxcy.float()), persistent=False)
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.threshold = threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.loc_loss = loc_loss
        self.focal_gamma = focal_gamma
        self.label_smoothing = label_smoothing

    @torch.no_grad()
    def match(self, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prior class targets ``(N, P)`` (0 = background) and encoded box targets ``(N, P, 4)``.

        IoU is computed once for the batch's K real objects ``(K, P)`` and scattered into an ``(N, M, P)``
        layout padded with -1, so padding costs a fill, not IoU arithmetic.
        """
        device = self.priors_xy.device
        gt_boxes, gt_labels, valid = pad_targets(boxes, labels, device)
        n, m = gt_labels.shape
        p = self.priors_xy.shape[0]
        flat_valid = valid.reshape(-1)
        iou_real = box_iou(gt_boxes.reshape(-1, 4)[flat_valid], self.priors_xy)  # (K, P)
        iou = torch.full((n * m, p), -1.0, device=device)
        iou[flat_valid] = iou_real
        iou = iou.view(n, m, p)
        best_iou, best_obj = iou.max(dim=1)  # each prior's best object
        best_prior = torch.zeros(n * m, dtype=torch.long, device=device)
        best_prior[flat_valid] = iou_real.argmax(dim=1)  # each object's best prior
        best_prior = best_prior.view(n, m)
        # each object forces its best prior; when two objects share one, the later object wins (as in the
        # reference code's assignment order)
        obj_index = torch.arange(m, device=device).expand(n, m).masked_fill(~valid, -1)
        forced = torch.full_like(best_obj, -1).scatter_reduce_(1, best_prior, obj_index, "amax")
        is_forced = forced >= 0
        obj = torch.where(is_forced, forced, best_obj)
        overlap = torch.where(is_forced, torch.ones_like(best_iou), best_iou)
        cls_t = gt_labels.gather(1, obj).masked_fill_(overlap < self.threshold, 0)
        matched = gt_boxes.gather(1, obj[..., None].expand(-1, -1, 4))
        loc_t = encode(xyxy_to_cxcywh(matched), self.priors_cxcy)
        return cls_t, loc_t

    def forward(
        self,
        pred_locs: torch.Tensor,
        pred_scores: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
    ) -> LossOutput:
        pred_locs, pred_scores = pred_locs.float(), pred_scores.float()
        n, p, c = pred_scores.shape
        if p != self.priors_cxcy.shape[0]:
            raise ValueError(f"predictions have {p} priors, the loss was built for {self.priors_cxcy.shape[0]}")
        if self.class_weights is not None and self.class_weights.numel() != c:
            raise ValueError(f"class_weights has {self.class_weights.numel()} entries for {c} classes")
        cls_t, loc_t = self.match(boxes, labels)
        pos = cls_t > 0
        n_pos_img = pos.sum(1)
        n_pos = int(n_pos_img.sum())
        denom = max(n_pos, 1)

        ce = F.cross_entropy(pred_scores.reshape(-1, c), cls_t.reshape(-1), weight=self.class_weights,
                             reduction="none", label_smoothing=self.label_smoothing).view(n, p)
        if self.focal_gamma > 0:
            p_t = F.softmax(pred_scores, -1).gather(2, cls_t[..., None]).squeeze(2)
            ce = ce * (1.0 - p_t).clamp(min=0).pow(self.focal_gamma)

        # hard negative mining: the top (neg_pos_ratio * positives) negatives of each image
        neg_ce = ce.masked_fill(pos, 0.0)
        # the reference keeps negatives ranked below ratio x positives: a fractional bound rounds up
        n_hard = (n_pos_img.float() * self.neg_pos_ratio).ceil().long().clamp(max=p)
        k = int(n_hard.max()) if n else 0
        conf_sum = (ce * pos).sum()
        if k > 0:
            hard_idx = neg_ce.detach().topk(k, dim=1, sorted=True).indices
            keep = torch.arange(k, device=ce.device)[None, :] < n_hard[:, None]
            conf_sum = conf_sum + (neg_ce.gather(1, hard_idx) * keep).sum()
        conf = conf_sum / denom

        if n_pos == 0:
            loc = pred_locs.sum() * 0.0
        elif self.loc_loss == "l1":
            loc = F.l1_loss(pred_locs[pos], loc_t[pos])
        else:
            loc = F.smooth_l1_loss(pred_locs[pos], loc_t[pos], reduction="sum") / denom
        return LossOutput(total=conf + self.alpha * loc, conf=conf, loc=loc, n_positives=n_pos)
