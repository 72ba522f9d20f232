"""Optional dependencies: which extra of ``pip install "maskssd[EXTRA]"`` provides which module, and the one
check every optional feature makes before importing one.

The core install trains, evaluates, tracks and runs studies; serving, ONNX, video and PostgreSQL need their
extra, and say so (:func:`require`) instead of failing with a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from maskssd.errors import MaskSSDError

__all__ = ["EXTRAS", "MissingExtraError", "import_extra", "require"]

#: extra -> the modules it provides (import names), as declared in pyproject.toml.
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "python_multipart", "prometheus_client", "httpx"),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "video": ("cv2",),
    "postgres": ("psycopg",),
    "dashboard": ("optuna_dashboard",),
}


class MissingExtraError(MaskSSDError):
    """A feature needs an optional dependency that is not installed; names the extra that provides it."""

    def __init__(self, what: str, extra: str, module: str):
        self.extra, self.module = extra, module
        super().__init__(
            f'{what} needs the [{extra}] extra: pip install "maskssd[{extra}]" ({module} is not installed)'
        )


def import_extra(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` saying that ``what`` needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # ModuleNotFoundError, or a module blocked/broken in sys.modules
        missing = getattr(e, "name", None) or module
        raise MissingExtraError(what, extra, missing) from None


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Import every module of ``extra`` (or ``modules``), or raise :class:`MissingExtraError` for ``what``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r} (known: {', '.join(EXTRAS)})")
    for module in modules if modules is not None else EXTRAS[extra]:
        import_extra(module, extra, what)
