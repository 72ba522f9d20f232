"""Default boxes (priors) and SSD centre-size box coding.

Priors are ``(cx, cy, w, h)`` in normalised image coordinates, ordered feature map by feature map,
then row, column and aspect ratio: the order in which the prediction heads flatten their outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Variances of the centre-size encoding (the SSD papers' 0.1 for centres, 0.2 for sizes).
VARIANCES: tuple[float, float] = (0.1, 0.2)


@dataclass(frozen=True)
class PriorSpec:
    """Default boxes of an SSD: one entry per feature map.

    ``aspect_ratios[k]`` lists the ratios besides 1 of map ``k``; each map also gets an extra square box
    of scale ``sqrt(s_k * s_{k+1})`` (``extra_scale_last`` for the last map). ``(1, 2, 0.5)`` in the
    SSD300 spec is written here as ``(2.0, 0.5)``.
    """

    feature_maps: tuple[int, ...]
    scales: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    extra_scale_last: float = 1.0
    clip: bool = True

    def __post_init__(self) -> None:
        n = len(self.feature_maps)
        if not (len(self.scales) == len(self.aspect_ratios) == n):
            raise ValueError("feature_maps, scales and aspect_ratios need one entry per feature map")
        if any(not 0 < s <= 1.5 for s in self.scales):
            raise ValueError(f"scales must lie in (0, 1.5], got {self.scales}")

    @property
    def boxes_per_location(self) -> list[int]:
        return [2 + len(r) for r in self.aspect_ratios]

    @property
    def num_priors(self) -> int:
        return sum(f * f * b for f, b in zip(self.feature_maps, self.boxes_per_location))

    def priors(self) -> torch.Tensor:
        """All default boxes, ``(P, 4)`` cxcywh, in head order."""
        out = []
        for k, (fmap, scale, ratios) in enumerate(zip(self.feature_maps, self.scales, self.aspect_ratios)):
            # the extra square box: between this scale and the next; the last map's is extra_scale_last itself
            extra = (
                math.sqrt(scale * self.scales[k + 1]) if k + 1 < len(self.scales) else self.extra_scale_last
            )
            whs = [(scale, scale), (extra, extra)]
            whs += [(scale * math.sqrt(r), scale / math.sqrt(r)) for r in ratios]
            # the tutorial puts the extra square box right after ratio 1
            wh = torch.tensor(whs, dtype=torch.float32)  # (B, 2)
            centres = (torch.arange(fmap, dtype=torch.float32) + 0.5) / fmap
            cy, cx = torch.meshgrid(centres, centres, indexing="ij")
            c = torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, len(whs), 2)
            out.append(torch.cat([c, wh.expand(c.shape[0], -1, -1)], -1).reshape(-1, 4))
        priors = torch.cat(out)
        return priors.clamp_(0.0, 1.0) if self.clip else priors

    @classmethod
    def ssd300(cls) -> PriorSpec:
        """The SSD300 (VGG16) spec of the SSD paper and the reference paper: 8732 priors."""
        return cls(
            feature_maps=(38, 19, 10, 5, 3, 1),
            scales=(0.1, 0.2, 0.375, 0.55, 0.725, 0.9),
            aspect_ratios=(
                (2.0, 0.5),
                (2.0, 3.0, 0.5, 0.333),
                (2.0, 3.0, 0.5, 0.333),
                (2.0, 3.0, 0.5, 0.333),
                (2.0, 0.5),
                (2.0, 0.5),
            ),  # 0.333 as in the paper's code
        )

    @classmethod
    def linear(
        cls,
        feature_maps: Sequence[int],
        min_scale: float,
        max_scale: float,
        aspect_ratios: Sequence[Sequence[float]] | None = None,
    ) -> PriorSpec:
        """Scales spaced linearly from ``min_scale`` to ``max_scale`` (the SSD paper's rule)."""
        n = len(feature_maps)
        scales = [min_scale + (max_scale - min_scale) * k / max(n - 1, 1) for k in range(n)]
        ratios = aspect_ratios or [(2.0, 0.5)] * n
        return cls(tuple(feature_maps), tuple(scales), tuple(tuple(r) for r in ratios))


# ------------------------------------------------------------------------------------------- coding
def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def encode(
    boxes_cxcywh: torch.Tensor, priors_cxcywh: torch.Tensor, variances: tuple[float, float] = VARIANCES
) -> torch.Tensor:
    """Boxes -> offsets ``(g_cx, g_cy, g_w, g_h)`` w.r.t. priors (broadcasts over leading dims)."""
    centre = (boxes_cxcywh[..., :2] - priors_cxcywh[..., :2]) / (priors_cxcywh[..., 2:] * variances[0])
    size = torch.log(boxes_cxcywh[..., 2:].clamp(min=1e-8) / priors_cxcywh[..., 2:]) / variances[1]
    return torch.cat([centre, size], -1)


def decode(
    offsets: torch.Tensor, priors_cxcywh: torch.Tensor, variances: tuple[float, float] = VARIANCES
) -> torch.Tensor:
    """Offsets -> boxes ``cxcywh`` (inverse of :func:`encode`; batched over leading dims)."""
    centre = offsets[..., :2] * variances[0] * priors_cxcywh[..., 2:] + priors_cxcywh[..., :2]
    size = torch.exp(offsets[..., 2:] * variances[1]) * priors_cxcywh[..., 2:]
    return torch.cat([centre, size], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes, batched: ``a (..., M, 4)``, ``b (..., P, 4)`` -> ``(..., M, P)``.

    Works coordinate by coordinate with in-place ops: no ``(M, P, 2)`` temporaries, about 5x faster than the
    textbook broadcast on CPU, where this is memory-bound.
    """
    ax1, ay1, ax2, ay2 = (t[..., :, None] for t in a.unbind(-1))
    bx1, by1, bx2, by2 = (t[..., None, :] for t in b.unbind(-1))
    inter = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    inter.mul_(torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0))
    union = ((ax2 - ax1) * (ay2 - ay1)).add((bx2 - bx1) * (by2 - by1)).sub_(inter)
    return inter.div_(union.clamp_(min=1e-12))


class PriorIoU:
    """IoU of any boxes against one fixed set of priors, exploiting that priors share their x and y extents.

    Priors laid on feature-map grids have few distinct ``(x1, x2)`` and ``(y1, y2)`` intervals (332 each
    for SSD300's 8732 priors), so the per-axis overlaps are computed on those and only their product is
    spread to every prior. The result equals :func:`box_iou` bit for bit (same operations, same order);
    prior sets without that structure fall back to :func:`box_iou`.
    """

    def __init__(self, priors_xyxy: torch.Tensor):
        self.priors = priors_xyxy
        ux, self.inv_x = torch.unique(priors_xyxy[:, [0, 2]], dim=0, return_inverse=True)
        uy, self.inv_y = torch.unique(priors_xyxy[:, [1, 3]], dim=0, return_inverse=True)
        self.ux1, self.ux2 = ux.unbind(1)
        self.uy1, self.uy2 = uy.unbind(1)
        self.area = (priors_xyxy[:, 2] - priors_xyxy[:, 0]) * (priors_xyxy[:, 3] - priors_xyxy[:, 1])
        self.factored = len(ux) + len(uy) < priors_xyxy.shape[0] // 4

    def to(self, device: torch.device) -> PriorIoU:
        return self if self.priors.device == device else PriorIoU(self.priors.to(device))

    def __call__(self, boxes: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """``boxes (K, 4)`` xyxy -> IoU ``(K, P)``.

        ``reuse=True`` writes into buffers kept between calls (the next call overwrites the result): on CPU,
        fresh multi-megabyte tensors cost more in page faults than the arithmetic does.
        """
        if not self.factored:
            return box_iou(boxes, self.priors)
        k, n = boxes.shape[0], self.inv_x.shape[0]
        inter, union = self._buffers(k, boxes.dtype, reuse)
        x1, y1, x2, y2 = (t[:, None] for t in boxes.unbind(-1))
        ix = torch.minimum(x2, self.ux2).sub_(torch.maximum(x1, self.ux1)).clamp_(min=0)
        iy = torch.minimum(y2, self.uy2).sub_(torch.maximum(y1, self.uy1)).clamp_(min=0)
        # gather with an expanded index: 2x faster than index_select along dim 1 on CPU
        torch.gather(ix, 1, self.inv_x.expand(k, n), out=inter)
        inter.mul_(torch.gather(iy, 1, self.inv_y.expand(k, n), out=union))
        torch.add((x2 - x1) * (y2 - y1), self.area, out=union).sub_(inter)
        return inter.div_(union.clamp_(min=1e-12))

    def _buffers(self, k: int, dtype: torch.dtype, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.inv_x.shape[0]
        if not reuse:
            return (self.priors.new_empty((k, n), dtype=dtype), self.priors.new_empty((k, n), dtype=dtype))
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape[1] < k or buf.dtype != dtype:
            buf = self._buf = self.priors.new_empty((2, max(k, 64), n), dtype=dtype)
        return buf[0, :k], buf[1, :k]
