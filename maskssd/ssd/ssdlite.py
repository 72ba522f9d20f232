"""SSDLite: a backbone's maps (optionally through a feature pyramid) plus depthwise-separable extra layers and
heads (MobileNetV2 paper, sec. 6.3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from maskssd.errors import MaskSSDError
from maskssd.ssd.backbones import Backbone, conv_bn
from maskssd.ssd.detector import SSDDetector
from maskssd.ssd.priors import PriorSpec

__all__ = ["SSDLite"]


def _dw_extra(cin: int, cout: int) -> nn.Sequential:
    """SSDLite extra layer: 1x1 to cout/2, 3x3 depthwise stride 2, 1x1 to cout."""
    mid = cout // 2
    return nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, 2, groups=mid), conv_bn(mid, cout, 1))


def _dw_pred(cin: int, cout: int) -> nn.Sequential:
    """SSDLite prediction block: 3x3 depthwise + BN + ReLU6, then a 1x1 projection."""
    return nn.Sequential(conv_bn(cin, cin, 3, 1, groups=cin), nn.Conv2d(cin, cout, 1))


def _probe_sizes(backbone: Backbone, extras: nn.ModuleList, input_size: int) -> list[int]:
    """The side of each map (backbone, then extras) for a square input: a forward of zeros in eval mode (the
    backbone's mode is restored, the extras are left in eval mode)."""
    with torch.no_grad():
        probe_mode = backbone.training
        backbone.eval()
        x = backbone(torch.zeros(1, 3, input_size, input_size, device=next(backbone.parameters()).device))
        fmaps = [f.shape[-1] for f in x]
        y = x[-1]
        for e in extras.eval():
            y = e(y)
            fmaps.append(y.shape[-1])
        backbone.train(probe_mode)
    return fmaps


class SSDLite(SSDDetector):
    """SSDLite: a backbone's maps plus depthwise-separable extra layers and heads (MobileNetV2 paper, sec. 6.3).

    ``neck`` (an :class:`maskssd.necks.FPN`, or None) turns the backbone's maps into a pyramid of the same sizes
    before the heads; the extra layers still start from the backbone's deepest map (as RetinaNet's P6 from C5),
    so they are the same with or without a neck.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        extra_channels: Sequence[int],
        num_classes: int,
        input_size: int,
        min_scale: float = 0.1,
        max_scale: float = 0.95,
        aspect_ratios: Sequence[float] = (2.0, 0.5, 3.0, 1 / 3),
        background_prior: float = 0.99,
        scales: Sequence[float] | None = None,
        neck: nn.Module | None = None,
    ):
        channels = list(backbone.out_channels)
        extras = []
        for c in extra_channels:
            extras.append(_dw_extra(channels[-1], c))
            channels.append(c)
        extras_m = nn.ModuleList(extras)
        fmaps = _probe_sizes(backbone, extras_m, input_size)  # feature-map sizes of this input size
        ratios = tuple(tuple(aspect_ratios) for _ in fmaps)
        if scales is not None:
            if len(scales) != len(fmaps):
                raise MaskSSDError(
                    f"model.scales needs one scale per feature map ({len(fmaps)}), got {len(scales)}"
                )
            spec = PriorSpec(tuple(fmaps), tuple(scales), ratios)
        else:
            spec = PriorSpec.linear(fmaps, min_scale, max_scale, ratios)
        super().__init__(num_classes, input_size, spec, backbone.mean, backbone.std)
        self.backbone = backbone
        self.neck = neck  # None registers nothing: a model without a neck keeps its state-dict keys
        if neck is not None:
            channels[: len(backbone.out_channels)] = neck.out_channels
        self.extras = extras_m
        nb = spec.boxes_per_location
        self.loc_head = nn.ModuleList(_dw_pred(c, b * 4) for c, b in zip(channels, nb))
        self.cls_head = nn.ModuleList(_dw_pred(c, b * num_classes) for c, b in zip(channels, nb))
        own = [
            *(neck.modules() if neck is not None else ()),
            *self.extras.modules(),
            *self.loc_head.modules(),
            *self.cls_head.modules(),
        ]
        for m in own:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.03)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # start with p(background) ~= background_prior: a stable start on images that are mostly background
        bias = math.log(background_prior * (num_classes - 1) / (1 - background_prior))
        for head, b in zip(self.cls_head, nb):
            head[-1].bias.data.view(b, num_classes)[:, 0] = bias

    def feature_map_sizes(self, input_size: int) -> tuple[int, ...]:
        """The side of each feature map at ``input_size``: the model is fully convolutional, any size works.
        Every module's train/eval mode is as before afterwards."""
        modes = [(m, m.training) for m in self.modules()]
        try:
            return tuple(_probe_sizes(self.backbone, self.extras, input_size))
        finally:
            for m, mode in modes:
                m.training = mode

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(self.normalize(images))
        x = feats[-1]
        if self.neck is not None:
            feats = self.neck(feats)
        for e in self.extras:
            x = e(x)
            feats.append(x)
        n, c = images.shape[0], self.num_classes
        locs = [h(f).permute(0, 2, 3, 1).reshape(n, -1, 4) for h, f in zip(self.loc_head, feats)]
        cls = [h(f).permute(0, 2, 3, 1).reshape(n, -1, c) for h, f in zip(self.cls_head, feats)]
        return torch.cat(locs, 1), torch.cat(cls, 1)
