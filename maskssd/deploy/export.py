"""Exporting detectors to ONNX and TorchScript, and the cached ONNX Runtime session behind ``--backend onnx``.

Exported graphs hold the network only (``images (N, 3, S, S)`` float in [0, 1] -> ``locs (N, P, 4)``,
``scores (N, P, C)`` logits, the batch dimension dynamic); decoding and NMS stay in
:func:`maskssd.postprocess.postprocess`, so every backend shares one post-processing path.

ONNX export uses the TorchScript-based exporter (``dynamo=False``): with torch 2.14 both exporters give
identical graphs for these convolutional networks, but the legacy one takes about a second where the
``torch.export`` path takes ten; the dynamo exporter is the fallback if the legacy one ever fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskssd.deploy.optimize import optimize_for_inference
from maskssd.errors import MaskSSDError
from maskssd.files import atomic_path, user_cache

INPUT_NAME = "images"
OUTPUT_NAMES = ("locs", "scores")
#: Bumped when the exported graph changes, so cached ``<checkpoint>.onnx`` files are rebuilt.
EXPORT_VERSION = "2"  # 2: exported after maskssd.deploy.optimize (BatchNorm folded, static "same" padding)


# ------------------------------------------------------------------------------------------- helpers
def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads share a core's FPU: no use for inference)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        phys = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "physical id":
                phys = value
            elif key == "core id":
                core = value
            elif not key and core:  # blank line ends a processor block
                cores.add((phys, core))
                phys = core = ""
        if core:
            cores.add((phys, core))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _dummy_input(model: torch.nn.Module, batch: int = 1, seed: int = 0) -> torch.Tensor:
    size = int(model.input_size)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g).to(device)


# ---------------------------------------------------------------------------------------------- ONNX
def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    opset: int = 17,
    metadata: dict[str, str] | None = None,
    dynamo: bool = False,
) -> Path:
    """Write ``model``'s forward as ONNX (input ``images``, outputs ``locs``/``scores``, dynamic batch), atomically.

    ``metadata`` lands in the model's ``metadata_props`` (class names, input size ... for other runtimes).
    """
    from maskssd.extras import import_extra, require

    require("onnx", "ONNX export")  # onnx to check the graph, onnxscript for the dynamo exporter
    onnx = import_extra("onnx", "onnx", "ONNX export")

    path = Path(path)
    with _eval_mode(model), torch.no_grad():
        x = _dummy_input(model)
        locs, scores = model(x)
        with atomic_path(path, ".onnx") as tmp:
            try:
                _torch_onnx_export(model, x, tmp, opset, dynamo)
            except Exception as e:  # the exporter's own error types vary between releases
                if dynamo:
                    raise
                warnings.warn(
                    f"legacy ONNX export failed ({type(e).__name__}: {e}); retrying with dynamo=True",
                    stacklevel=2,
                )
                _torch_onnx_export(model, x, tmp, opset, True)
            proto = onnx.load(str(tmp))
            # the legacy exporter leaves the prior and class dims symbolic; they are fixed by the model
            for out, ref in zip(proto.graph.output, (locs, scores), strict=True):
                dims = out.type.tensor_type.shape.dim
                for i in range(1, len(dims)):
                    dims[i].dim_value = int(ref.shape[i])
                if dims:
                    dims[0].dim_param = "batch"
            meta = {
                "maskssd.export_version": EXPORT_VERSION,
                "maskssd.input_size": str(int(model.input_size)),
                **(metadata or {}),
            }
            if getattr(model, "build_args", None):
                meta.setdefault("maskssd.build_args", json.dumps(model.build_args, default=str))
            del proto.metadata_props[:]
            for k, v in meta.items():
                proto.metadata_props.add(key=k, value=str(v))
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    return path


def _torch_onnx_export(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: int, dynamo: bool) -> None:
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": list(OUTPUT_NAMES),
        "opset_version": opset,
    }
    if dynamo:
        kwargs["dynamic_shapes"] = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
    else:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kwargs)


def onnx_session_options(threads: int | None = None) -> Any:
    """ORT session options: all graph optimisations, ``threads`` (default: physical cores) threads per call."""
    from maskssd.extras import import_extra

    ort = import_extra("onnxruntime", "onnx", "the ONNX Runtime backend")

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    # no spin-waiting after a run by default: the threads would steal the cores from the torch pre/post-
    # processing that follows every forward (measured once: NMS after an ORT call took 1.8x as long with
    # spinning on); $MASKSSD_ORT_SPINNING=1 turns it on (``benchmarks.realtime_decode --spinning`` weighs it)
    spin = "1" if ort_spinning() else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def ort_spinning() -> bool:
    """Whether ONNX Runtime's worker threads spin-wait between calls (``$MASKSSD_ORT_SPINNING``, off by
    default): a session made while it is set keeps it."""
    value = os.environ.get("MASKSSD_ORT_SPINNING", "0").strip().lower()
    if value not in ("0", "1", "", "false", "true", "off", "on"):
        raise MaskSSDError(f"MASKSSD_ORT_SPINNING={value!r}: use 1 (spin) or 0 (sleep, the default)")
    return value in ("1", "true", "on")


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for an exported detector."""
    from maskssd.extras import import_extra

    ort = import_extra("onnxruntime", "onnx", "the ONNX Runtime backend")

    session = ort.InferenceSession(
        str(path), onnx_session_options(threads), providers=["CPUExecutionProvider"]
    )
    session.maskssd_model_file = str(path)  # a replica with other threads opens it again (deploy.inflight)
    return session


