"""The records every evaluation takes: per image, its :class:`Detections` (``boxes, labels, scores``) and its
:class:`Target` (``boxes, labels, difficult``), gathered with the image's id and size in an :class:`EvalSet`
(the shape torchvision's ``CocoEvaluator.update({image_id: {...}})`` takes).

Conventions: boxes are ``xyxy`` in one coordinate system for detections and ground truth (original pixels
in every maskssd evaluation); labels are 1-based indices into ``class_names`` (0 is background; labels
outside ``1..C`` are ignored by every metric); everything per class is keyed by class name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from maskssd.errors import MaskSSDError
from maskssd.ssd.postprocess import Detections

__all__ = ["Detections", "EvalSet", "Flat", "Target"]


def _boxes(x: Any) -> Tensor:
    return torch.as_tensor(x).detach().cpu().reshape(-1, 4)


def _vector(x: Any) -> Tensor:
    return torch.as_tensor(x).detach().cpu().reshape(-1)


@dataclass(frozen=True)
class Target:
    """One image's ground truth: ``boxes (n, 4)`` xyxy, ``labels (n,)`` 1..C, ``difficult (n,)`` (ignored by AP)."""

    boxes: Tensor
    labels: Tensor
    difficult: Tensor

    @classmethod
    def of(cls, boxes: Any, labels: Any, difficult: Any = None) -> Target:
        """A target from anything tensor-like (``difficult`` None: no difficult object)."""
        b = _boxes(boxes)
        d = torch.zeros(b.shape[0], dtype=torch.bool) if difficult is None else _vector(difficult).bool()
        return cls(b, _vector(labels).long(), d)

    @classmethod
    def from_annotation(cls, ann: Any) -> Target:
        """An annotation's ground truth as the evaluation scores it: pixel boxes (float32), labels, flags."""
        return cls(
            torch.from_numpy(ann.boxes.copy()).float().reshape(-1, 4),
            torch.from_numpy(ann.labels.copy()).long(),
            torch.from_numpy(ann.difficult.copy()).bool(),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Flat:
    """An :class:`EvalSet` concatenated: every detection and object once, with the index of its image (sorted
    ascending: images in set order, then boxes in their image's order)."""

    det_boxes: Tensor  # (D, 4) float64
    det_labels: Tensor  # (D,) long
    det_scores: Tensor  # (D,)
    det_image: Tensor  # (D,)
    gt_boxes: Tensor  # (G, 4) float64
    gt_labels: Tensor  # (G,) long
    gt_difficult: Tensor  # (G,) bool
    gt_image: Tensor  # (G,)


def _concat(parts: Sequence[Tensor], empty: Tensor) -> Tensor:
    return torch.cat(list(parts)) if parts else empty


@dataclass
class EvalSet:
    """What one evaluation scores: per image (in evaluation order) its id, size ``(width, height)`` (None where
    unknown), detections and ground truth, and the class names the labels index."""

    class_names: tuple[str, ...]
    image_ids: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int] | None] = field(default_factory=list)
    detections: list[Detections] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        n = len(self.image_ids)
        lengths = {len(self.sizes), len(self.detections), len(self.targets)}
        if lengths != {n}:
            raise ValueError(
                f"an EvalSet needs one size, detections and target per image id ({n} ids, "
                f"{len(self.sizes)} sizes, {len(self.detections)} detections, {len(self.targets)} targets)"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def add(
        self, image_id: str, detections: Detections, target: Target, size: tuple[int, int] | None = None
    ) -> None:
        """One image's detections and ground truth (detached, moved to the CPU)."""
        d = Detections(
            _boxes(detections.boxes), _vector(detections.labels).long(), _vector(detections.scores)
        )
        if not len(d.boxes) == len(d.labels) == len(d.scores):
            raise ValueError(f"image {image_id!r}: boxes, labels and scores differ in length")
        if not len(target.boxes) == len(target.labels) == len(target.difficult):
            raise ValueError(f"image {image_id!r}: target boxes, labels and difficult flags differ in length")
        self.image_ids.append(str(image_id))
        self.sizes.append(None if size is None else (int(size[0]), int(size[1])))
        self.detections.append(d)
        self.targets.append(target)
        self.__dict__.pop("flat", None)

    def update(
        self,
        predictions: Mapping[str, Detections],
        targets: Mapping[str, Target],
        sizes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """Add images keyed by id, as torchvision's ``CocoEvaluator.update``; every id needs its target."""
        for image_id, det in predictions.items():
            if image_id not in targets:
                raise ValueError(f"image {image_id!r} has detections but no target")
            self.add(image_id, det, targets[image_id], None if sizes is None else sizes.get(image_id))

    @classmethod
    def from_lists(
        cls,
        det_boxes: Sequence[Any],
        det_labels: Sequence[Any],
        det_scores: Sequence[Any],
        gt_boxes: Sequence[Any],
        gt_labels: Sequence[Any],
        gt_difficult: Sequence[Any] | None,
        class_names: Sequence[str],
        *,
        image_ids: Sequence[str] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> EvalSet:
        """From six parallel per-image lists (the tutorial's shape; ids default to the image's position)."""
        lengths = {
            "det_boxes": len(det_boxes),
            "det_labels": len(det_labels),
            "det_scores": len(det_scores),
            "gt_boxes": len(gt_boxes),
            "gt_labels": len(gt_labels),
        }
        if gt_difficult is not None:
            lengths["gt_difficult"] = len(gt_difficult)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"per-image inputs must have one entry per image, got lengths {lengths}")
        n = len(det_boxes)
        out = cls(class_names)
        for i in range(n):
            det = Detections(_boxes(det_boxes[i]), _vector(det_labels[i]).long(), _vector(det_scores[i]))
            target = Target.of(gt_boxes[i], gt_labels[i], None if gt_difficult is None else gt_difficult[i])
            out.add(
                str(image_ids[i]) if image_ids is not None else str(i),
                det,
                target,
                sizes[i] if sizes else None,
            )
        return out

    @classmethod
    def from_annotations(
        cls,
        class_names: Sequence[str],
        detections: Iterable[tuple[str, Detections]],
        annotations: Sequence[Any],
    ) -> EvalSet:
        """``(image_id, Detections)`` pairs in evaluation order, scored against the annotations of those images
        (their pixel boxes and sizes); an image without an annotation is refused."""
        by_id = {a.image_id: a for a in annotations}
        out = cls(class_names)
        for image_id, det in detections:
            ann = by_id.get(image_id)
            if ann is None:
                raise MaskSSDError(f"image {image_id!r} has detections but no annotation")
            out.add(image_id, det, Target.from_annotation(ann), (ann.width, ann.height))
        return out

    def select(self, indices: Iterable[int]) -> EvalSet:
        """The images at ``indices``, in that order (a fold, a resample written out)."""
        idx = list(indices)
        return EvalSet(
            self.class_names,
            [self.image_ids[i] for i in idx],
            [self.sizes[i] for i in idx],
            [self.detections[i] for i in idx],
            [self.targets[i] for i in idx],
        )

    @classmethod
    def concat(cls, sets: Sequence[EvalSet]) -> EvalSet:
        """Several sets as one (out-of-fold detections pooled); the classes must agree and ids must not repeat."""
        if not sets:
            raise ValueError("nothing to concatenate")
        names = sets[0].class_names
        out = cls(names)
        for s in sets:
            if s.class_names != names:
                raise ValueError(f"different classes: {s.class_names} vs {names}")
            out.image_ids += s.image_ids
            out.sizes += s.sizes
            out.detections += s.detections
            out.targets += s.targets
        if len(set(out.image_ids)) != len(out.image_ids):
            raise ValueError("an image appears in two of the sets")
        return out

    @cached_property
    def flat(self) -> Flat:
        """Every detection and object concatenated once (what the matching works on)."""
        n = len(self)
        d_counts = torch.tensor([len(d.scores) for d in self.detections], dtype=torch.long)
        g_counts = torch.tensor([len(t.labels) for t in self.targets], dtype=torch.long)
        f64 = torch.zeros((0, 4), dtype=torch.float64)
        return Flat(
            det_boxes=_concat([d.boxes.double() for d in self.detections], f64),
            det_labels=_concat([d.labels for d in self.detections], torch.zeros(0, dtype=torch.long)),
            det_scores=_concat([d.scores for d in self.detections], torch.zeros(0)),
            det_image=torch.repeat_interleave(torch.arange(n), d_counts),
            gt_boxes=_concat([t.boxes.double() for t in self.targets], f64),
            gt_labels=_concat([t.labels for t in self.targets], torch.zeros(0, dtype=torch.long)),
            gt_difficult=_concat([t.difficult for t in self.targets], torch.zeros(0, dtype=torch.bool)),
            gt_image=torch.repeat_interleave(torch.arange(n), g_counts),
        )
