"""What the MLflow pyfunc model accepts, turned into RGB uint8 images.

* uint8 arrays: ``(N, H, W, 3)`` or one ``(H, W, 3)`` (integer arrays in 0..255, as JSON ``"inputs"`` parse to,
  are accepted too), a list of them, or ``{"images": array}``;
* encoded images (JPEG, PNG, anything Pillow reads): a DataFrame column ``image`` (or a single column), a
  list, or a 1-D array of ``bytes`` or base64 strings (``data:image/...;base64,`` prefixes allowed) - what
  ``mlflow models serve`` receives as ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}``
  or ``{"dataframe_records": [{"image": "<base64>"}]}``.

Anything else is refused with a :class:`~maskssd.errors.MaskSSDError` naming the offending image.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from maskssd.data import MAX_IMAGE_PIXELS, decode_image_bytes
from maskssd.errors import DataError, MaskSSDError

__all__ = ["IMAGE_COLUMN", "images_from_input"]

IMAGE_COLUMN = "image"


def images_from_input(model_input: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> list[np.ndarray]:
    """RGB uint8 ``(H, W, 3)`` arrays from any accepted input (see the module docstring)."""
    if isinstance(model_input, Mapping):
        for key in ("images", IMAGE_COLUMN, "inputs"):
            if key in model_input:
                return images_from_input(model_input[key], max_pixels)
        raise MaskSSDError(
            f"expected a key 'images' (uint8 arrays) or {IMAGE_COLUMN!r} (encoded images), got {list(model_input)}"
        )
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):  # a pandas DataFrame
        return _from_frame(model_input, max_pixels)
    if isinstance(model_input, (bytes, str)):
        return [_decode(model_input, 0, max_pixels)]
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "biu":
        return _from_array(model_input)
    items = list(model_input) if isinstance(model_input, (Sequence, np.ndarray)) else None
    if items is None:
        raise MaskSSDError(f"cannot read images from a {type(model_input).__name__}")
    if items and all(isinstance(x, (bytes, bytearray, str)) for x in items):
        return [_decode(x, i, max_pixels) for i, x in enumerate(items)]
    return _from_array(np.asarray(items))


def _from_frame(frame: Any, max_pixels: int) -> list[np.ndarray]:
    columns = list(frame.columns)
    if IMAGE_COLUMN in columns:
        col = IMAGE_COLUMN
    elif len(columns) == 1:
        col = columns[0]
    else:
        raise MaskSSDError(f"expected a column {IMAGE_COLUMN!r} of encoded images, got columns {columns}")
    values = frame[col].tolist()
    if values and not all(isinstance(x, (bytes, bytearray, str)) for x in values):
        return _from_array(np.asarray(values))  # arrays in a column: one image per row
    return [_decode(x, i, max_pixels) for i, x in enumerate(values)]


def _decode(value: bytes | bytearray | str, index: int, max_pixels: int) -> np.ndarray:
    """One encoded image: raw bytes, or base64 (str or ASCII bytes) with an optional data-URL prefix."""
    name = f"image {index}"
    if isinstance(value, (bytes, bytearray)):
        try:
            return np.asarray(decode_image_bytes(bytes(value), max_pixels, name))
        except DataError as e:
            if not _BASE64_TEXT.fullmatch(bytes(value)):
                raise MaskSSDError(f"{name}: {e.reason}") from None
            value = bytes(value).decode("ascii")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    not_image = f"{name}: neither an encoded image (JPEG, PNG ...) nor base64 of one"
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MaskSSDError(f"{not_image} ({text[:40]!r})") from None
    try:
        return np.asarray(decode_image_bytes(raw, max_pixels, name))
    except DataError as e:
        raise MaskSSDError(f"{not_image}: its base64 decodes to {len(raw)} bytes, {e.reason}") from None


_BASE64_TEXT = re.compile(rb"data:[^,]*,.*|[A-Za-z0-9+/=\s]+", re.DOTALL)


def _from_array(arr: np.ndarray) -> list[np.ndarray]:
    if arr.dtype.kind not in "biu":
        raise MaskSSDError(
            f"images must be uint8 pixel arrays (N, H, W, 3) or encoded images (bytes or base64), got {arr.dtype}"
        )
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise MaskSSDError(f"images must have shape (N, H, W, 3) or (H, W, 3), got {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise MaskSSDError(f"pixel values must be in 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    return list(arr)
