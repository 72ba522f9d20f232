"""Model references and backends, named in one light module (no torch, no MLflow): what ``--model`` and
``--backend`` accept, so the CLI's parser, the predictor, the export and the int8 export share them.

A reference is a checkpoint file, or a ``runs:/`` / ``models:/`` URI downloaded through the tracking layer
(imported only then, so serving a model file never loads MLflow).
"""

from __future__ import annotations

from pathlib import Path

from maskssd.errors import MaskSSDError

__all__ = ["BACKENDS", "resolve_backend", "resolve_checkpoint"]

#: ``backend`` values of :meth:`maskssd.deploy.predictor.Predictor.from_checkpoint` and the CLI's ``--backend``.
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


def resolve_backend(
    backend: str, device: str = "cpu", *, int8_ready: bool = False, vnni: bool | None = None
) -> tuple[str, str]:
    """``(backend, why)``: ``auto`` is ONNX Runtime on a CPU where the ``[onnx]`` extra is installed, PyTorch
    otherwise (a GPU, or no ONNX Runtime). On a CPU with VNNI (``vnni``, default this one's), for a model that
    carries its calibration images (``int8_ready``), ONNX Runtime int8: there it keeps the accuracy and runs
    more frames than float (the int8 rule in ``docs/results-log.md``); elsewhere float, faster than PyTorch
    eager on a CPU (``benchmarks/inference_fps``), the same detections within 1e-4."""
    if backend != "auto":
        return backend, "asked for"
    if not str(device).startswith("cpu"):
        return "torch", f"auto: PyTorch on {device}"
    import importlib.util

    if not all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript")):
        return "torch", 'auto: PyTorch (ONNX Runtime is faster on a CPU: pip install "maskssd[onnx]")'
    if vnni is None:
        from maskssd.deploy.cpu import has_vnni

        vnni = has_vnni()
    if vnni and int8_ready:
        return "onnx-int8", "auto: ONNX Runtime int8 (this CPU has VNNI; the model carries its calibration)"
    if vnni:
        return "onnx", "auto: ONNX Runtime float (int8 needs calibration images this model does not carry)"
    return "onnx", "auto: ONNX Runtime float (int8 only where the CPU has VNNI)"


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
