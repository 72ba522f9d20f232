"""An exponential moving average of a model's weights (Polyak averaging, as in YOLOv5's ModelEMA and timm's
ModelEmaV3), updated after every optimiser step.

``decay_t = decay * (1 - exp(-updates / warmup_steps))``: the average follows the weights closely at first
and averages over ~``1 / (1 - decay)`` steps later. Parameters are averaged; buffers (BatchNorm running
statistics) are copied from the model. ``torch.lerp`` leaves a parameter that has not moved (a frozen stage)
bit-identical.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma:
    """The averaged copy of ``model`` (``module``, always in eval mode) and its update counter."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup_steps, self.updates = decay, warmup_steps, 0

    def current_decay(self) -> float:
        """The decay of the next update."""
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        ema = [p for p in self.module.parameters() if p.is_floating_point()]
        raw = [p.detach() for p in model.parameters() if p.is_floating_point()]
        if ema:
            torch._foreach_lerp_(ema, raw, 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (a model state dict: what is evaluated and deployed)."""
        return self.module.state_dict()

    def load(self, weights: dict[str, Any], updates: int) -> None:
        self.module.load_state_dict(weights)
        self.updates = int(updates)
