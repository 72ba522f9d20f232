"""Model references and backends, named in one light module (no torch, no MLflow): what ``--model`` and
``--backend`` accept, so the CLI's parser, the predictor, the export and the int8 export share them.

A reference is a checkpoint file, or a ``runs:/`` / ``models:/`` URI downloaded through the tracking layer
(imported only then, so serving a model file never loads MLflow).
"""

from __future__ import annotations

from pathlib import Path

from maskssd.errors import MaskSSDError

__all__ = ["BACKENDS", "resolve_checkpoint"]

#: ``backend`` values of :meth:`maskssd.deploy.predictor.Predictor.from_checkpoint` and the CLI's ``--backend``.
BACKENDS = ("torch", "onnx", "onnx-int8")


def resolve_checkpoint(
    ref: str | Path, tracking_uri: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local checkpoint file for a model reference: a file, or a ``runs:/`` / ``models:/`` URI (downloaded
    through the tracking layer, imported only then)."""
    ref_s = str(ref)
    if ref_s.startswith(("runs:/", "models:/")):
        from maskssd.tracking.registry import download_model

        return download_model(ref_s, tracking_uri, cache_dir)
    path = Path(ref_s).expanduser()
    if not path.is_file():
        raise MaskSSDError(f"model {ref_s!r} is neither a checkpoint file nor a runs:/ or models:/ URI")
    return path
