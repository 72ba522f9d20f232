"""ONNX Runtime int8: static quantisation of an exported detector, calibrated on training images.

The float export (BatchNorm folded) goes through ONNX Runtime's pre-processing (shape inference, graph
optimisation) and ``quantize_static``: QDQ format, weights int8 per output channel, activations uint8 with
ranges from the calibration images (min/max). On an x86 CPU without VNNI (AVX2 or AVX-512 alone: most laptops,
AMD before Zen 4) ONNX Runtime's u8s8 kernels multiply with ``vpmaddubsw``, whose 16-bit pair sums saturate
(255 x 127 x 2 > 32767): there the weights are quantised to 7 bits (``reduce_range``, ONNX Runtime's advice for
such CPUs), which keeps every pair sum in range. CPUs with VNNI (``avx512_vnni``, ``avx_vnni``) accumulate in 32
bits and keep the full 8 bits (:func:`int8_recipe`; the CPU check is injectable).

Calibration images are the ones a trained model carries (:mod:`maskssd.data.calibration`: its own training
images, so a registered model quantises with no dataset at hand), or a split's training images, evenly spaced
over its list (``--calibration DATA_ROOT``: for models from before they were carried, or another set);
either is preprocessed exactly as :class:`maskssd.deploy.predictor.Predictor` preprocesses a frame.

The heads' last convolutions and everything after them (transposes, reshapes, the concatenations into ``locs``
and ``scores``) stay float by default: the box offsets and logits keep their resolution, at the cost of a few
small 1x1 convolutions.

``--backend onnx-int8`` caches the quantised model next to the checkpoint like the float export
(``<checkpoint>.int8-<key>.onnx``, the key a hash of the calibration images), rebuilt when the checkpoint or the
calibration set changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskssd.data.calibration import calibration_digest, decode_calibration, evenly_spaced
from maskssd.data.images import load_image
from maskssd.data.transforms import preprocess_images, to_chw
from maskssd.data.voc import VOCLayout
from maskssd.deploy.cpu import cpu_flags, has_vnni
from maskssd.deploy.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    cached_onnx_session,
    checkpoint_fingerprint,
    export_onnx,
    onnx_session,
)
from maskssd.errors import MaskSSDError
from maskssd.files import atomic_path, user_cache

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
    "calibration_set",
    "carried",
    "carry_calibration",
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
    images: int = 100  # as many as training stores (maskssd.data.calibration)
    split: str = "train"


def calibration_files(cal: Calibration) -> list[Path]:
    """``cal.images`` image files of the split, evenly spaced over its list (all of them if it is shorter)."""
    if cal.images < 1:
        raise MaskSSDError(f"calibration needs at least one image, got {cal.images}")
    layout = VOCLayout.detect(cal.root)
    ids = layout.read_split(cal.split_name, cal.split)
    if not ids:
        raise MaskSSDError(f"split {cal.split_name}/{cal.split} of {cal.root} lists no images")
    return [layout.image_path_for(i, None) for i in evenly_spaced(ids, cal.images)]


def calibration_key(files: Sequence[Path], input_size: int, recipe: dict[str, bool] | None = None) -> str:
    """A short hash of the calibration set (file names, sizes, modification times) and the recipe."""
    recipe = int8_recipe() if recipe is None else recipe
    h = hashlib.sha256(f"{QUANT_VERSION}:{input_size}:{sorted(recipe.items())}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


#: A calibration image: a file, or a uint8 ``(3, H, W)`` tensor (one a checkpoint carries).
CalibrationImage = Path | torch.Tensor


def calibration_set(
    calibration: Calibration | Mapping[str, Any], input_size: int, recipe: dict[str, bool] | None = None
) -> tuple[list[CalibrationImage], str, str]:
    """``(images, cache key, description)`` of a dataset's files (:class:`Calibration`) or of the images a
    checkpoint carries (its ``"calibration"`` entry)."""
    if isinstance(calibration, Calibration):
        files = calibration_files(calibration)
        where = f"{calibration.root}:{calibration.split_name}/{calibration.split}:{len(files)}"
        return list(files), calibration_key(files, input_size, recipe), where
    images = decode_calibration(calibration)
    recipe = int8_recipe() if recipe is None else recipe
    key = hashlib.sha256(
        f"{QUANT_VERSION}:{input_size}:{sorted(recipe.items())}:{calibration_digest(calibration)}".encode()
    ).hexdigest()[:12]
    return list(images), key, f"carried by the model: {len(images)} of {calibration.get('source') or '?'}"


def preprocess_file(path: CalibrationImage, input_size: int) -> np.ndarray:
    """One image file (or uint8 ``(3, H, W)`` tensor) -> the ``(1, 3, S, S)`` float32 array the predictor feeds
    the model."""
    chw = path if isinstance(path, torch.Tensor) else to_chw(np.asarray(load_image(path)))
    return preprocess_images([chw], input_size).contiguous().numpy()


class ImageCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` over calibration images, one per batch, read as needed."""

    def __init__(self, files: Sequence[CalibrationImage], input_size: int):
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


