"""Inference-only rewrites of a detector: BatchNorm folded into the convolution before it, and TensorFlow "same"
padding made static.

In eval mode a BatchNorm is a per-channel affine map ``y = (x - mean) / sqrt(var + eps) * gamma + beta``; after a
convolution it folds into the convolution's weight and bias, and the BatchNorm op disappears from every
forward (about fifty ops in SSDLite-EfficientNet-Lite0). Pairs are found in the module's ``torch.fx`` graph: a
``Conv2d`` whose output feeds one BatchNorm and nothing else. Parts ``torch.fx`` cannot trace (a branch on a
tensor's shape, as in the FPN's resize) are searched child by child, so every pair is found whatever the
architecture. timm's ``BatchNormAct2d`` (BatchNorm + activation in one module) keeps its activation.

timm's ``Conv2dSame`` (the EfficientNet-Lite stem and stride-2 depthwise convolutions) computes its padding from
the input's size at every call; an exported graph computes it too (about 150 small shape ops, which ONNX Runtime's
int8 quantiser would even quantise, breaking the shapes). A detector's input size is fixed, so
:func:`static_same_padding` replaces each by a plain convolution with the padding it always gets.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["batchnorm_count", "fold_batchnorm", "optimize_for_inference", "static_same_padding"]

log = logging.getLogger(__name__)


class _Tracer(fx.Tracer):
    """Convolutions and BatchNorms (timm's subclasses included) stay single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _replacement(bn: nn.Module) -> nn.Module | None:
    """What a folded BatchNorm becomes: nothing, or the activation (and dropout) of a BatchNorm + activation
    module; None for a BatchNorm subclass this code does not know (left as it is)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d":  # timm: F.batch_norm, then self.drop, then self.act
        return nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
    return None


def _conv_bn_pairs(module: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """Qualified names of (Conv2d, BatchNorm2d) pairs where the conv's output goes to the BatchNorm only."""
    try:
        graph = _Tracer().trace(module)
    except Exception:  # untraceable here (data-dependent control flow, a container without forward)
        return [
            pair
            for name, child in module.named_children()
            for pair in _conv_bn_pairs(child, f"{prefix}{name}.")
        ]
    modules = dict(module.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], nn.Conv2d)  # timm's Conv2dSame too
            and len(src.users) == 1
            and calls[src.target] == calls[node.target] == 1
        ):
            pairs.append((prefix + src.target, prefix + node.target))
    return pairs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` in eval mode with every foldable Conv2d + BatchNorm2d pair folded into the conv (a copy unless
    ``inplace``). For inference only: the folded model has no BatchNorm left to train."""
    model = (model if inplace else copy.deepcopy(model)).eval()
    pairs = _conv_bn_pairs(model)
    used = Counter(name for pair in pairs for name in pair)
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        new = _replacement(bn)
        if new is None or used[conv_name] > 1 or used[bn_name] > 1 or bn.running_var is None:
            continue
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
        _set_submodule(model, bn_name, new)
        folded += 1
    log.debug("folded %d of %d BatchNorms into their convolutions", folded, batchnorm_count(model) + folded)
    return model


def batchnorm_count(model: nn.Module) -> int:
    """BatchNorm modules left in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def static_same_padding(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every timm ``Conv2dSame`` replaced by a ``Conv2d`` (after a ``ZeroPad2d`` where the padding
    is uneven) padded as it is at ``model.input_size``: the same outputs, no padding computed per call."""
    same = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    if not same:
        return model
    from timm.layers.padding import pad_same_arg

    model = model if inplace else copy.deepcopy(model)
    same = {n: model.get_submodule(n) for n in same}
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in same.items()]
    was_training = model.training
    try:
        size = int(model.input_size)
        model.eval()(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for name, m in same.items():
        left, right, top, bottom = pad_same_arg(list(sizes[name]), m.weight.shape[-2:], m.stride, m.dilation)
        even = left == right and top == bottom
        conv = nn.Conv2d(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            (top, left) if even else 0,
            m.dilation,
            m.groups,
            m.bias is not None,
        )
        conv.weight = m.weight
        if m.bias is not None:
            conv.bias = m.bias
        _set_submodule(
            model, name, conv if even else nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
        )
    return model


def optimize_for_inference(model: nn.Module, fold_bn: bool = True, inplace: bool = False) -> nn.Module:
    """``model`` in eval mode, "same" padding static (:func:`static_same_padding`) and, with ``fold_bn``, its
    BatchNorms folded (:func:`fold_batchnorm`)."""
    model = (model if inplace else copy.deepcopy(model)).eval()
    if fold_bn:
        model = fold_batchnorm(model, inplace=True)
    return static_same_padding(model, inplace=True)
