"""SSD detectors built by name (timm-style registry): the paper's SSD300-VGG16, SSDLite variants, a tiny model.

Every detector takes float images in [0, 1] of shape ``(N, 3, S, S)`` (it normalises internally, so exported
models need no preprocessing beyond resizing) and returns ``(locs (N, P, 4), scores (N, P, C))`` ordered like
its ``priors_cxcy`` buffer.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskssd.errors import MaskSSDError, PretrainedWeightsMissing
from maskssd.ssd.backbones import (
    Backbone,
    BNMode,
    EfficientNetLiteFeatures,
    MobileNetV3Features,
    TinyBackbone,
    VGG16Base,
    conv_bn,
)
from maskssd.ssd.necks import NeckKind, build_neck
from maskssd.ssd.postprocess import DecodeSpec, Detections, postprocess
from maskssd.ssd.priors import PriorSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SSDDetector(nn.Module):
    """Common interface of maskssd detectors."""

    def __init__(self, num_classes: int, input_size: int, prior_spec: PriorSpec,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.num_classes = num_classes
        self.input_size = input_size
        self.prior_spec = prior_spec
        self.build_args: dict[str, Any] = {}
        self.register_buffer("priors_cxcy", prior_spec.priors(), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    @torch.no_grad()
    def detect(self, images: torch.Tensor, spec: DecodeSpec = DecodeSpec(),
               sizes: torch.Tensor | None = None) -> list[Detections]:
        """Forward + decode + NMS; boxes in original pixels when ``sizes`` (N, 2) (width, height) is given."""
        locs, scores = self(images)
        return postprocess(locs, scores, self.priors_cxcy, spec, sizes)


# ------------------------------------------------------------------------------------ SSD300-VGG16
class AuxiliaryConvolutions(nn.Module):
    """SSD300's extra layers after conv7 (tutorial names: conv8_1 ... conv11_2)."""

    def __init__(self) -> None:
        super().__init__()
        c = nn.Conv2d
        self.conv8_1, self.conv8_2 = c(1024, 256, 1), c(256, 512, 3, stride=2, padding=1)
        self.conv9_1, self.conv9_2 = c(512, 128, 1), c(128, 256, 3, stride=2, padding=1)
        self.conv10_1, self.conv10_2 = c(256, 128, 1), c(128, 256, 3)
        self.conv11_1, self.conv11_2 = c(256, 128, 1), c(128, 256, 3)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, conv7: torch.Tensor) -> list[torch.Tensor]:
        r, out, x = torch.relu, [], conv7
        for a, b in (("conv8_1", "conv8_2"), ("conv9_1", "conv9_2"), ("conv10_1", "conv10_2"), ("conv11_1", "conv11_2")):
            x = r(getattr(self, b)(r(getattr(self, a)(x))))
            out.append(x)
        return out


