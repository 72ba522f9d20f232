"""Decoded images cached once per process, shared by every dataset of that process.

A study worker trains many trials one after the other, each building new datasets over the same files; with
``data.cache_images = true`` they all read from this cache, so only the first trial decodes the images. Entries
are keyed by path, modification time, size and pixel limit (a rewritten file is decoded again) and evicted
least-recently-used beyond a byte budget: ``$MASKSSD_IMAGE_CACHE_MB`` (default 4096 MB; ``0`` turns caching off).
Cached tensors are shared: transforms must not modify them in place (none does: they return new tensors).
DataLoader worker processes each hold their own copy, as a per-dataset cache would.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CacheStats", "ImageCache", "shared_image_cache"]

ENV_VAR = "MASKSSD_IMAGE_CACHE_MB"
DEFAULT_MB = 4096

_Key = tuple[str, int, int, int]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int


class ImageCache:
    """A thread-safe LRU of decoded uint8 image tensors, bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[_Key, torch.Tensor] = OrderedDict()
        self._bytes = self._hits = self._misses = 0
        self._lock = threading.Lock()

    def get(self, path: str | Path, max_pixels: int, decode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor of ``path``, or ``decode()`` (cached when it fits the budget)."""
        try:
            st = os.stat(path)
        except OSError:  # let the decoder raise its error naming the file
            return decode()
        key = (str(path), st.st_mtime_ns, st.st_size, max_pixels)
        with self._lock:
            img = self._items.get(key)
            if img is not None:
                self._items.move_to_end(key)
                self._hits += 1
                return img
            self._misses += 1
        img = decode()
        size = img.numel() * img.element_size()
        if size > self.max_bytes:
            return img
        with self._lock:
            if key not in self._items:
                self._items[key] = img
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return img

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = self._hits = self._misses = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._items), self._bytes)


def _budget() -> int:
    raw = os.environ.get(ENV_VAR, "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_MB
    except ValueError:
        mb = DEFAULT_MB
    return max(int(mb * 2**20), 0)


_SHARED = ImageCache(_budget())


def shared_image_cache() -> ImageCache:
    """The process's cache (what ``FaceMaskDataset(cache_images=True)`` reads through)."""
    return _SHARED
