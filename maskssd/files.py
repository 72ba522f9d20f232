"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one; and
where maskssd keeps what it can build again (:func:`user_cache`).

Every writer of a file that something else reads back (checkpoints, ONNX exports, generated data, splits,
camera montages) writes a temporary file in the same folder and renames it over the target, which is atomic
on POSIX and Windows file systems.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "user_cache", "write_text_atomic"]


def user_cache(*parts: str) -> Path:
    """A folder of maskssd's cache (downloaded models, ONNX and int8 builds of read-only checkpoints):
    ``$MASKSSD_CACHE_DIR``, else ``$XDG_CACHE_HOME/maskssd``, else ``~/.cache/maskssd``; not created here."""
    root = os.environ.get("MASKSSD_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maskssd"
    return Path(root).joinpath(*parts)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path``, renamed over it when the block succeeds (removed if it fails).

    ``suffix`` matters to writers that pick a format from the file name (``.onnx``, ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
