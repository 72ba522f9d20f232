"""ONNX Runtime int8: static quantisation of an exported detector, calibrated on training images.

The float export (BatchNorm folded) goes through ONNX Runtime's pre-processing (shape inference, graph
optimisation) and ``quantize_static``: QDQ format, weights int8 per output channel, activations uint8 with
ranges from the calibration images (min/max). On an x86 CPU without VNNI (AVX2 or AVX-512 alone: most laptops,
AMD before Zen 4) ONNX Runtime's u8s8 kernels multiply with ``vpmaddubsw``, whose 16-bit pair sums saturate
(255 x 127 x 2 > 32767): there the weights are quantised to 7 bits (``reduce_range``, ONNX Runtime's advice for
such CPUs), which keeps every pair sum in range. CPUs with VNNI (``avx512_vnni``, ``avx_vnni``) accumulate in 32
bits and keep the full 8 bits (:func:`int8_recipe`; the CPU check is injectable). Calibration images are a split's training images, evenly spaced over its list, preprocessed exactly
as :class:`maskssd.deploy.predictor.Predictor` preprocesses a frame. The heads' last convolutions and everything
after them (transposes, reshapes, the concatenations into ``locs`` and ``scores``) stay float by default: the
box offsets and logits keep their resolution, at the cost of a few small 1x1 convolutions.

``--backend onnx-int8`` caches the quantised model next to the checkpoint like the float export
(``<checkpoint>.int8-<key>.onnx``, the key a hash of the calibration files), rebuilt when the checkpoint or the
calibration set changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskssd.data.images import load_image
from maskssd.data.transforms import preprocess_images, to_chw
from maskssd.data.voc import VOCLayout
from maskssd.deploy.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    cached_onnx_session,
    checkpoint_fingerprint,
    export_onnx,
    onnx_session,
)
from maskssd.errors import MaskSSDError
from maskssd.files import atomic_path

__all__ = [
    "QUANT_VERSION",
    "cpu_flags",
    "has_vnni",
    "int8_recipe",
    "Calibration",
    "ImageCalibrationReader",
    "Int8Report",
    "calibration_files",
    "calibration_key",
    "export_int8",
    "head_nodes",
    "int8_cache_path",
    "int8_session_for",
    "quantize_onnx",
    "shape_nodes",
]

log = logging.getLogger(__name__)

#: Bumped when the quantisation recipe changes, so cached int8 models are rebuilt.
QUANT_VERSION = "2"


def cpu_flags() -> set[str]:
    """The CPU's features as the CPUID instruction reports them to this process (numpy's runtime detection, in
    ``/proc/cpuinfo``'s lower-case names; an emulated CPU answers for itself), else Linux ``/proc/cpuinfo``'s
    flags; empty where neither is readable."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            features = None
    if features:
        names = {"AVX512VNNI": "avx512_vnni", "AVX2": "avx2", "AVX512F": "avx512f"}
        return {names.get(k, k.lower()) for k, on in features.items() if on}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether this CPU has AVX-512 VNNI: int8 dot products that accumulate in 32 bits. (AVX-VNNI alone, which
    numpy's detection does not report, counts as none: 7-bit weights are correct there too, a little coarser.)"""
    flags = cpu_flags() if flags is None else flags
    return "avx512_vnni" in flags


def int8_recipe(vnni: bool | None = None, machine: str | None = None) -> dict[str, bool]:
    """How to quantise for this CPU: ``{"reduce_range": True}`` on an x86 CPU without VNNI (7-bit weights, so
    the u8s8 kernels cannot saturate), full 8-bit weights elsewhere. ``vnni`` and ``machine`` default to this
    machine's (tests pass them to take either path anywhere)."""
    import platform

    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64", "i686", "x86")
    return {"reduce_range": x86 and not (has_vnni() if vnni is None else vnni)}


@dataclass(frozen=True)
class Calibration:
    """Which images calibrate the activation ranges: ``images`` of split ``split`` of list ``split_name``."""

    root: Path
    split_name: str = "paper"
    images: int = 100
    split: str = "train"


def calibration_files(cal: Calibration) -> list[Path]:
    """``cal.images`` image files of the split, evenly spaced over its list (all of them if it is shorter)."""
    if cal.images < 1:
        raise MaskSSDError(f"calibration needs at least one image, got {cal.images}")
    layout = VOCLayout.detect(cal.root)
    ids = layout.read_split(cal.split_name, cal.split)
    if not ids:
        raise MaskSSDError(f"split {cal.split_name}/{cal.split} of {cal.root} lists no images")
    n = min(cal.images, len(ids))
    chosen = [ids[i * len(ids) // n] for i in range(n)]
    return [layout.image_path_for(i, None) for i in chosen]


def calibration_key(files: Sequence[Path], input_size: int, recipe: dict[str, bool] | None = None) -> str:
    """A short hash of the calibration set (file names, sizes, modification times) and the recipe."""
    recipe = int8_recipe() if recipe is None else recipe
    h = hashlib.sha256(f"{QUANT_VERSION}:{input_size}:{sorted(recipe.items())}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def preprocess_file(path: Path, input_size: int) -> np.ndarray:
    """One image file -> the ``(1, 3, S, S)`` float32 array the predictor feeds the model."""
    image = np.asarray(load_image(path))
    return preprocess_images([to_chw(image)], input_size).contiguous().numpy()


class ImageCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` over image files, one image per batch, read as needed."""

    def __init__(self, files: Sequence[Path], input_size: int):
        self.files, self.input_size, self._next = list(files), input_size, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.files):
            return None
        self._next += 1
        return {INPUT_NAME: preprocess_file(self.files[self._next - 1], self.input_size)}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.files)


def head_nodes(proto: Any) -> list[str]:
    """Names of the nodes between the last convolutions and the outputs, those convolutions included: the
    detection heads' projections and the transposes, reshapes and concatenations into ``locs``/``scores``.
    Shape computations are not followed (they carry no values)."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    found: dict[str, None] = {}
    stack = [o.name for o in proto.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in found or node.op_type == "Shape":
            continue
        found[node.name] = None
        if node.op_type != "Conv":
            stack.extend(node.input)
    return list(found)


def shape_nodes(proto: Any) -> list[str]:
    """Names of the nodes that compute on tensor shapes only (their inputs derive from ``Shape`` outputs and
    constants): kept out of quantisation, which would otherwise round a float-cast size or padding."""
    derived = {i.name for i in proto.graph.initializer}
    from_shape: set[str] = set()
    names = []
    for node in proto.graph.node:  # topological order
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" or (
            node.op_type != "Constant"
            and inputs
            and all(i in derived for i in inputs)
            and any(i in from_shape for i in inputs)
        ):
            from_shape.update(node.output)
            names.append(node.name)
        if node.op_type in ("Constant", "Shape") or (inputs and all(i in derived for i in inputs)):
            derived.update(node.output)
    return names


def quantize_onnx(
    float_path: str | Path,
    out: str | Path,
    reader: Any,
    *,
    exclude_heads: bool = True,
    metadata: dict[str, str] | None = None,
    recipe: dict[str, bool] | None = None,
) -> Path:
    """Statically quantise an ONNX detector (QDQ, per-channel int8 weights, uint8 activations calibrated by
    ``reader``), the heads float with ``exclude_heads``; written atomically with ``metadata``. ``recipe``
    (default: :func:`int8_recipe` of this CPU) says whether weights are reduced to 7 bits."""
    recipe = int8_recipe() if recipe is None else recipe
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="maskssd-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        proto = onnx.load(str(prepared))
        exclude = shape_nodes(proto) + (head_nodes(proto) if exclude_heads else [])
        with atomic_path(out, ".onnx") as tmp_out:
            quantize_static(
                str(prepared),
                str(tmp_out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=recipe["reduce_range"],
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,  # per-tensor ReduceMin/Max: little memory
            )
            proto = onnx.load(str(tmp_out))
            meta = {p.key: p.value for p in proto.metadata_props}
            bits = (
                "7-bit weights (reduce_range: a CPU without VNNI)"
                if recipe["reduce_range"]
                else "8-bit weights"
            )
            meta.update(
                {"maskssd.quantization": f"int8 qdq per-channel v{QUANT_VERSION}, {bits}", **(metadata or {})}
            )
            del proto.metadata_props[:]
            for k, v in meta.items():
                proto.metadata_props.add(key=k, value=str(v))
            onnx.save(proto, str(tmp_out))
    return out


def int8_cache_path(ckpt_path: str | Path, key: str) -> Path:
    """Where the int8 model of a checkpoint and calibration set is cached: next to the checkpoint."""
    return Path(f"{ckpt_path}.int8-{key}.onnx")


def int8_session_for(ckpt_path: str | Path, model: torch.nn.Module, calibration: Calibration) -> Any:
    """An ORT session of ``model`` (loaded from ``ckpt_path``) quantised with ``calibration``, from a cache next
    to the checkpoint (or ``~/.cache/maskssd/onnx/`` where that folder is read-only), rebuilt when the
    checkpoint or the calibration files change."""
    ckpt = Path(ckpt_path)
    files = calibration_files(calibration)
    key = calibration_key(files, int(model.input_size))
    fp = f"{checkpoint_fingerprint(ckpt)}|int8:{key}"
    alt_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskssd" / "onnx"
    where = hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:16]
    candidates = [int8_cache_path(ckpt, key), alt_dir / f"{ckpt.name}.{where}.int8-{key}.onnx"]
    for cache in candidates:
        session = cached_onnx_session(cache, ckpt, fp)
        if session is not None:
            return session
    last_error: OSError | None = None
    for cache in candidates:
        try:
            build_int8(model, cache, files, metadata={"maskssd.checkpoint": fp})
        except OSError as e:  # read-only folder: try the user cache
            last_error = e
            continue
        return onnx_session(cache)
    raise OSError(f"cannot write an int8 model for {ckpt}: {last_error}")


def build_int8(
    model: torch.nn.Module,
    out: str | Path,
    files: Sequence[Path],
    *,
    exclude_heads: bool = True,
    metadata: dict[str, str] | None = None,
    recipe: dict[str, bool] | None = None,
) -> Path:
    """Export ``model`` (BatchNorm folded, padding static) to ONNX and quantise it, calibrated on ``files``
    (``recipe``: :func:`int8_recipe`, default this CPU's)."""
    from maskssd.deploy.optimize import optimize_for_inference

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maskssd-int8-") as tmp:
        float_path = export_onnx(optimize_for_inference(model), Path(tmp) / "float.onnx", metadata=metadata)
        reader = ImageCalibrationReader(files, int(model.input_size))
        quantize_onnx(float_path, out, reader, exclude_heads=exclude_heads, metadata=metadata, recipe=recipe)
    log.info("int8 model %s calibrated on %d images in %.1f s", out, len(files), time.perf_counter() - t0)
    return Path(out)


# ------------------------------------------------------------------------------------------ export CLI
@dataclass
class Int8Report:
    """What :func:`export_int8` wrote and how closely it follows the float model on calibration images."""

    path: Path
    source: Path
    megabytes: float
    seconds: float
    calibration_images: int
    corr_locs: float
    corr_scores: float
    max_diff_locs: float
    max_diff_scores: float
    min_corr: float = 0.95
    reduce_range: bool = False  # 7-bit weights (a CPU without VNNI)

    @property
    def ok(self) -> bool:
        return min(self.corr_locs, self.corr_scores) >= self.min_corr


def compare_int8(model: torch.nn.Module, session: Any, files: Sequence[Path]) -> tuple[float, ...]:
    """(corr locs, corr scores, max abs diff locs, max abs diff scores) of an int8 session vs the float
    ``model`` on up to four of ``files``."""
    x = np.concatenate([preprocess_file(f, int(model.input_size)) for f in files[:4]])
    with torch.no_grad():
        ref = [t.numpy() for t in model.eval()(torch.from_numpy(x))]
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    corr = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ref, got)]
    diff = [float(np.abs(a - b).max()) for a, b in zip(ref, got)]
    return (*corr, *diff)


def export_int8(
    model_ref: str | Path,
    out: str | Path,
    calibration: Calibration,
    *,
    tracking_uri: str | None = None,
    recipe: dict[str, bool] | None = None,
) -> Int8Report:
    """Export a model reference (file, ``runs:/``, ``models:/``) as an int8 ONNX model calibrated on
    ``calibration`` (``recipe``: :func:`int8_recipe`, default this CPU's), and compare it with the float model
    (run by this CPU's kernels)."""
    recipe = int8_recipe() if recipe is None else recipe
    from maskssd.deploy.model_ref import resolve_checkpoint
    from maskssd.ssd.checkpoint import load, load_detector

    ckpt_path = resolve_checkpoint(model_ref, tracking_uri)
    ckpt = load(ckpt_path)
    model, _ = load_detector(ckpt, "cpu")
    files = calibration_files(calibration)
    meta = {
        "maskssd.class_names": json.dumps(list(ckpt.get("class_names", []))),
        "maskssd.decode": json.dumps(ckpt.get("decode", {})),
        "maskssd.source": str(model_ref),
        "maskssd.calibration": f"{calibration.root}:{calibration.split_name}/{calibration.split}:{len(files)}",
    }
    t0 = time.perf_counter()
    out = build_int8(model, out, files, metadata=meta, recipe=recipe)
    seconds = time.perf_counter() - t0
    stats = compare_int8(model, onnx_session(out), files)
    report = Int8Report(out, ckpt_path, out.stat().st_size / 1e6, seconds, len(files), *stats)
    report.reduce_range = recipe["reduce_range"]
    return report
