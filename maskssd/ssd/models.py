"""SSD detectors built by name (timm-style registry): the paper's SSD300-VGG16, SSDLite variants, a tiny model.

``build_model(name, **keywords)`` refuses keywords its builder does not take (so a config's unknown
``[model]`` key is an error, not silently ignored); ``build_args`` keeps what rebuilds the model.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from maskssd.errors import MaskSSDError
from maskssd.ssd.backbones import (
    Backbone,
    BNMode,
    EfficientNetLiteFeatures,
    MobileNetV3Features,
    TinyBackbone,
)
from maskssd.ssd.detector import SSDDetector
from maskssd.ssd.necks import NeckKind, build_neck
from maskssd.ssd.ssd300 import SSD300VGG16, load_reference_checkpoint
from maskssd.ssd.ssdlite import SSDLite

__all__ = ["build_model", "list_models", "model_keywords", "register_model"]

# ----------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., SSDDetector]] = {}


def register_model(name: str) -> Callable[[Callable[..., SSDDetector]], Callable[..., SSDDetector]]:
    """Register a builder under ``name`` (``build_model(name, ...)``); re-registering a name warns."""

    def deco(fn: Callable[..., SSDDetector]) -> Callable[..., SSDDetector]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            warnings.warn(
                f"model {name!r} is registered again: {fn.__module__}.{fn.__qualname__} replaces "
                f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}",
                stacklevel=2,
            )
        _REGISTRY[name] = fn
        return fn

    return deco


def model_keywords(name: str) -> list[str]:
    """The keywords the builder of ``name`` accepts (besides ``num_classes``)."""
    if name not in _REGISTRY:
        raise MaskSSDError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    params = inspect.signature(_REGISTRY[name]).parameters
    return [k for k, p in params.items() if k != "num_classes" and p.kind is not p.VAR_KEYWORD]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int = 4, **kwargs: Any) -> SSDDetector:
    """Build a registered detector; ``build_args`` keeps what rebuilds it (for checkpoints and serving)."""
    allowed = model_keywords(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise MaskSSDError(
            f"model {name!r} takes no {', '.join(map(repr, unknown))}; its keywords: {', '.join(allowed)}"
        )
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.build_args = {"name": name, "num_classes": num_classes, **kwargs}
    return model


@register_model("ssd300_vgg16")
def ssd300_vgg16(
    num_classes: int = 4,
    pretrained: bool = False,
    init_checkpoint: str | None = None,
    freeze_stages: int = 0,
    input_size: int = 300,
    class_names: Sequence[str] | None = None,
) -> SSD300VGG16:
    """The paper's SSD300. ``pretrained``: ImageNet VGG16 from the torch cache; ``init_checkpoint``: a tutorial
    checkpoint (the paper's Pascal VOC start, or a model trained with the paper's code), class heads dropped
    when their shape differs and mapped by name onto ``class_names`` when it is the same
    (:func:`load_reference_checkpoint`, whose report is kept as ``model.init_report``)."""
    if input_size != 300:
        raise MaskSSDError(
            "ssd300_vgg16 takes 300x300 inputs (its priors are fixed); set model.input_size = 300"
        )
    model = SSD300VGG16(num_classes)
    if pretrained:
        model.base.load_imagenet()
    if init_checkpoint:
        model.init_report = load_reference_checkpoint(model, init_checkpoint, class_names)
    model.base.freeze_stages(freeze_stages)
    return model


def _ssdlite(
    backbone: Backbone,
    *,
    num_classes: int,
    input_size: int,
    freeze_stages: int,
    bn_mode: BNMode,
    extra_channels: Sequence[int],
    min_scale: float,
    max_scale: float,
    aspect_ratios: Sequence[float],
    scales: Sequence[float] | None,
    neck: NeckKind = "none",
    neck_channels: int = 64,
) -> SSDLite:
    backbone.configure(freeze_stages, bn_mode)
    return SSDLite(
        backbone,
        extra_channels=extra_channels,
        num_classes=num_classes,
        input_size=input_size,
        min_scale=min_scale,
        max_scale=max_scale,
        aspect_ratios=aspect_ratios,
        scales=scales,
        neck=build_neck(neck, backbone.out_channels, neck_channels),
    )


#: The options every SSDLite builder takes and passes on to :func:`_ssdlite` unchanged.
_SSDLITE_OPTIONS = (
    "num_classes",
    "input_size",
    "freeze_stages",
    "bn_mode",
    "extra_channels",
    "min_scale",
    "max_scale",
    "aspect_ratios",
    "scales",
    "neck",
    "neck_channels",
)


def _ssdlite_options(scope: dict[str, Any]) -> dict[str, Any]:
    """The shared SSDLite options out of a builder's arguments (its ``locals()``)."""
    return {k: scope[k] for k in _SSDLITE_OPTIONS}