def carried(ckpt: Mapping[str, Any], calibration: Calibration | None) -> Calibration | Mapping[str, Any]:
    """``calibration`` where given, else the images the checkpoint carries; an error naming both ways where
    neither is there (a model trained before maskssd stored them)."""
    if calibration is not None:
        return calibration
    if ckpt.get("calibration"):
        return ckpt["calibration"]
    raise MaskSSDError(
        "int8 needs calibration images and this model carries none (trained before maskssd stored them): "
        "pass --calibration DATA_ROOT (its training images)"
    )


def int8_cache_path(ckpt_path: str | Path, key: str) -> Path:
    """Where the int8 model of a checkpoint and calibration set is cached: next to the checkpoint."""
    return Path(f"{ckpt_path}.int8-{key}.onnx")


def int8_session_for(
    ckpt_path: str | Path, model: torch.nn.Module, calibration: Calibration | Mapping[str, Any]
) -> Any:
    """An ORT session of ``model`` (loaded from ``ckpt_path``) quantised with ``calibration`` (a dataset's
    images, or those the checkpoint carries), from a cache next to the checkpoint (or
    ``~/.cache/maskssd/onnx/`` where that folder is read-only), rebuilt when the checkpoint or the calibration
    images change."""
    ckpt = Path(ckpt_path)
    files, key, _ = calibration_set(calibration, int(model.input_size))
    fp = f"{checkpoint_fingerprint(ckpt)}|int8:{key}"
    alt_dir = user_cache("onnx")
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
    files: Sequence[CalibrationImage],
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
    calibrated_on: str = ""  # which images: a dataset's split, or those the model carries

    @property
    def ok(self) -> bool:
        return min(self.corr_locs, self.corr_scores) >= self.min_corr


def compare_int8(
    model: torch.nn.Module, session: Any, files: Sequence[CalibrationImage]
) -> tuple[float, ...]:
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
    calibration: Calibration | None = None,
    *,
    tracking_uri: str | None = None,
    recipe: dict[str, bool] | None = None,
) -> Int8Report:
    """Export a model reference (file, ``runs:/``, ``models:/``) as an int8 ONNX model calibrated on
    ``calibration`` (default: the images the model carries; ``recipe``: :func:`int8_recipe`, default this
    CPU's), and compare it with the float model (run by this CPU's kernels)."""
    recipe = int8_recipe() if recipe is None else recipe
    from maskssd.deploy.model_ref import resolve_checkpoint
    from maskssd.ssd.checkpoint import load, load_detector

    ckpt_path = resolve_checkpoint(model_ref, tracking_uri)
    ckpt = load(ckpt_path)
    model, _ = load_detector(ckpt, "cpu")
    files, _, where = calibration_set(carried(ckpt, calibration), int(model.input_size), recipe)
    meta = {
        "maskssd.class_names": json.dumps(list(ckpt.get("class_names", []))),
        "maskssd.decode": json.dumps(ckpt.get("decode", {})),
        "maskssd.source": str(model_ref),
        "maskssd.calibration": where,
    }
    t0 = time.perf_counter()
    out = build_int8(model, out, files, metadata=meta, recipe=recipe)
    seconds = time.perf_counter() - t0
    stats = compare_int8(model, onnx_session(out), files)
    report = Int8Report(out, ckpt_path, out.stat().st_size / 1e6, seconds, len(files), *stats)
    report.reduce_range, report.calibrated_on = recipe["reduce_range"], where
    return report


def carry_calibration(
    model_ref: str | Path, out: str | Path, calibration: Calibration, *, tracking_uri: str | None = None
) -> tuple[Path, int]:
    """Write the model's checkpoint again to ``out``, carrying ``calibration``'s images (resized and
    JPEG-compressed as training stores them): a model trained before maskssd stored them then quantises with
    no dataset at hand, and ``--backend auto`` may choose int8 for it. Returns the file and how many images."""
    from maskssd.data.calibration import embed_calibration
    from maskssd.deploy.model_ref import resolve_checkpoint
    from maskssd.ssd.checkpoint import atomic_save, load, load_detector

    ckpt = dict(load(resolve_checkpoint(model_ref, tracking_uri)))
    model, _ = load_detector(ckpt, "cpu")
    files = calibration_files(calibration)
    where = f"{calibration.split_name}/{calibration.split} of {calibration.root}"
    ckpt["calibration"] = embed_calibration(files, int(model.input_size), len(files), where)
    return atomic_save(ckpt, out), len(files)
