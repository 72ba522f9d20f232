"""Light feature pyramids between a backbone and the SSDLite heads: a top-down FPN, and PAN (FPN + bottom-up).

Small faces dominate the face-mask data (median box 0.5% of the image). Without a neck each map predicts from
its own backbone stage: the stride-8 map sees 40 channels and no context from deeper stages. The FPN gives every
level the deeper stages' semantics (1x1 laterals to ``channels``, nearest upsampling + add, a depthwise-separable
3x3 per level); PAN then carries the fine levels' localisation back up (depthwise stride-2 convs + add).

Every op is a convolution, BatchNorm, ReLU6, nearest resize or add: NHWC (channels_last) friendly and
ONNX-exportable (opset 17).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from maskssd.errors import MaskSSDError
from maskssd.ssd.backbones import conv_bn

__all__ = ["NECKS", "FPN", "NeckKind", "build_neck"]

NeckKind = Literal["none", "fpn", "pan"]
NECKS: tuple[str, ...] = ("none", "fpn", "pan")


def _lateral(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv + BN (no activation: the sum with the upsampled level is what gets activated)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def _dw_separable(c: int) -> nn.Sequential:
    """3x3 depthwise + BN + ReLU6, then 1x1 + BN + ReLU6."""
    return nn.Sequential(conv_bn(c, c, 3, 1, groups=c), conv_bn(c, c, 1))


def _resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` resized (nearest) to ``ref``'s height and width; as it is when they already agree (a traced export
    keeps the resize, an identity there, rather than a branch on traced sizes)."""
    if not torch.jit.is_tracing() and x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class FPN(nn.Module):
    """Top-down pyramid over maps ordered finest first; ``bottom_up`` adds PAN's bottom-up path.

    Returns one map of ``channels`` channels per input map, at the input maps' sizes.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 64, bottom_up: bool = False):
        super().__init__()
        if len(in_channels) < 2:
            raise MaskSSDError(f"a feature pyramid needs at least two backbone maps, got {len(in_channels)}")
        n = len(in_channels)
        self.lateral = nn.ModuleList(_lateral(c, channels) for c in in_channels)
        self.smooth = nn.ModuleList(_dw_separable(channels) for _ in range(n))
        self.bottom_up = bottom_up
        if bottom_up:
            self.down = nn.ModuleList(
                conv_bn(channels, channels, 3, 2, groups=channels) for _ in range(n - 1)
            )
            self.pan_smooth = nn.ModuleList(_dw_separable(channels) for _ in range(n - 1))
        self.out_channels = [channels] * n

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [m(f) for m, f in zip(self.lateral, feats)]
        top_down = [lat[-1]]
        for x in reversed(lat[:-1]):
            top_down.append(x + _resize_to(top_down[-1], x))
        out = [m(x) for m, x in zip(self.smooth, reversed(top_down))]
        if not self.bottom_up:
            return out
        pan = [out[0]]
        for i in range(1, len(out)):
            pan.append(self.pan_smooth[i - 1](out[i] + _resize_to(self.down[i - 1](pan[-1]), out[i])))
        return pan


def build_neck(kind: str, in_channels: Sequence[int], channels: int = 64) -> FPN | None:
    """The neck of ``model.neck``: None for ``"none"``, else an :class:`FPN` (``"pan"``: with the bottom-up path)."""
    if kind not in NECKS:
        raise MaskSSDError(f"unknown neck {kind!r}; known: {', '.join(NECKS)}")
    if kind == "none":
        return None
    if channels < 8:
        raise MaskSSDError(f"neck_channels must be >= 8, got {channels}")
    return FPN(in_channels, channels, bottom_up=kind == "pan")
