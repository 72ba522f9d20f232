"""Inference on raw images: resize, forward (PyTorch or ONNX Runtime), decode, NMS, boxes in original pixels.

One :class:`Predictor` serves ``detect``, ``serve``, the MLflow pyfunc model and the video loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskssd.data.transforms import preprocess_images, to_chw
from maskssd.deploy.model_ref import BACKENDS, resolve_backend, resolve_checkpoint
from maskssd.deploy.optimize import optimize_for_inference
from maskssd.errors import MaskSSDError
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD
from maskssd.ssd.postprocess import DecodeSpec, Detections, postprocess
from maskssd.ssd.priors import PriorSpec
from maskssd.ssd.tta import hflip_forward, mirror_permutation, tta_priors

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """Seconds spent per stage of the last call."""

    preprocess: float = 0.0
    model: float = 0.0
    postprocess: float = 0.0

    @property
    def total(self) -> float:
        return self.preprocess + self.model + self.postprocess


@dataclass
class Predictor:
    """A detector ready for raw images: a PyTorch ``model``, or an ONNX Runtime session (float or int8) with
    ``model`` None.

    ``tta_hflip`` also runs the model on the mirrored images and merges both predictions before NMS
    (:mod:`maskssd.ssd.tta`; needs the model's ``prior_spec``, taken from ``model`` when not given).
    """

    model: torch.nn.Module | None
    class_names: tuple[str, ...]
    input_size: int
    priors_cxcy: torch.Tensor
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    onnx_session: Any = None
    channels_last: bool = False  # run the PyTorch model in NHWC memory format (the model is converted here)
    last_timing: Timing = field(default_factory=Timing)
    tta_hflip: bool = False
    prior_spec: PriorSpec | None = None
    onnx_backend: str = "onnx"  # what ``backend`` says when an ONNX Runtime session runs the model
    #: per-class operating thresholds fitted on validation (``maskssd evaluate --fit-thresholds``; every run)
    thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels_last and self.model is not None:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.prior_spec is None:
            self.prior_spec = getattr(self.model, "prior_spec", None)
        self._mirror: torch.Tensor | None = None

    @property
    def mirror_index(self) -> torch.Tensor:
        """The mirror permutation of the priors (:func:`maskssd.ssd.tta.mirror_permutation`)."""
        if self._mirror is None:
            if self.prior_spec is None:
                raise MaskSSDError("tta_hflip needs the model's prior layout (Predictor(prior_spec=...))")
            self._mirror = mirror_permutation(self.prior_spec).to(self.priors_cxcy.device)
            if self._mirror.numel() != self.priors_cxcy.shape[0]:
                raise MaskSSDError("prior_spec does not describe these priors: tta_hflip is impossible")
        return self._mirror

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | Path,
        device: str | torch.device = "cpu",
        decode: DecodeSpec | None = None,
        backend: str = "torch",
        channels_last: bool | None = None,
        *,
        tta_hflip: bool = False,
        fold_bn: bool = True,
        calibration: Any = None,
        auto_int8: bool = True,
    ) -> Predictor:
        """``backend``: ``"torch"``, ``"onnx"`` (ONNX Runtime, export cached next to the checkpoint),
        ``"onnx-int8"`` (statically quantised, calibrated on ``calibration``, a
        :class:`maskssd.deploy.quantize.Calibration`, else on the images the checkpoint carries; cached
        likewise) or ``"auto"`` (the fastest correct one: :func:`maskssd.deploy.model_ref.resolve_backend`).

        ``channels_last``: run the PyTorch model in NHWC memory format; by default on CPU, where every
        maskssd detector runs 1.15-1.3x faster so (``benchmarks/model_forward.py``). ``fold_bn``: fold every
        BatchNorm into its convolution (:func:`maskssd.deploy.optimize.fold_batchnorm`; same outputs to ~1e-5,
        about 1.3x faster eager on CPU); "same" padding is made static either way (exact). ``tta_hflip``: see
        the class. ``auto_int8=False``: ``"auto"`` never picks int8 (an evaluation measures the float model).
        """
        from maskssd.ssd.checkpoint import load, load_detector

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        ckpt = load(ckpt_path)
        int8_ready = auto_int8 and (calibration is not None or bool(ckpt.get("calibration")))
        backend, why = resolve_backend(backend, str(device), int8_ready=int8_ready)
        log.info("backend %s (%s)", backend, why)
        model, _ = load_detector(ckpt, device)
        model = optimize_for_inference(model, fold_bn=fold_bn, inplace=True)
        spec = decode or DecodeSpec(**ckpt.get("decode", {}))
        nhwc = torch.device(device).type == "cpu" if channels_last is None else channels_last
        pred = cls(
            model,
            tuple(ckpt["class_names"]),
            model.input_size,
            model.priors_cxcy.to(device),
            spec,
            torch.device(device),
            channels_last=nhwc and backend == "torch",
            tta_hflip=tta_hflip,
            prior_spec=model.prior_spec,
            thresholds={str(k): float(v) for k, v in (ckpt.get("thresholds") or {}).items()},
        )
        if backend == "onnx":
            from maskssd.deploy.export import onnx_session_for

            pred.onnx_session = onnx_session_for(ckpt_path, model)
        elif backend == "onnx-int8":
            from maskssd.deploy.quantize import carried, int8_session_for

            pred.onnx_session = int8_session_for(ckpt_path, model, carried(ckpt, calibration))
        if backend != "torch":
            pred.model, pred.onnx_backend = None, backend
        return pred

    @property
    def backend(self) -> str:
        return self.onnx_backend if self.onnx_session is not None else "torch"

    def replica(self, threads: int) -> Predictor:
        """This predictor on a session of its own with ``threads`` threads (the same model file, decode and
        thresholds): one of several that detect on frames in flight (:mod:`maskssd.deploy.inflight`). ONNX
        Runtime backends only: a PyTorch model's threads are the process's."""
        from dataclasses import replace

        from maskssd.deploy.export import onnx_session

        path = getattr(self.onnx_session, "maskssd_model_file", None)
        if path is None:
            raise MaskSSDError(
                f"a {self.backend} predictor cannot be replicated: it needs an ONNX Runtime session"
            )
        return replace(self, onnx_session=onnx_session(path, threads), last_timing=Timing())

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.onnx_session is not None:
            locs, scores = self.onnx_session.run(None, {"images": batch.cpu().contiguous().numpy()})
            return torch.from_numpy(locs), torch.from_numpy(scores)
        batch = batch.to(self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(batch)

    def predict(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        decode: DecodeSpec | None = None,
        floor: float | torch.Tensor | None = None,
    ) -> list[Detections]:
        """``images``: uint8 ``(H, W, 3)`` arrays (RGB) or ``(3, H, W)`` tensors; detections in their pixels.

        ``floor`` (one score, or one per class ``(C-1,)``): decode only the detections scoring at least this,
        for a caller that shows nothing below it. They are exactly the ones it would keep from a full decode
        (greedy NMS and the top-k never let a lower score change a higher one), without the NMS of the
        thousands of low-score candidates that AP needs (:meth:`detect`)."""
        t0 = time.perf_counter()
        tensors = [to_chw(im) for im in images]
        sizes = torch.tensor([[t.shape[-1], t.shape[-2]] for t in tensors], dtype=torch.float32)
        batch = preprocess_images(tensors, self.input_size)
        t1 = time.perf_counter()
        priors = self.priors_cxcy
        if self.tta_hflip:
            _, (locs, scores) = hflip_forward(self.forward, batch, self.mirror_index)
            priors = tta_priors(priors)
        else:
            locs, scores = self.forward(batch)
        t2 = time.perf_counter()
        spec = decode or self.decode
        min_score = None if floor is None else decode_floor(spec, floor, len(self.class_names))
        dets = postprocess(locs, scores, priors.to(locs.device), spec, sizes.to(locs.device), min_score)
        dets = [Detections(d.boxes.cpu(), d.labels.cpu(), d.scores.cpu()) for d in dets]
        self.last_timing = Timing(t1 - t0, t2 - t1, time.perf_counter() - t2)
        return dets

    def detect(
        self, images: Sequence[np.ndarray | torch.Tensor], score_threshold: float | None = None
    ) -> list[Detections]:
        """What a user sees of each image (:meth:`shown` of :meth:`predict`, same detections), decoded from the
        display threshold up: the real-time path of ``detect``, ``serve`` and the pyfunc. Decoding from the AP
        protocol's ``min_score`` instead costs a trained model thousands of NMS candidates per crowded frame
        (measured by ``benchmarks/realtime_decode.py``, ``records/bench_realtime_decode.json``). The final
        ``above`` keeps exactly what the floor kept; it states what is shown."""
        t = self.display_threshold(score_threshold)
        return [d.above(t) for d in self.predict(images, floor=t)]

    def warmup(self) -> float:
        """One prediction on a blank frame, before the first real one: it compiles the CPU kernels (numba, on
        first use after an install) and sizes the backend's buffers, so a server's first camera frame is not
        the slow one. Returns its seconds."""
        t0 = time.perf_counter()
        self.detect([np.zeros((self.input_size, self.input_size, 3), dtype=np.uint8)])
        return time.perf_counter() - t0

    def display_threshold(self, score_threshold: float | None = None) -> float | torch.Tensor:
        """What is shown: ``score_threshold`` when given, else the model's per-class thresholds as a tensor
        ``(C-1,)`` (``DISPLAY_THRESHOLD`` for a class without one), else ``DISPLAY_THRESHOLD``; for
        :meth:`Detections.above`."""
        if score_threshold is not None:
            return float(score_threshold)
        if not self.thresholds:
            return DISPLAY_THRESHOLD
        return torch.tensor([self.thresholds.get(c, DISPLAY_THRESHOLD) for c in self.class_names])

    def threshold_doc(self, score_threshold: float | None = None) -> float | dict[str, float]:
        """:meth:`display_threshold` for JSON: one number, or ``{class: threshold}``."""
        t = self.display_threshold(score_threshold)
        if isinstance(t, float):
            return t
        return {c: float(self.thresholds.get(c, DISPLAY_THRESHOLD)) for c in self.class_names}

    def shown(self, dets: Detections, score_threshold: float | None = None) -> Detections:
        """The detections a user sees (see :meth:`display_threshold`)."""
        return dets.above(self.display_threshold(score_threshold))

    def describe(self) -> dict[str, Any]:
        return {
            "classes": list(self.class_names),
            "input_size": self.input_size,
            "backend": self.backend,
            "decode": asdict(self.decode),
            "tta_hflip": self.tta_hflip,
            "thresholds": dict(self.thresholds),
        }


class PredictorModule(torch.nn.Module):
    """A predictor's model call (any backend) as a module with the detector interface that
    :func:`maskssd.training.engine.evaluate` uses: ``forward``, ``priors_cxcy``, ``prior_spec``, ``input_size``."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.predictor = predictor
        self.register_buffer("priors_cxcy", predictor.priors_cxcy, persistent=False)
        self.prior_spec = predictor.prior_spec
        self.input_size = predictor.input_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor.forward(images)


def load_predictor(
    ref: str | Path,
    tracking_uri: str | None = None,
    device: str = "cpu",
    backend: str = "torch",
    *,
    tta_hflip: bool = False,
    fold_bn: bool = True,
    calibration: Any = None,
    auto_int8: bool = True,
    **decode_overrides: Any,
) -> Predictor:
    """A :class:`Predictor` for any model reference (options as :meth:`Predictor.from_checkpoint`);
    ``decode_overrides`` (None values ignored) adjust decoding."""
    pred = Predictor.from_checkpoint(
        resolve_checkpoint(ref, tracking_uri),
        device=device,
        backend=backend,
        tta_hflip=tta_hflip,
        fold_bn=fold_bn,
        calibration=calibration,
        auto_int8=auto_int8,
    )
    overrides = {k: v for k, v in decode_overrides.items() if v is not None}
    if overrides:
        pred.decode = replace(pred.decode, **overrides)
    return pred


def decode_floor(spec: DecodeSpec, floor: float | torch.Tensor, num_classes: int) -> torch.Tensor:
    """The per-class decode threshold ``(C-1,)`` that keeps exactly the detections scoring at least ``floor``
    (and above ``spec.min_score``): the decoder keeps ``p > t``, :meth:`Detections.above` keeps ``p >= t``, so
    the float32 number just below ``floor`` (scores are float32)."""
    f = torch.as_tensor(floor, dtype=torch.float32).expand(num_classes).clone()
    f = torch.nextafter(f, torch.zeros_like(f))
    return torch.maximum(f, torch.tensor(spec.min_score, dtype=torch.float32))
