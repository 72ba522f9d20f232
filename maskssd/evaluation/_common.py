"""What the evaluation modules share: input checks, flattening per-image lists, aligned IoU, slot indices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_lengths(**lists: Sequence[object]) -> int:
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-image inputs must have one entry per image, got lengths {lengths}")
    return next(iter(lengths.values()), 0)


def flatten(boxes: Sequence[Tensor], *per_box: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Concatenate per-image tensors: ``(boxes (N, 4) float64, image index (N,), [other fields])``."""
    counts = torch.tensor([int(torch.as_tensor(b).reshape(-1, 4).shape[0]) for b in boxes], dtype=torch.long)
    image = torch.repeat_interleave(torch.arange(len(boxes)), counts)
    if len(boxes) == 0:
        return torch.zeros((0, 4), dtype=torch.float64), image, [torch.zeros(0) for _ in per_box]
    flat_boxes = torch.cat([torch.as_tensor(b).detach().cpu().reshape(-1, 4).double() for b in boxes])
    fields = [
        torch.cat([torch.as_tensor(t).detach().cpu().reshape(-1) for t in field_]) for field_ in per_box
    ]
    for f in fields:
        if f.shape[0] != flat_boxes.shape[0]:
            raise ValueError("every per-image tensor must have one entry per box")
    return flat_boxes, image, fields


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
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


def slots(image: Tensor, n_images: int) -> tuple[Tensor, int]:
    """Position of each object within its image (``image`` sorted ascending) and the max per image."""
    counts = torch.bincount(image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(image.shape[0]) - starts[image]
    return slot, int(counts.max()) if counts.numel() else 0


def nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