def checkpoint_fingerprint(ckpt: Path) -> str:
    """Size, modification time and export version of a checkpoint: a cached export made from it matches."""
    st = ckpt.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{EXPORT_VERSION}"


def onnx_cache_path(ckpt_path: str | Path) -> Path:
    """Where the ONNX export of a checkpoint is cached: ``<checkpoint>.onnx`` next to it."""
    return Path(str(ckpt_path) + ".onnx")


def onnx_session_for(ckpt_path: str | Path, model: torch.nn.Module) -> Any:
    """An ORT session for ``model`` (loaded from ``ckpt_path``) from a cached export next to the checkpoint.

    The cache is rebuilt when it is missing, older than the checkpoint, made from another checkpoint file
    (size/mtime recorded in its metadata), or unreadable. Where the checkpoint's folder is read-only the
    export goes to ``~/.cache/maskssd/onnx/``.
    """
    ckpt = Path(ckpt_path)
    fp = checkpoint_fingerprint(ckpt)
    candidates = [onnx_cache_path(ckpt)]
    alt_dir = user_cache("onnx")
    key = hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:16]
    candidates.append(alt_dir / f"{ckpt.name}.{key}.onnx")
    for cache in candidates:
        session = cached_onnx_session(cache, ckpt, fp)
        if session is not None:
            return session
    last_error: OSError | None = None
    for cache in candidates:
        try:
            export_onnx(model, cache, metadata={"maskssd.checkpoint": fp})
        except OSError as e:  # read-only folder: try the user cache
            last_error = e
            continue
        return onnx_session(cache)
    raise OSError(f"cannot write an ONNX export for {ckpt}: {last_error}")


def cached_onnx_session(cache: Path, ckpt: Path, fp: str) -> Any:
    """A session for ``cache`` if it is a readable export of ``ckpt`` (``fp``) newer than it, else None."""
    if not cache.is_file() or cache.stat().st_mtime_ns < ckpt.stat().st_mtime_ns:
        return None
    try:
        session = onnx_session(cache)
    except Exception:  # onnxruntime raises its own (non-exported) exception types for corrupt files
        return None
    if session.get_modelmeta().custom_metadata_map.get("maskssd.checkpoint") != fp:
        return None
    return session


