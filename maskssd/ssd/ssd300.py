"""The reference paper's SSD300-VGG16 (module names of the public PyTorch SSD300 tutorial), and loading the
tutorial's and the paper's own checkpoints into it: weights only, class heads mapped by class name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskssd.errors import MaskSSDError, PretrainedWeightsMissing
from maskssd.ssd.backbones import VGG16Base
from maskssd.ssd.detector import IMAGENET_MEAN, IMAGENET_STD, SSDDetector
from maskssd.ssd.priors import PriorSpec

__all__ = [
    "PAPER_CLASSES",
    "SSD300VGG16",
    "import_reference_checkpoint",
    "load_reference_checkpoint",
    "reorder_class_heads",
]


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
        for a, b in (
            ("conv8_1", "conv8_2"),
            ("conv9_1", "conv9_2"),
            ("conv10_1", "conv10_2"),
            ("conv11_1", "conv11_2"),
        ):
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
        locs = [
            getattr(self, f"loc_{m}")(f).permute(0, 2, 3, 1).reshape(n, -1, 4)
            for m, f in zip(self.MAPS, feats)
        ]
        cls = [
            getattr(self, f"cl_{m}")(f).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes)
            for m, f in zip(self.MAPS, feats)
        ]
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


def reorder_class_heads(
    state: dict[str, torch.Tensor], source: Sequence[str], target: Sequence[str]
) -> dict[str, torch.Tensor]:
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
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("class_names"), list | tuple)
        and len(obj["class_names"]) + 1 == n_classes
    ):
        return tuple(obj["class_names"]), False
    if n_classes == len(PAPER_CLASSES) + 1:
        return PAPER_CLASSES, True
    return None, False


def load_reference_checkpoint(
    model: nn.Module, source: str | Path | dict, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
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
        target = (
            tuple(class_names)
            if class_names is not None
            else _default_classes()
            if n == len(PAPER_CLASSES) + 1
            else None
        )
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
    dropped = (
        heads if names_differ else sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    )
    unknown = sorted(k for k in state if k not in own)
    if len(loaded) < len(own) // 2:
        raise MaskSSDError(
            f"checkpoint does not look like an SSD300 tutorial checkpoint: only {len(loaded)} of "
            f"{len(own)} tensors match (unknown keys: {unknown[:5]})"
        )
    model.load_state_dict(loaded, strict=False)
    return {
        "loaded": sorted(loaded),
        "dropped": dropped,
        "unknown": unknown,
        "missing": sorted(k for k in own if k not in loaded),
        "class_order": class_order,
    }


def _default_classes() -> tuple[str, ...]:
    from maskssd.data import DEFAULT_CLASSES

    return DEFAULT_CLASSES


def import_reference_checkpoint(
    obj: Any, path: str | Path, class_names: Sequence[str] | None = None
) -> dict[str, Any] | None:
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
        raise MaskSSDError(
            f"{path}: a 21-class (Pascal VOC) SSD300 of the tutorial: the paper's starting point, "
            "not a face-mask detector, so there is nothing to evaluate or export. Train from it: "
            'set model.init_checkpoint to this file (model.name = "ssd300_vgg16")'
        )
    if n != len(PAPER_CLASSES) + 1:
        raise MaskSSDError(
            f"{path}: a tutorial-layout SSD300 with {n - 1} classes; maskssd reads the paper's "
            f"{len(PAPER_CLASSES)} face-mask classes ({', '.join(PAPER_CLASSES)})"
        )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SSD300VGG16(n).state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k])
    if missing or wrong:
        raise MaskSSDError(
            f"{path}: not a complete SSD300 of the tutorial's layout (missing {missing[:3]}, "
            f"shapes differ {wrong[:3]})"
        )
    target = tuple(class_names) if class_names is not None else _default_classes()
    src, assumed = _source_classes(obj, n)
    assert src is not None  # 4 classes: named by the file, else the paper's
    state = reorder_class_heads({k: state[k] for k in expected}, src, target)
    epoch = obj.get("epoch", 0) if isinstance(obj, dict) else 0
    where = "model_state_dict" if isinstance(obj, dict) and "model_state_dict" in obj else "model"
    order = "assumed the paper's label order" if assumed else "read the file's class order"
    note = (
        f"{path} is a checkpoint of the reference paper's code (tutorial layout, 4 classes under "
        f"{where!r}); {order} ({', '.join(src)}) and mapped its classes by name to {', '.join(target)}"
    )
    return {
        "model": state,
        "build_args": {"name": "ssd300_vgg16", "num_classes": n},
        "class_names": list(target),
        "epoch": int(epoch) if isinstance(epoch, int | float) else 0,
        "source_class_names": list(src),
        "import_note": note,
    }