class PredictionConvolutions(nn.Module):
    """SSD300's 3x3 location and class heads on the six maps (tutorial names: loc_conv4_3, cl_conv4_3, ...)."""

    MAPS = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
    CHANNELS = (512, 1024, 512, 256, 256, 256)

    def __init__(self, num_classes: int, boxes_per_location: Sequence[int]):
        super().__init__()
        self.num_classes = num_classes
        for name, cin, nb in zip(self.MAPS, self.CHANNELS, boxes_per_location):
            setattr(self, f"loc_{name}", nn.Conv2d(cin, nb * 4, 3, padding=1))
            setattr(self, f"cl_{name}", nn.Conv2d(cin, nb * num_classes, 3, padding=1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = feats[0].shape[0]
        locs = [getattr(self, f"loc_{m}")(f).permute(0, 2, 3, 1).reshape(n, -1, 4) for m, f in zip(self.MAPS, feats)]
        cls = [getattr(self, f"cl_{m}")(f).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes)
               for m, f in zip(self.MAPS, feats)]
        return torch.cat(locs, 1), torch.cat(cls, 1)


class SSD300VGG16(SSDDetector):
    """The reference paper's network: VGG16 base, L2-normalised conv4_3 with a learned scale, 8732 priors.

    Module names follow the public PyTorch SSD300 tutorial (``base.``, ``aux_convs.``, ``pred_convs.``,
    ``rescale_factors``), whose Pascal VOC checkpoint the paper started from.
    """

    def __init__(self, num_classes: int = 4):
        spec = PriorSpec.ssd300()
        super().__init__(num_classes, 300, spec, IMAGENET_MEAN, IMAGENET_STD)
        self.base = VGG16Base()
        self.aux_convs = AuxiliaryConvolutions()
        self.pred_convs = PredictionConvolutions(num_classes, spec.boxes_per_location)
        self.rescale_factors = nn.Parameter(torch.full((1, 512, 1, 1), 20.0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv4_3, conv7 = self.base(self.normalize(images))
        norm = conv4_3.pow(2).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-10)
        conv4_3 = conv4_3 / norm * self.rescale_factors
        return self.pred_convs([conv4_3, conv7, *self.aux_convs(conv7)])


#: The reference paper's label map after background (its fork of the tutorial's ``utils.py``): the class
#: order of a 4-class tutorial-layout checkpoint, assumed when the file does not name its classes.
PAPER_CLASSES: tuple[str, ...] = ("with_mask", "mask_weared_incorrect", "without_mask")


def reference_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tutorial-layout SSD300 state dict in a loaded checkpoint, or None: a plain state dict, or one under
    ``model_state_dict`` (the paper's training script), ``model`` (the tutorial, whose whole pickled module
    :func:`maskssd.ssd.safe_load.safe_load` turns into its state dict; maskssd's own checkpoints) or ``state_dict``."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict):
        return None
    if "pred_convs.cl_conv4_3.weight" in obj and "base.conv1_1.weight" in obj:
        return obj
    for key in ("model_state_dict", "model", "state_dict"):
        if key in obj:
            found = reference_state_dict(obj[key])
            if found is not None:
                return found
    return None


def reference_num_classes(state: dict[str, torch.Tensor]) -> int:
    """Classes (background included) of a tutorial-layout state dict, from its conv4_3 class head."""
    return int(state["pred_convs.cl_conv4_3.weight"].shape[0]) // PriorSpec.ssd300().boxes_per_location[0]


def reorder_class_heads(state: dict[str, torch.Tensor], source: Sequence[str],
                        target: Sequence[str]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose class heads (``pred_convs.cl_*``) output ``target``'s classes: their output
    channels (``box * n_classes + class``, background first) permuted from ``source``'s order, by name."""
    if sorted(source) != sorted(target):
        raise MaskSSDError(f"cannot map classes {list(source)} onto {list(target)}: the names differ")
    order = [0] + [1 + list(source).index(c) for c in target]
    n = len(order)
    out = dict(state)
    for key, t in state.items():
        if key.startswith("pred_convs.cl_") and key.endswith((".weight", ".bias")):
            out[key] = t.reshape(t.shape[0] // n, n, *t.shape[1:])[:, order].reshape(t.shape).clone()
    return out


def _source_classes(obj: Any, n_classes: int) -> tuple[tuple[str, ...] | None, bool]:
    """The class order (after background) of a loaded checkpoint and whether it was assumed: maskssd's own
    name theirs; a 4-class tutorial-layout one is taken to be the paper's; others are unknown (None)."""
    if isinstance(obj, dict) and isinstance(obj.get("class_names"), list | tuple) and \
            len(obj["class_names"]) + 1 == n_classes:
        return tuple(obj["class_names"]), False
    if n_classes == len(PAPER_CLASSES) + 1:
        return PAPER_CLASSES, True
    return None, False


def load_reference_checkpoint(model: nn.Module, source: str | Path | dict,
                              class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Load a tutorial-layout SSD300 checkpoint, dropping tensors whose shape differs (the class heads when
    the number of classes changes), as the reference paper did. Returns what was loaded and dropped.

    Files are read by :func:`maskssd.ssd.safe_load.safe_load` (no pickle code runs). Class heads of the same
    shape are mapped by class name onto ``class_names`` (default: maskssd's classes for a 4-class model): a
    4-class checkpoint that does not name its classes is taken to be in the paper's label order
    (:data:`PAPER_CLASSES`), and ``class_order`` in the result says so; heads whose class names differ are
    dropped."""
    if isinstance(source, dict):
        obj: Any = source
    else:
        path = Path(source)
        if not path.is_file():
            raise PretrainedWeightsMissing(
                f"checkpoint {path} not found. The reference paper started from the PyTorch SSD300 tutorial's "
                "Pascal VOC checkpoint (ssd300_PascalVOC.pth / checkpoint_ssd300.pth.tar); put it there or unset "
                "model.init_checkpoint."
            )
        from maskssd.ssd.safe_load import safe_load

        try:
            obj = safe_load(path)
        except MaskSSDError:
            raise
        except Exception as e:  # truncated, not a torch file, ...
            raise MaskSSDError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    state = reference_state_dict(obj)
    if state is None:
        state = obj.get("model", obj) if isinstance(obj, dict) else {}
        state = state if isinstance(state, dict) else {}
    own = model.state_dict()
    class_order, names_differ = None, False
    heads = sorted(k for k in own if k.startswith("pred_convs.cl_"))
    if heads and all(k in state and state[k].shape == own[k].shape for k in heads):
        n = reference_num_classes(state)
        src, assumed = _source_classes(obj, n)
        target = tuple(class_names) if class_names is not None else \
            _default_classes() if n == len(PAPER_CLASSES) + 1 else None
        if src is not None and target is not None:
            read = "assumed the paper's label order" if assumed else "read the checkpoint's class order"
            names_differ = sorted(src) != sorted(target)
            if names_differ:
                state = {k: v for k, v in state.items() if k not in heads}
                class_order = f"the checkpoint's classes ({', '.join(src)}) are not {', '.join(target)}: class heads dropped"
            else:
                state = reorder_class_heads(state, src, target)
                class_order = f"{read} ({', '.join(src)}); class heads mapped by name to {', '.join(target)}"
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    dropped = heads if names_differ else sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    unknown = sorted(k for k in state if k not in own)
    if len(loaded) < len(own) // 2:
        raise MaskSSDError(f"checkpoint does not look like an SSD300 tutorial checkpoint: only {len(loaded)} of "
                           f"{len(own)} tensors match (unknown keys: {unknown[:5]})")
    model.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "dropped": dropped, "unknown": unknown,
            "missing": sorted(k for k in own if k not in loaded), "class_order": class_order}


def _default_classes() -> tuple[str, ...]:
    from maskssd.data import DEFAULT_CLASSES

    return DEFAULT_CLASSES


def import_reference_checkpoint(obj: Any, path: str | Path,
                                class_names: Sequence[str] | None = None) -> dict[str, Any] | None:
    """A checkpoint of the reference paper's code as a maskssd deployment checkpoint, or None when ``obj``
    holds no tutorial-layout SSD300.

    The paper's training script saves ``{'epoch', 'model_state_dict', 'optimizer', ...}``, the tutorial's
    ``{'epoch', 'model': <SSD300>, 'optimizer'}``; both have 4 classes in the paper's label order
    (:data:`PAPER_CLASSES`, assumed unless the file names them in ``class_names``), here mapped by name to
    ``class_names`` (default: maskssd's). ``import_note`` says what was assumed. A 21-class (Pascal VOC) checkpoint is the
    paper's starting point, not a face-mask model: refused with a pointer to ``model.init_checkpoint``."""
    state = reference_state_dict(obj)
    if state is None:
        return None
    n = reference_num_classes(state)
    if n == 21:
        raise MaskSSDError(f"{path}: a 21-class (Pascal VOC) SSD300 of the tutorial: the paper's starting point, "
                           "not a face-mask detector, so there is nothing to evaluate or export. Train from it: "
                           "set model.init_checkpoint to this file (model.name = \"ssd300_vgg16\")")
    if n != len(PAPER_CLASSES) + 1:
        raise MaskSSDError(f"{path}: a tutorial-layout SSD300 with {n - 1} classes; maskssd reads the paper's "
                           f"{len(PAPER_CLASSES)} face-mask classes ({', '.join(PAPER_CLASSES)})")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SSD300VGG16(n).state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k])
    if missing or wrong:
        raise MaskSSDError(f"{path}: not a complete SSD300 of the tutorial's layout (missing {missing[:3]}, "
                           f"shapes differ {wrong[:3]})")
    target = tuple(class_names) if class_names is not None else _default_classes()
    src, assumed = _source_classes(obj, n)
    assert src is not None  # 4 classes: named by the file, else the paper's
    state = reorder_class_heads({k: state[k] for k in expected}, src, target)
    epoch = obj.get("epoch", 0) if isinstance(obj, dict) else 0
    where = "model_state_dict" if isinstance(obj, dict) and "model_state_dict" in obj else "model"
    order = "assumed the paper's label order" if assumed else "read the file's class order"
    note = (f"{path} is a checkpoint of the reference paper's code (tutorial layout, 4 classes under "
            f"{where!r}); {order} ({', '.join(src)}) and mapped its classes by name to {', '.join(target)}")
    return {"format": 1, "model": state, "build_args": {"name": "ssd300_vgg16", "num_classes": n},
            "class_names": list(target), "epoch": int(epoch) if isinstance(epoch, int | float) else 0,
            "source_class_names": list(src), "import_note": note}


# ------------------------------------------------------------------------------------------ SSDLite
def _dw_extra(cin: int, cout: int) -> nn.Sequential:
    """SSDLite extra layer: 1x1 to cout/2, 3x3 depthwise stride 2, 1x1 to cout."""
    mid = cout // 2
    return nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, 2, groups=mid), conv_bn(mid, cout, 1))


def _dw_pred(cin: int, cout: int) -> nn.Sequential:
    """SSDLite prediction block: 3x3 depthwise + BN + ReLU6, then a 1x1 projection."""
    return nn.Sequential(conv_bn(cin, cin, 3, 1, groups=cin), nn.Conv2d(cin, cout, 1))


class SSDLite(SSDDetector):
    """SSDLite: a backbone's maps plus depthwise-separable extra layers and heads (MobileNetV2 paper, sec. 6.3).

    ``neck`` (an :class:`maskssd.necks.FPN`, or None) turns the backbone's maps into a pyramid of the same sizes
    before the heads; the extra layers still start from the backbone's deepest map (as RetinaNet's P6 from C5),
    so they are the same with or without a neck.
    """

    def __init__(self, backbone: Backbone, extra_channels: Sequence[int], num_classes: int, input_size: int,
                 min_scale: float = 0.1, max_scale: float = 0.95,
                 aspect_ratios: Sequence[float] = (2.0, 0.5, 3.0, 1 / 3), background_prior: float = 0.99,
                 scales: Sequence[float] | None = None, neck: nn.Module | None = None):
        channels = list(backbone.out_channels)
        extras = []
        for c in extra_channels:
            extras.append(_dw_extra(channels[-1], c))
            channels.append(c)
        extras_m = nn.ModuleList(extras)
        with torch.no_grad():  # feature-map sizes of this input size, for the priors
            probe_mode = backbone.training
            backbone.eval()
            x = backbone(torch.zeros(1, 3, input_size, input_size))
            fmaps = [f.shape[-1] for f in x]
            y = x[-1]
            for e in extras_m.eval():
                y = e(y)
                fmaps.append(y.shape[-1])
            backbone.train(probe_mode)
        ratios = tuple(tuple(aspect_ratios) for _ in fmaps)
        if scales is not None:
            if len(scales) != len(fmaps):
                raise MaskSSDError(f"model.scales needs one scale per feature map ({len(fmaps)}), got {len(scales)}")
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
        own = [*(neck.modules() if neck is not None else ()), *self.extras.modules(), *self.loc_head.modules(),
               *self.cls_head.modules()]
        for m in own:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.03)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # start with p(background) ~= background_prior: a stable start on images that are mostly background
        bias = math.log(background_prior * (num_classes - 1) / (1 - background_prior))
        for head, b in zip(self.cls_head, nb):
            head[-1].bias.data.view(b, num_classes)[:, 0] = bias

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


# ----------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., SSDDetector]] = {}


def register_model(name: str) -> Callable[[Callable[..., SSDDetector]], Callable[..., SSDDetector]]:
    """Register a builder under ``name`` (``build_model(name, ...)``); re-registering a name warns."""

    def deco(fn: Callable[..., SSDDetector]) -> Callable[..., SSDDetector]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            warnings.warn(f"model {name!r} is registered again: {fn.__module__}.{fn.__qualname__} replaces "
                          f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}", stacklevel=2)
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
        raise MaskSSDError(f"model {name!r} takes no {', '.join(map(repr, unknown))}; its keywords: {', '.join(allowed)}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.build_args = {"name": name, "num_classes": num_classes, **kwargs}
    return model


@register_model("ssd300_vgg16")
def ssd300_vgg16(num_classes: int = 4, pretrained: bool = False, init_checkpoint: str | None = None,
                 freeze_stages: int = 0, input_size: int = 300,
                 class_names: Sequence[str] | None = None) -> SSD300VGG16:
    """The paper's SSD300. ``pretrained``: ImageNet VGG16 from the torch cache; ``init_checkpoint``: a tutorial
    checkpoint (the paper's Pascal VOC start, or a model trained with the paper's code), class heads dropped
    when their shape differs and mapped by name onto ``class_names`` when it is the same
    (:func:`load_reference_checkpoint`, whose report is kept as ``model.init_report``)."""
    if input_size != 300:
        raise MaskSSDError("ssd300_vgg16 takes 300x300 inputs (its priors are fixed); set model.input_size = 300")
    model = SSD300VGG16(num_classes)
    if pretrained:
        model.base.load_imagenet()
    if init_checkpoint:
        model.init_report = load_reference_checkpoint(model, init_checkpoint, class_names)
    model.base.freeze_stages(freeze_stages)
    return model


def _ssdlite(backbone: Backbone, num_classes: int, input_size: int, freeze_stages: int, bn_mode: BNMode,
             extra_channels: Sequence[int], min_scale: float, max_scale: float,
             aspect_ratios: Sequence[float], scales: Sequence[float] | None,
             neck: NeckKind = "none", neck_channels: int = 64) -> SSDLite:
    backbone.configure(freeze_stages, bn_mode)
    return SSDLite(backbone, extra_channels, num_classes, input_size, min_scale, max_scale, aspect_ratios,
                   scales=scales, neck=build_neck(neck, backbone.out_channels, neck_channels))


def _check_stride4(neck: NeckKind, stride4: bool) -> None:
    if stride4 and neck == "none":
        raise MaskSSDError("model.stride4 needs model.neck = \"fpn\" or \"pan\": the stride-4 stage alone "
                           "(few channels, no context from deeper stages) is too weak a map to predict from")


def _ssdlite_effnet_lite(variant: int, num_classes: int = 4, input_size: int = 320, pretrained: bool = True,
                         freeze_stages: int = 0, bn_mode: BNMode = "frozen_stages",
                         min_scale: float = 0.05, max_scale: float = 0.95,
                         aspect_ratios: Sequence[float] = (2.0, 0.5, 3.0, 1 / 3),
                         extra_channels: Sequence[int] = (256, 256, 128), scales: Sequence[float] | None = None,
                         neck: NeckKind = "none", neck_channels: int = 64, stride4: bool = False) -> SSDLite:
    _check_stride4(neck, stride4)
    return _ssdlite(EfficientNetLiteFeatures(variant, pretrained, stride4), num_classes, input_size, freeze_stages,
                    bn_mode, extra_channels, min_scale, max_scale, aspect_ratios, scales, neck, neck_channels)


def _effnet_builder(variant: int, doc: str) -> Callable[..., SSDLite]:
    """The builder of ``ssdlite_effnet_lite{variant}``: explicit keywords (unknown config keys are refused)."""

    def builder(num_classes: int = 4, input_size: int = 320, pretrained: bool = True, freeze_stages: int = 0,
                bn_mode: BNMode = "frozen_stages", min_scale: float = 0.05, max_scale: float = 0.95,
                aspect_ratios: Sequence[float] = (2.0, 0.5, 3.0, 1 / 3),
                extra_channels: Sequence[int] = (256, 256, 128), scales: Sequence[float] | None = None,
                neck: NeckKind = "none", neck_channels: int = 64, stride4: bool = False) -> SSDLite:
        return _ssdlite_effnet_lite(variant, num_classes=num_classes, input_size=input_size, pretrained=pretrained,
                                    freeze_stages=freeze_stages, bn_mode=bn_mode, min_scale=min_scale,
                                    max_scale=max_scale, aspect_ratios=aspect_ratios, extra_channels=extra_channels,
                                    scales=scales, neck=neck, neck_channels=neck_channels, stride4=stride4)

    builder.__name__ = builder.__qualname__ = f"ssdlite_effnet_lite{variant}"
    builder.__doc__ = doc
    return builder


ssdlite_effnet_lite0 = register_model("ssdlite_effnet_lite0")(_effnet_builder(0, """SSDLite on ImageNet
EfficientNet-Lite0 (offline weights), maps at strides 8-32 plus extras.

Options (all SSDLite models): ``freeze_stages``, ``bn_mode``, ``min_scale``/``max_scale`` or ``scales``,
``aspect_ratios``, ``extra_channels``, ``neck`` ("none" | "fpn" | "pan") with ``neck_channels`` (64), and
``stride4`` (a neck level on the stride-4 stage too: one more feature map)."""))
ssdlite_effnet_lite1 = register_model("ssdlite_effnet_lite1")(_effnet_builder(1, """SSDLite on ImageNet
EfficientNet-Lite1 (offline weights; Lite0's widths, deeper): as ssdlite_effnet_lite0."""))
ssdlite_effnet_lite2 = register_model("ssdlite_effnet_lite2")(_effnet_builder(2, """SSDLite on ImageNet
EfficientNet-Lite2 (offline weights; deeper and wider: 48/120/352 channels): as ssdlite_effnet_lite0."""))


@register_model("ssdlite_mobilenet_v3")
def ssdlite_mobilenet_v3(num_classes: int = 4, input_size: int = 320, pretrained: bool = False,
                         freeze_stages: int = 0, bn_mode: BNMode = "frozen_stages",
                         min_scale: float = 0.2, max_scale: float = 0.95,
                         aspect_ratios: Sequence[float] = (2.0, 0.5, 3.0, 1 / 3),
                         extra_channels: Sequence[int] = (512, 256, 256, 128), scales: Sequence[float] | None = None,
                         neck: NeckKind = "none", neck_channels: int = 64, stride4: bool = False) -> SSDLite:
    """SSDLite on torchvision's MobileNetV3-Large (ImageNet weights when cached), as ssdlite320_mobilenet_v3_large."""
    if stride4:
        raise MaskSSDError("ssdlite_mobilenet_v3 predicts from strides 16 and 32 only: model.stride4 is not available")
    return _ssdlite(MobileNetV3Features(pretrained), num_classes, input_size, freeze_stages, bn_mode,
                    extra_channels, min_scale, max_scale, aspect_ratios, scales, neck, neck_channels)


@register_model("tiny")
def tiny(num_classes: int = 4, input_size: int = 128, width: int = 16, freeze_stages: int = 0,
         bn_mode: BNMode = "train", min_scale: float = 0.1, max_scale: float = 0.9,
         aspect_ratios: Sequence[float] = (2.0, 0.5), extra_channels: Sequence[int] = (64, 64),
         scales: Sequence[float] | None = None, pretrained: bool = False, neck: NeckKind = "none",
         neck_channels: int = 64, stride4: bool = False) -> SSDLite:
    """A few hundred thousand parameters: tests and the synthetic quickstart on a 2-core CPU."""
    _check_stride4(neck, stride4)
    return _ssdlite(TinyBackbone(width, stride4), num_classes, input_size, freeze_stages, bn_mode,
                    extra_channels, min_scale, max_scale, aspect_ratios, scales, neck, neck_channels)
