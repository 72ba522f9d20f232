"""A model's own int8 calibration images: a few of its training images at its input size, JPEG-compressed.

A deployment checkpoint carries them (``"calibration"``), so static int8 quantisation needs no dataset: a
registered model quantises on whatever machine serves it, and ``--backend auto`` can choose int8 there. They
are the images the predictor would feed the model (resized to the input square exactly as
:func:`maskssd.data.transforms.preprocess_images` resizes a frame), evenly spaced over the training list;
JPEG moves a pixel by a few levels, which min/max activation ranges do not notice (the accurate model's int8
validation mAP matched the one calibrated on the image files), and keeps them a fraction of the model's size.
Fewer images make the ranges depend on which were drawn (``records/int8_carried64_vs_float_val.json``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from maskssd.data.images import load_image
from maskssd.errors import DataError, MaskSSDError

__all__ = [
    "CALIBRATION_IMAGES",
    "calibration_digest",
    "decode_calibration",
    "embed_calibration",
    "evenly_spaced",
]

log = logging.getLogger(__name__)

#: Images a trained model carries for its int8 calibration.
CALIBRATION_IMAGES = 100
_QUALITY = 90

T = TypeVar("T")


def evenly_spaced(items: Sequence[T], n: int) -> list[T]:
    """``n`` items spread evenly over ``items`` (all of them where it is shorter), in order."""
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)]


def embed_calibration(
    files: Sequence[str | Path], input_size: int, n: int = CALIBRATION_IMAGES, source: str = ""
) -> dict[str, Any]:
    """``n`` of ``files`` (evenly spaced) resized to the ``input_size`` square and JPEG-encoded: the
    ``"calibration"`` entry of a deployment checkpoint (plain tensors and strings: it loads weights-only)."""
    if n < 1 or not files:
        raise MaskSSDError(f"calibration needs at least one image, got {n} of {len(files)} files")
    images, unreadable = [], []
    for f in evenly_spaced(list(files), n):
        try:
            chw = torch.from_numpy(np.array(load_image(f))).permute(2, 0, 1)
        except DataError as e:  # a training run that skipped a bad file must not fail at its end for it
            unreadable.append(str(e))
            continue
        square = v2.functional.resize(chw, [input_size, input_size], antialias=True)
        images.append(encode_jpeg(square.contiguous(), quality=_QUALITY))
    if not images:
        raise MaskSSDError(f"no calibration image could be read: {'; '.join(unreadable[:3])}")
    if unreadable:
        log.warning("calibration: %d unreadable images left out (%s)", len(unreadable), unreadable[0])
    return {"format": "jpeg", "size": int(input_size), "images": images, "source": source}


def _check(cal: Mapping[str, Any]) -> None:
    if cal.get("format") != "jpeg" or not cal.get("images"):
        raise MaskSSDError(
            f"a checkpoint's calibration must hold JPEG images, found format {cal.get('format')!r} with "
            f"{len(cal.get('images') or [])} images"
        )


def decode_calibration(cal: Mapping[str, Any]) -> list[torch.Tensor]:
    """The carried images as uint8 ``(3, S, S)`` tensors, ready for ``preprocess_images``."""
    _check(cal)
    return [decode_jpeg(img) for img in cal["images"]]


def calibration_digest(cal: Mapping[str, Any]) -> str:
    """A short hash of the carried images (what an int8 cache is keyed on)."""
    _check(cal)
    h = hashlib.sha256(f"{cal['size']}".encode())
    for img in cal["images"]:
        h.update(img.numpy().tobytes())
    return h.hexdigest()[:12]