def _check_stride4(neck: NeckKind, stride4: bool) -> None:
    if stride4 and neck == "none":
        raise MaskSSDError(
            'model.stride4 needs model.neck = "fpn" or "pan": the stride-4 stage alone '
            "(few channels, no context from deeper stages) is too weak a map to predict from"
        )


def _effnet_builder(variant: int, doc: str) -> Callable[..., SSDLite]:
    """The builder of ``ssdlite_effnet_lite{variant}``: explicit keywords (unknown config keys are refused)."""

    def builder(
        num_classes: int = 4,
        input_size: int = 320,
        pretrained: bool = True,
        freeze_stages: int = 0,
        bn_mode: BNMode = "frozen_stages",
        min_scale: float = 0.05,
        max_scale: float = 0.95,
        aspect_ratios: Sequence[float] = (2.0, 0.5, 3.0, 1 / 3),
        extra_channels: Sequence[int] = (256, 256, 128),
        scales: Sequence[float] | None = None,
        neck: NeckKind = "none",
        neck_channels: int = 64,
        stride4: bool = False,
    ) -> SSDLite:
        _check_stride4(neck, stride4)
        return _ssdlite(
            EfficientNetLiteFeatures(variant, pretrained, stride4),
            **_ssdlite_options(locals()),
        )

    builder.__name__ = builder.__qualname__ = f"ssdlite_effnet_lite{variant}"
    builder.__doc__ = doc
    return builder


ssdlite_effnet_lite0 = register_model("ssdlite_effnet_lite0")(
    _effnet_builder(
        0,
        """SSDLite on ImageNet
EfficientNet-Lite0 (offline weights), maps at strides 8-32 plus extras.

Options (all SSDLite models): ``freeze_stages``, ``bn_mode``, ``min_scale``/``max_scale`` or ``scales``,
``aspect_ratios``, ``extra_channels``, ``neck`` ("none" | "fpn" | "pan") with ``neck_channels`` (64), and
``stride4`` (a neck level on the stride-4 stage too: one more feature map).""",
    )
)
ssdlite_effnet_lite1 = register_model("ssdlite_effnet_lite1")(
    _effnet_builder(
        1,
        """SSDLite on ImageNet
EfficientNet-Lite1 (offline weights; Lite0's widths, deeper): as ssdlite_effnet_lite0.""",
    )
)
ssdlite_effnet_lite2 = register_model("ssdlite_effnet_lite2")(
    _effnet_builder(
        2,
        """SSDLite on ImageNet
EfficientNet-Lite2 (offline weights; deeper and wider: 48/120/352 channels): as ssdlite_effnet_lite0.""",
    )
)


@register_model("ssdlite_mobilenet_v3")
def ssdlite_mobilenet_v3(
    num_classes: int = 4,
    input_size: int = 320,
    pretrained: bool = False,
    freeze_stages: int = 0,
    bn_mode: BNMode = "frozen_stages",
    min_scale: float = 0.2,
    max_scale: float = 0.95,
    aspect_ratios: Sequence[float] = (2.0, 0.5, 3.0, 1 / 3),
    extra_channels: Sequence[int] = (512, 256, 256, 128),
    scales: Sequence[float] | None = None,
    neck: NeckKind = "none",
    neck_channels: int = 64,
    stride4: bool = False,
) -> SSDLite:
    """SSDLite on torchvision's MobileNetV3-Large (ImageNet weights when cached), as ssdlite320_mobilenet_v3_large."""
    if stride4:
        raise MaskSSDError(
            "ssdlite_mobilenet_v3 predicts from strides 16 and 32 only: model.stride4 is not available"
        )
    return _ssdlite(
        MobileNetV3Features(pretrained),
        **_ssdlite_options(locals()),
    )


@register_model("tiny")
def tiny(
    num_classes: int = 4,
    input_size: int = 128,
    width: int = 16,
    freeze_stages: int = 0,
    bn_mode: BNMode = "train",
    min_scale: float = 0.1,
    max_scale: float = 0.9,
    aspect_ratios: Sequence[float] = (2.0, 0.5),
    extra_channels: Sequence[int] = (64, 64),
    scales: Sequence[float] | None = None,
    pretrained: bool = False,
    neck: NeckKind = "none",
    neck_channels: int = 64,
    stride4: bool = False,
) -> SSDLite:
    """A few hundred thousand parameters: tests and the synthetic quickstart on a 2-core CPU."""
    _check_stride4(neck, stride4)
    return _ssdlite(
        TinyBackbone(width, stride4),
        **_ssdlite_options(locals()),
    )