# --------------------------------------------------------------------------------------- TorchScript
def export_torchscript(model: torch.nn.Module, path: str | Path) -> Path:
    """Trace ``model`` on a dummy batch and save the TorchScript module atomically (batch size stays dynamic)."""
    path = Path(path)
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # torch.jit.trace is deprecated in favour of torch.export
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, _dummy_input(model), check_trace=False)
        with atomic_path(path, ".pt") as tmp:
            torch.jit.save(traced, str(tmp))
    return path


def load_torchscript(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


# ------------------------------------------------------------------------------------------------ CLI
def verify_export(
    model: torch.nn.Module, path: str | Path, fmt: str, batch: int = 2, seed: int = 1
) -> tuple[float, float]:
    """Max abs difference of (locs, scores) between ``model`` and its export on a random batch."""
    with _eval_mode(model), torch.no_grad():
        x = _dummy_input(model, batch, seed)
        ref_locs, ref_scores = model(x)
        if fmt == "onnx":
            sess = onnx_session(path)
            locs, scores = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x.cpu().numpy()})
        else:
            locs, scores = (t.cpu().numpy() for t in load_torchscript(path)(x))
    return (
        float(np.abs(locs - ref_locs.cpu().numpy()).max()),
        float(np.abs(scores - ref_scores.cpu().numpy()).max()),
    )


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how closely it matches PyTorch."""

    path: Path
    fmt: str
    source: Path
    megabytes: float
    seconds: float
    io: list[tuple[str, str, str, list[Any]]]  # (input|output, name, type, shape)
    max_diff_locs: float
    max_diff_scores: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.max_diff_locs, self.max_diff_scores) <= self.tolerance


def export_model(
    model_ref: str | Path, fmt: str, out: str | Path, *, tracking_uri: str | None = None
) -> ExportReport:
    """Export a model reference (file, ``runs:/``, ``models:/``) to ONNX or TorchScript and verify it."""
    from maskssd.deploy.model_ref import resolve_checkpoint
    from maskssd.ssd.checkpoint import load, load_detector

    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"format must be 'onnx' or 'torchscript', not {fmt!r}")
    ckpt_path = resolve_checkpoint(model_ref, tracking_uri)
    ckpt = load(ckpt_path)
    model, _ = load_detector(ckpt, "cpu")
    out = Path(out)
    t0 = time.perf_counter()
    # BatchNorm folded into ONNX (the exporter folds it anyway; TorchScript stays exact to 1e-5), static
    # "same" padding in both; verified below against the model as loaded
    optimized = optimize_for_inference(model, fold_bn=fmt == "onnx")
    if fmt == "onnx":
        meta = {
            "maskssd.class_names": json.dumps(list(ckpt.get("class_names", []))),
            "maskssd.decode": json.dumps(ckpt.get("decode", {})),
            "maskssd.source": str(model_ref),
        }
        export_onnx(optimized, out, metadata=meta)
    else:
        export_torchscript(optimized, out)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        locs, scores = model(_dummy_input(model))
    if fmt == "onnx":
        sess = onnx_session(out)
        io = [
            (kind, it.name, it.type, list(it.shape))
            for kind, items in (("input", sess.get_inputs()), ("output", sess.get_outputs()))
            for it in items
        ]
    else:
        size = int(model.input_size)
        io = [
            ("input", "images", "float32", ["N", 3, size, size]),
            ("output", "locs", "float32", ["N", locs.shape[1], locs.shape[2]]),
            ("output", "scores", "float32", ["N", scores.shape[1], scores.shape[2]]),
        ]
    d_locs, d_scores = verify_export(model, out, fmt)
    return ExportReport(
        out,
        fmt,
        ckpt_path,
        out.stat().st_size / 1e6,
        seconds,
        io,
        d_locs,
        d_scores,
        1e-4 if fmt == "onnx" else 1e-5,
    )
