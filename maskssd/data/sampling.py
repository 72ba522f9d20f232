"""Repeat-factor sampling (LVIS; Gupta et al., 2019): images holding rare classes are seen more often.

For each class ``c``, ``f(c)`` is the fraction of training images that contain it and
``r(c) = max(1, sqrt(t / f(c)))``; an image's factor is the largest ``r(c)`` over its classes (1 without
objects). Each epoch an image appears ``floor(r)`` times, plus once more with probability ``frac(r)``, drawn
from ``(seed, epoch)``: a resumed run, any worker count and every rank of a distributed run draw the same
epoch. Repeats of one image get their own augmentation seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from maskssd.data.dataset import SeededSampler
from maskssd.data.voc import Annotation

__all__ = ["RepeatFactorSampler", "epoch_batches", "no_single_last_batch", "repeat_factors"]


def no_single_last_batch(n: int, batch_size: int | None) -> int:
    """``n`` samples, or one more when the last batch would hold a single sample: BatchNorm cannot train on one
    sample of a 1x1 feature map (an SSDLite's last map at a small progressive size)."""
    return n + 1 if batch_size and batch_size > 1 and n % batch_size == 1 else n


def repeat_factors(annotations: Sequence[Annotation], threshold: float) -> np.ndarray:
    """Each image's repeat factor ``max over its classes of max(1, sqrt(threshold / f(c)))`` (float64)."""
    n = len(annotations)
    out = np.ones(n, dtype=np.float64)
    if threshold <= 0 or n == 0:
        return out
    classes = [set(int(x) for x in a.labels) for a in annotations]
    images_with: dict[int, int] = {}
    for cs in classes:
        for c in cs:
            images_with[c] = images_with.get(c, 0) + 1
    r = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in images_with.items()}
    for i, cs in enumerate(classes):
        if cs:
            out[i] = max(r[c] for c in cs)
    return out


class RepeatFactorSampler(SeededSampler):
    """A :class:`SeededSampler` whose epoch holds each image ``floor(r) + Bernoulli(frac(r))`` times, shuffled.

    The epoch's length changes from epoch to epoch; :meth:`epoch_length` gives it (per rank) for any epoch
    without iterating, so a scheduler can count iterations exactly. Shards are padded to equal length (and by
    one more sample where ``batch_size`` would leave a last batch of one).
    """

    def __init__(
        self,
        factors: Sequence[float] | np.ndarray,
        seed: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
        batch_size: int | None = None,
    ):
        self.batch_size = batch_size
        self.factors = np.asarray(factors, dtype=np.float64)
        if self.factors.ndim != 1 or (self.factors < 1).any():
            raise ValueError("repeat factors must be a 1-D array of values >= 1")
        super().__init__(len(self.factors), seed, True, rank, num_replicas, drop_last=False, pad=True)
        self.num_samples = self.epoch_length(0)

    @property
    def expected_images(self) -> float:
        """Images per epoch on average (all ranks together): the sum of the factors."""
        return float(self.factors.sum())

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_777_777)

    def _counts(self, epoch: int, g: torch.Generator) -> torch.Tensor:
        base = np.floor(self.factors)
        frac = torch.from_numpy(self.factors - base)
        extra = torch.rand(self.n, generator=g, dtype=torch.float64) < frac
        return torch.from_numpy(base).long() + extra.long()

    def epoch_length(self, epoch: int) -> int:
        """Samples this rank yields in ``epoch``."""
        total = int(self._counts(epoch, self._generator(epoch)).sum())
        return no_single_last_batch(-(-total // self.num_replicas), self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.num_samples = self.epoch_length(epoch)

    def __iter__(self):
        g = self._generator(self.epoch)
        counts = self._counts(self.epoch, g)
        index = torch.repeat_interleave(torch.arange(self.n), counts)
        starts = torch.cumsum(counts, 0) - counts
        copy = torch.arange(index.numel()) - starts[index]  # 0 for an image's first appearance, then 1, 2...
        perm = torch.randperm(index.numel(), generator=g)
        pairs = list(zip(index[perm].tolist(), copy[perm].tolist()))
        total = self.num_samples * self.num_replicas
        pairs = (pairs + pairs[: max(total - len(pairs), 0)])[:total]
        for i, c in pairs[self.rank : total : self.num_replicas]:
            yield self.key(i, c)


def epoch_batches(loader: torch.utils.data.DataLoader, epoch: int) -> int:
    """Batches ``loader`` yields in ``epoch`` (1-based, as the trainer counts): its sampler's length that epoch."""
    sampler = loader.sampler
    if not hasattr(sampler, "epoch_length") or loader.batch_size is None:
        return len(loader)
    n = sampler.epoch_length(epoch)
    return n // loader.batch_size if loader.drop_last else -(-n // loader.batch_size)
