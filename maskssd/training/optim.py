"""Optimiser and learning-rate schedule builders: SGD / Adam / AdamW with the paper's bias learning rate, and
per-iteration schedules (multistep, cosine, one-cycle, cosine with restarts, each with an optional warm-up)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch import nn

from maskssd.training.config import OptimSection, ScheduleSection

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW with the biases in their own group at ``bias_lr_mult`` x lr (the paper's code: 2)."""
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
    groups = [{"params": others, "lr": cfg.lr}, {"params": biases, "lr": cfg.lr * cfg.bias_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _cosine(floor: float, t: float) -> float:
    """Half a cosine from 1 (t = 0) down to ``floor`` (t = 1)."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def _onecycle(cfg: ScheduleSection, epochs: int, progress: float) -> float:
    """Cosine up from ``warmup_start_ratio`` to 1 over ``pct_start`` of training, then cosine down to
    ``min_lr_ratio`` (torch's OneCycleLR with cosine annealing; the peak is ``optim.lr``)."""
    peak = cfg.pct_start * epochs
    if progress < peak:
        return 1 - _cosine(0.0, progress / peak) * (1 - cfg.warmup_start_ratio)
    return _cosine(cfg.min_lr_ratio, (progress - peak) / max(epochs - peak, 1e-9))


def _cosine_restarts(cfg: ScheduleSection, progress: float) -> float:
    """SGDR (Loshchilov and Hutter, 2017): cosine down to ``min_lr_ratio`` over ``restart_epochs``, then again
    from the top over a period ``restart_mult`` times longer, and so on (after any warm-up)."""
    t, period = max(progress - cfg.warmup_epochs, 0.0), cfg.restart_epochs
    if cfg.restart_mult == 1:
        t = math.fmod(t, period)
    else:
        while t >= period:
            t, period = t - period, period * cfg.restart_mult
    return _cosine(cfg.min_lr_ratio, t / period)


def lr_factor(cfg: ScheduleSection, epochs: int, progress: float) -> float:
    """The learning-rate multiplier at ``progress`` epochs (a float: schedules step per iteration)."""
    if cfg.name == "multistep":
        f = cfg.decay_lr_to ** sum(progress >= e - 1 for e in cfg.decay_lr_at)  # decay_lr_at: 1-based epochs
    elif cfg.name == "cosine":
        t = min(max(progress - cfg.warmup_epochs, 0.0) / max(epochs - cfg.warmup_epochs, 1e-9), 1.0)
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif cfg.name == "onecycle":
        f = _onecycle(cfg, epochs, progress)
    elif cfg.name == "cosine_restarts":
        f = _cosine_restarts(cfg, progress)
    else:
        f = 1.0
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        f *= cfg.warmup_start_ratio + (1 - cfg.warmup_start_ratio) * progress / cfg.warmup_epochs
    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection, epochs: int, iters_per_epoch: int | Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` (its state is one counter, so it resumes exactly).

    ``iters_per_epoch`` is one count, or one per epoch when epochs differ in length (repeat-factor
    sampling): iteration ``it`` is then at epoch ``e + (it - start of e) / length of e``.
    """
    if isinstance(iters_per_epoch, int):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: lr_factor(cfg, epochs, it / max(iters_per_epoch, 1))
        )
    lengths = [max(int(n), 1) for n in iters_per_epoch]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)

    def progress(it: int) -> float:
        e = min(bisect.bisect_right(starts, it) - 1, len(lengths) - 1)
        return e + (it - starts[e]) / lengths[e]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, epochs, progress(it)))
