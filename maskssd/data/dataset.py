"""The torch side of a VOC split: samples, batches, the Dataset, and a seeded (resumable, shardable) sampler.

A sample, after its transform, holds boxes as **normalised** ``[x1, y1, x2, y2]`` in ``[0, 1]`` relative to
the transformed image (the SSD tradition); ``sizes`` keep the original (width, height) so detections map
back to original pixels. Labels are 1-based class indices; 0 is background.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskssd.data.image_cache import shared_image_cache
from maskssd.data.images import MAX_IMAGE_PIXELS, load_image
from maskssd.data.voc import DEFAULT_CLASSES, Annotation, DataReport, OnError, load_annotations, load_split

__all__ = ["Batch", "FaceMaskDataset", "Sample", "SeededSampler", "Transform", "collate", "sample_seed"]


@dataclass
class Batch:
    """A collated batch. ``boxes`` are normalised xyxy per image; ``sizes`` are original (width, height)."""

    images: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    boxes: list[torch.Tensor]  # each (n_i, 4) normalised xyxy
    labels: list[torch.Tensor]  # each (n_i,) int64, 1..C
    difficult: list[torch.Tensor]  # each (n_i,) bool
    image_ids: list[str]
    sizes: torch.Tensor  # (N, 2) original (width, height)

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            [b.to(device, non_blocking=non_blocking) for b in self.boxes],
            [x.to(device, non_blocking=non_blocking) for x in self.labels],
            [d.to(device, non_blocking=non_blocking) for d in self.difficult],
            self.image_ids,
            self.sizes.to(device),
        )

    def pin_memory(self) -> Batch:
        return Batch(
            self.images.pin_memory(), self.boxes, self.labels, self.difficult, self.image_ids, self.sizes
        )


Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]


class FaceMaskDataset(torch.utils.data.Dataset):
    """A VOC face-mask split as a torch dataset.

    A sample is a dict: ``image`` (uint8 ``tv_tensors.Image`` before the transform; the transform
    returns a float image in [0, 1]), ``boxes`` (``tv_tensors.BoundingBoxes``), ``labels``,
    ``difficult``, ``image_id`` and ``size`` (original width, height).
    ``cache_images`` keeps decoded images in memory, in a cache shared by every dataset of the process
    (:mod:`maskssd.data.image_cache`): worth it for small datasets read for many epochs, and for the
    successive trials of a study worker, which then decode each image once.
    """

    def __init__(
        self,
        annotations: Sequence[Annotation],
        transform: Transform | None = None,
        classes: Sequence[str] = DEFAULT_CLASSES,
        cache_images: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.annotations = list(annotations)
        self.transform = transform
        self.classes = tuple(classes)
        self.cache_images = cache_images
        self.max_pixels = max_pixels
        #: ``(raw sample, seed) -> sample`` before the transform (copy-paste, :mod:`maskssd.data.copy_paste`)
        self.sample_step: Callable[[Sample, int], Sample] | None = None
        #: output size -> training transform, for keys ``(seed, index, size)`` (progressive resizing)
        self.size_transforms: dict[int, Transform] | None = None

    @classmethod
    def from_root(
        cls,
        root: str | Path,
        split: str | None = "train",
        split_name: str = "paper",
        classes: Sequence[str] = DEFAULT_CLASSES,
        transform: Transform | None = None,
        on_error: OnError = "raise",
        report: DataReport | None = None,
        cache_images: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> FaceMaskDataset:
        if split is None:
            anns = load_annotations(root, None, classes, on_error, report, max_pixels)
        else:
            anns = load_split(root, split, split_name, classes, on_error, report, max_pixels)
        return cls(anns, transform, classes, cache_images, max_pixels)

    def __len__(self) -> int:
        return len(self.annotations)

    def _image_tensor(self, index: int) -> torch.Tensor:
        path = self.annotations[index].image_path
        if self.cache_images:
            return shared_image_cache().get(path, self.max_pixels, lambda: self._decode(path))
        return self._decode(path)

    def _decode(self, path: str | Path) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        return F.pil_to_tensor(load_image(path, self.max_pixels))

    def raw_sample(self, index: int) -> Sample:
        from torchvision import tv_tensors

        ann = self.annotations[index]
        img = self._image_tensor(index)
        h, w = img.shape[-2:]
        return {
            "image": tv_tensors.Image(img),
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(ann.boxes.copy()), format="XYXY", canvas_size=(h, w)
            ),
            "labels": torch.from_numpy(ann.labels.copy()),
            "difficult": torch.from_numpy(ann.difficult.copy()),
            "image_id": ann.image_id,
            "size": (ann.width, ann.height),
        }

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> Sample:
        """``dataset[i]``, or ``dataset[(seed, i)]`` to draw the augmentation from a fixed seed, or
        ``dataset[(seed, i, size)]`` to end at another output size (``size_transforms``, progressive resizing).

        ``sample_step`` (copy-paste) runs on the raw sample first, with the sample's seed."""
        seed, index, *size = key if isinstance(key, tuple) else (None, key)
        sample = self.raw_sample(index)
        if self.sample_step is not None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))
            sample = self.sample_step(sample, seed)
        transform = self.transform
        if size and self.size_transforms is not None:
            transform = self.size_transforms[size[0]]
        if transform is None:
            return sample
        if seed is None:
            return transform(sample)
        # the augmentation runs on the CPU: seed (and restore) its generator only; torch.manual_seed would
        # also reseed every GPU's
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return transform(sample)

    def class_box_counts(self) -> dict[str, int]:
        counts = Counter(int(x) for a in self.annotations for x in a.labels)
        return {name: counts.get(i + 1, 0) for i, name in enumerate(self.classes)}


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack transformed samples (same image size) into a :class:`Batch`."""
    return Batch(
        images=torch.stack([s["image"].as_subclass(torch.Tensor) for s in samples]),
        boxes=[s["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4) for s in samples],
        labels=[s["labels"].long() for s in samples],
        difficult=[s["difficult"].bool() for s in samples],
        image_ids=[s["image_id"] for s in samples],
        sizes=torch.tensor([s["size"] for s in samples], dtype=torch.float32).reshape(-1, 2),
    )


# ------------------------------------------------------------------------------------------ sampling
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: a pure function, so any worker count, a resumed run
    and a distributed run all draw the same augmentation for the same sample."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class SeededSampler(torch.utils.data.Sampler):
    """Shuffles per epoch from ``(seed, epoch)`` and yields ``(sample_seed, index)`` keys.

    With ``num_replicas > 1`` each rank takes every ``num_replicas``-th index of the padded permutation
    (like ``DistributedSampler``), so ranks see disjoint shards of equal length.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        num_replicas: int = 1,
        drop_last: bool = False,
        pad: bool = True,
    ):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.num_replicas, self.drop_last, self.pad = rank, num_replicas, drop_last, pad
        self.epoch = 0
        #: epoch -> output size; keys become ``(seed, index, size)`` (progressive resizing); None: ``(seed, index)``
        self.size_of_epoch: Callable[[int], int] | None = None
        if not pad:  # uneven shards, every index exactly once (evaluation)
            self.num_samples = len(range(rank, n, num_replicas))
        else:
            self.num_samples = (n // num_replicas) if drop_last else -(-n // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if not self.pad:
            for index in order[self.rank :: self.num_replicas]:
                yield self.key(index)
            return
        total = self.num_samples * self.num_replicas
        order = (order + order[: max(total - len(order), 0)])[:total]
        for index in order[self.rank : total : self.num_replicas]:
            yield self.key(index)

    def key(self, index: int, copy: int = 0) -> tuple[int, ...]:
        """The dataset key of ``index`` this epoch; ``copy`` > 0 numbers its repeats (another augmentation)."""
        seed = sample_seed(self.seed, self.epoch, index + copy * self.n)
        if self.size_of_epoch is None:
            return seed, index
        return seed, index, self.size_of_epoch(self.epoch)
