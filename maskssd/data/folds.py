"""K folds of a set of images, stratified on which classes each image holds, for cross-validation.

A face-mask image holds several classes at once, so stratifying on one label per image cannot keep the rare
class's images evenly spread. :func:`stratified_folds` is iterative stratification (Sechidis, Tsoumakas and
Vlahavas, "On the stratification of multi-label data", ECML PKDD 2011): the rarest class is placed first,
each of its images into the fold that still wants most of that class, then the next rarest, and so on; images
without objects fill the folds that want most images. Every fold then holds ~1/K of each class's images.

Folds are a pure function of the images' ids, their classes, ``k`` and ``seed`` (ties between folds are broken
by a seeded generator over ids in sorted order), so a run records its fold lists and anyone can rebuild them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["fold_digest", "fold_split", "stratified_folds"]


def stratified_folds(classes: Mapping[str, Iterable[int]], k: int, seed: int = 0) -> list[list[str]]:
    """``k`` folds (lists of image ids, each sorted) of the images in ``classes`` (id -> the class indices it
    holds), stratified on those classes; seeded, independent of the mapping's order."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(classes) < k:
        raise ValueError(f"{len(classes)} images cannot make {k} folds")
    rng = random.Random(seed)
    ids = sorted(classes)
    rng.shuffle(ids)
    labels = {i: frozenset(int(c) for c in classes[i]) for i in ids}
    all_labels = sorted({c for s in labels.values() for c in s})
    want_total = [len(ids) / k] * k
    want = {c: [sum(c in s for s in labels.values()) / k] * k for c in all_labels}
    folds: list[list[str]] = [[] for _ in range(k)]
    left = list(ids)

    def place(image: str, by: Sequence[float]) -> None:
        best = max(by)
        tied = [f for f in range(k) if by[f] == best]
        top = max(want_total[f] for f in tied)
        tied = [f for f in tied if want_total[f] == top]
        f = tied[0] if len(tied) == 1 else rng.choice(tied)
        folds[f].append(image)
        want_total[f] -= 1
        for c in labels[image]:
            want[c][f] -= 1

    while left:
        remaining = {c: sum(c in labels[i] for i in left) for c in all_labels}
        present = [c for c in all_labels if remaining[c] > 0]
        if not present:  # images without objects: wherever most images are still wanted
            for image in left:
                place(image, want_total)
            break
        rarest = min(present, key=lambda c: (remaining[c], c))
        chosen = [i for i in left if rarest in labels[i]]
        for image in chosen:
            place(image, want[rarest])
        taken = set(chosen)
        left = [i for i in left if i not in taken]
    return [sorted(f) for f in folds]


def fold_digest(folds: Sequence[Sequence[str]], seed: int) -> str:
    """A short hash of fold lists and their seed: two cross-validations are comparable iff these are equal."""
    h = hashlib.sha256(f"folds:{len(folds)}:seed:{seed}\n".encode())
    for k, fold in enumerate(folds, start=1):
        h.update(f"{k}:{','.join(sorted(fold))}\n".encode())
    return h.hexdigest()[:12]


def fold_split(
    annotations: Sequence[Any], k: int, fold: int, seed: int = 0
) -> tuple[list, list, list[list[str]]]:
    """``(train, val, folds)``: the annotations outside fold ``fold`` (1-based) and those in it, in their given
    order, and every fold's ids; folds stratified on each image's classes (its ``labels``)."""
    if not 1 <= fold <= k:
        raise ValueError(f"fold must be in 1..{k}, got {fold}")
    ids = [a.image_id for a in annotations]
    if len(set(ids)) != len(ids):
        raise ValueError("an image appears twice: folds need each image once")
    folds = stratified_folds({a.image_id: set(a.labels.tolist()) for a in annotations}, k, seed)
    held = set(folds[fold - 1])
    return (
        [a for a in annotations if a.image_id not in held],
        [a for a in annotations if a.image_id in held],
        folds,
    )
