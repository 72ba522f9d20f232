"""Image files and bytes to RGB, safely: any PIL mode, decompression-bomb guard, errors naming the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskssd.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "decode_image_bytes", "load_image", "read_image_size"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Images larger than this many pixels are refused before decoding (decompression-bomb guard).
MAX_IMAGE_PIXELS = 40_000_000


def _check_pixels(img: Image.Image, path: Path, max_pixels: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DataError(f"image has an empty size {w}x{h}", path)
    if w * h > max_pixels:
        raise DataError(
            f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise max_pixels if this is a genuine image)",
            path,
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit and float greyscale are scaled (not clipped), alpha is dropped."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 256.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray((arr / scale).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_image_size(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the image header only, with the same checks as :func:`load_image`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img, path, max_pixels)
                return img.size
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("image file not found", path) from None
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise DataError(f"unreadable image ({type(e).__name__}: {e})", path) from None


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image of any mode (RGB, RGBA, L, P, ...) as RGB; alpha is dropped like every known loader."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img, path, max_pixels)
                img.load()
                return _to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("image file not found", path) from None
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise DataError(f"unreadable or corrupt image ({type(e).__name__}: {e})", path) from None


def decode_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "<bytes>") -> Image.Image:
    """Like :func:`load_image` for in-memory bytes (uploads, video frames)."""
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_pixels(img, Path(name), max_pixels)
                img.load()
                return _to_rgb(img)
    except DataError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise DataError(f"not a readable image ({type(e).__name__}: {e})", name) from None
