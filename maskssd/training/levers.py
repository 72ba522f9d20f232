"""The training-side levers of a config, each off by default: repeat-factor sampling (``data``), copy-paste of
rare-class faces (``augment``) and progressive input sizes (``train``), wired onto the training dataset and
its sampler; the loss for each progressive size.

Off, none of them changes anything: the runner builds the same dataset, sampler and loss as without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from maskssd.data import FaceMaskDataset, SeededSampler
from maskssd.data.copy_paste import CopyPaste, build_face_bank
from maskssd.data.sampling import RepeatFactorSampler, epoch_batches, no_single_last_batch, repeat_factors
from maskssd.data.transforms import AugmentSpec, train_transform
from maskssd.errors import MaskSSDError
from maskssd.ssd.detector import SSDDetector
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.training.config import ExperimentConfig

__all__ = [
    "SizeSchedule",
    "SizedLosses",
    "TrainLevers",
    "augment_spec",
    "configure_train_data",
    "epoch_lengths",
    "rarest_class",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeSchedule:
    """Progressive resizing: epoch (1-based) -> training input size. The first ``round(until * epochs)`` epochs
    are split evenly among ``sizes`` in order; the epochs after them use the last size."""

    sizes: tuple[int, ...]
    until: float
    epochs: int

    def __call__(self, epoch: int) -> int:
        span = max(1, round(self.until * self.epochs))
        if epoch > span:
            return self.sizes[-1]
        return self.sizes[min((max(epoch, 1) - 1) * len(self.sizes) // span, len(self.sizes) - 1)]

    def describe(self) -> str:
        runs: list[tuple[int, int, int]] = []  # (size, first epoch, last epoch)
        for e in range(1, self.epochs + 1):
            s = self(e)
            if runs and runs[-1][0] == s:
                runs[-1] = (s, runs[-1][1], e)
            else:
                runs.append((s, e, e))
        return ", ".join(f"epochs {a}-{b} at {s} px" for s, a, b in runs)


class SizedLosses:
    """The MultiBox loss for each training input size: ``make(priors)`` once per size, with the model's default
    boxes for that size (:meth:`maskssd.ssd.detector.SSDDetector.priors_for`)."""

    def __init__(self, model: SSDDetector, make: Callable[[torch.Tensor], MultiBoxLoss]):
        self.model, self.make = model, make
        self._losses: dict[int, MultiBoxLoss] = {}

    def __call__(self, size: int) -> MultiBoxLoss:
        if size not in self._losses:
            self._losses[size] = self.make(self.model.priors_for(size))
        return self._losses[size]


@dataclass
class TrainLevers:
    """What :func:`configure_train_data` set up: the training sampler (None: the default one), the size
    schedule, and values worth logging as params."""

    sampler: SeededSampler | None = None
    sizes: SizeSchedule | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def varying_epochs(self) -> bool:
        """Whether epochs differ in length (the scheduler then counts each one)."""
        return isinstance(self.sampler, RepeatFactorSampler)


def rarest_class(counts: Mapping[str, int]) -> str:
    """The class with the fewest boxes (among those with any): what the rare-class levers default to."""
    return min((c for c in counts if counts[c]), key=lambda c: counts[c])


def augment_spec(cfg: ExperimentConfig, counts: Mapping[str, int]) -> AugmentSpec:
    """The training augmentation of ``[augment]``; ``counts`` (boxes per class of the training split) pick the
    rarest class for a crop kept around rare faces when ``augment.crop_keep_classes`` is empty."""
    aug = cfg.augment
    spec = {f: getattr(aug, f) for f in AugmentSpec.__dataclass_fields__ if f in type(aug).model_fields}
    if aug.crop_keep_p > 0:
        names = list(aug.crop_keep_classes) or [rarest_class(counts)]
        spec["crop_keep_labels"] = tuple(cfg.class_names.index(n) + 1 for n in names)
    return AugmentSpec(**spec)


def _copy_paste(cfg: ExperimentConfig, ds: FaceMaskDataset) -> CopyPaste:
    aug, counts = cfg.augment, ds.class_box_counts()
    names = list(aug.copy_paste_classes) or [rarest_class(counts)]
    labels = [cfg.class_names.index(n) + 1 for n in names]
    bank = build_face_bank(ds, labels)
    if not bank:
        raise MaskSSDError(f"augment.copy_paste_p: no face of {names} in the training split to paste")
    lo, hi = aug.copy_paste_scale
    log.info(
        "copy-paste: %d faces of %s, p %g, up to %d per image",
        len(bank),
        names,
        aug.copy_paste_p,
        aug.copy_paste_max,
    )
    return CopyPaste(bank, aug.copy_paste_p, aug.copy_paste_max, scale=(lo, hi), blend=aug.copy_paste_blend)


def configure_train_data(
    cfg: ExperimentConfig, ds: FaceMaskDataset, input_size: int, rank: int = 0, world: int = 1
) -> TrainLevers:
    """Set the enabled levers on the training dataset and return its sampler (None when the default one does)."""
    levers = TrainLevers()
    if cfg.augment.copy_paste_p > 0:
        ds.sample_step = _copy_paste(cfg, ds)
        levers.params["augment.copy_paste_bank_faces"] = len(ds.sample_step.bank)
    t, seed = cfg.data.repeat_factor_threshold, cfg.experiment.seed
    if t > 0:
        factors = repeat_factors(ds.annotations, t)
        levers.sampler = RepeatFactorSampler(factors, seed, rank, world, cfg.data.batch_size)
        expected = levers.sampler.expected_images
        levers.params["data.expected_images_per_epoch"] = round(expected, 1)
        log.info(
            "repeat-factor sampling (t = %g): %.1f images per epoch expected instead of %d (%d images repeated,"
            " factors up to %.2f)",
            t,
            expected,
            len(ds),
            int((factors > 1).sum()),
            float(factors.max()),
        )
    sizes = cfg.train.progressive_sizes
    if sizes:
        if sizes[-1] != input_size:
            raise MaskSSDError(f"train.progressive_sizes must end at the model's input size {input_size}")
        levers.sizes = SizeSchedule(tuple(sizes), cfg.train.progressive_until, cfg.train.epochs)
        aug = augment_spec(cfg, ds.class_box_counts())
        ds.size_transforms = {s: train_transform(s, aug) for s in sizes}
        if levers.sampler is None:
            levers.sampler = SeededSampler(len(ds), seed, True, rank, world, pad=True)
            levers.sampler.num_samples = no_single_last_batch(levers.sampler.num_samples, cfg.data.batch_size)
        levers.sampler.size_of_epoch = levers.sizes
        log.info("progressive sizes: %s", levers.sizes.describe())
    return levers


def epoch_lengths(levers: TrainLevers, loader: torch.utils.data.DataLoader, epochs: int) -> int | list[int]:
    """Iterations per epoch for the scheduler: one count, or one per epoch when they differ."""
    if not levers.varying_epochs:
        return len(loader)
    return [epoch_batches(loader, e) for e in range(1, epochs + 1)]
