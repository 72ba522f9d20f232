"""Benchmark: single-image CPU inference speed per model and backend (PyTorch eager NCHW and channels_last,
TorchScript, ONNX Runtime).

For each model (random weights: speed does not depend on them) and backend, a :class:`maskssd.predictor.Predictor`
runs batch-1 inference on a 640x480 uint8 frame, as a camera would send it: end to end (resize + forward +
decode/NMS) and the forward alone (``Predictor.last_timing.model``). The median of ``--repeats`` runs after
warm-up is reported; PyTorch eager is the baseline of the speed-up column. Backends take turns call by call.
On a machine busy with other work, multi-threaded PyTorch can stall at every parallel region waiting for a
descheduled worker thread; ``--threads 1`` then gives steadier numbers.
Run: ``.venv/bin/python -m benchmarks.inference_fps [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from maskssd.deploy.export import (
    export_onnx,
    export_torchscript,
    load_torchscript,
    onnx_session,
    physical_cores,
)
from maskssd.deploy.predictor import Predictor
from maskssd.ssd.models import build_model
from maskssd.ssd.postprocess import DecodeSpec

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")
MODELS: list[tuple[str, str, dict[str, Any]]] = [  # (label, registry name, build kwargs)
    ("tiny 128", "tiny", {"input_size": 128}),
    ("ssdlite_mobilenet_v3 320", "ssdlite_mobilenet_v3", {"input_size": 320, "pretrained": False}),
    ("ssdlite_effnet_lite0 320", "ssdlite_effnet_lite0", {"input_size": 320, "pretrained": False}),
    ("ssdlite_effnet_lite0 384", "ssdlite_effnet_lite0", {"input_size": 384, "pretrained": False}),
    ("ssd300_vgg16", "ssd300_vgg16", {"pretrained": False}),
]
BACKENDS = ("eager", "eager NHWC", "torchscript", "onnx")  # eager NHWC: channels_last, the CPU default
#: the deployment decode (server/detect default score threshold, the paper's NMS settings)
DECODE = DecodeSpec(min_score=0.4, max_overlap=0.45, top_k=200)


def camera_frame(seed: int = 0) -> np.ndarray:
    """A 640x480 RGB frame with a few face-sized blobs (content does not change the timing much)."""
    rng = np.random.default_rng(seed)
    img = np.full((480, 640, 3), 90, np.uint8) + rng.integers(0, 30, (480, 640, 3), dtype=np.uint8)
    for _ in range(6):
        x, y, s = int(rng.integers(0, 560)), int(rng.integers(0, 400)), int(rng.integers(30, 80))
        img[y : y + s, x : x + s] = rng.integers(0, 255, 3)
    return img


class _TorchScriptRunner:
    """Calls a TorchScript module outside inference mode: under ``torch.inference_mode`` (which
    ``Predictor.forward`` uses) the profiling executor never settles and every call takes the slow path."""

    def __init__(self, module: torch.jit.ScriptModule):
        self.module = module

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(False), torch.no_grad():
            return self.module(x)


def make_predictor(model: torch.nn.Module, backend: str, workdir: Path, threads: int = 0) -> Predictor:
    """A Predictor running ``model`` through ``backend`` (exported to ``workdir`` when needed)."""
    if (
        backend == "eager NHWC"
    ):  # what Predictor.from_checkpoint does on CPU (on a copy: the others stay NCHW)
        return Predictor(
            copy.deepcopy(model), CLASSES, model.input_size, model.priors_cxcy, DECODE, channels_last=True
        )
    pred = Predictor(model, CLASSES, model.input_size, model.priors_cxcy, DECODE)
    if backend == "torchscript":
        pred.model = _TorchScriptRunner(load_torchscript(export_torchscript(model, workdir / "model.ts")))  # type: ignore[assignment]
    elif backend == "onnx":
        pred.onnx_session = onnx_session(export_onnx(model, workdir / "model.onnx"), threads or None)
        pred.model = None
    return pred


def measure(
    preds: dict[str, Predictor], frame: np.ndarray, warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median end-to-end and model-only milliseconds of ``repeats`` batch-1 predictions per backend.

    Backends take turns call by call, so a change of machine load (other jobs) hits them all alike.
    """
    for pred in preds.values():
        for _ in range(warmup):
            pred.predict([frame])
    e2e: dict[str, list[float]] = {k: [] for k in preds}
    model: dict[str, list[float]] = {k: [] for k in preds}
    for _ in range(repeats):
        for k, pred in preds.items():
            t0 = time.perf_counter()
            pred.predict([frame])
            e2e[k].append(time.perf_counter() - t0)
            model[k].append(pred.last_timing.model)
    return {k: (1000 * statistics.median(e2e[k]), 1000 * statistics.median(model[k])) for k in preds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats; skip VGG TorchScript/ONNX if eager is slow"
    )
    p.add_argument("--repeats", type=int, help="timed runs per cell (default 30, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed runs per cell (default 5, quick 3)")
    p.add_argument("--models", nargs="+", help="only models whose label contains one of these words")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of torch and ONNX Runtime (0 = their defaults: the physical cores)",
    )
    a = p.parse_args(argv)
    repeats = a.repeats or (5 if a.quick else 30)
    warmup = a.warmup or (3 if a.quick else 5)
    if a.threads:
        torch.set_num_threads(a.threads)
    console = Console(width=None if sys.stdout.isatty() else 170)
    frame = camera_frame()
    rows = []
    models = [m for m in MODELS if not a.models or any(w in m[0] for w in a.models)]
    with tempfile.TemporaryDirectory(prefix="maskssd-bench-") as tmp:
        for label, name, kwargs in models:
            torch.manual_seed(0)
            model = build_model(name, num_classes=4, **kwargs).eval()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            workdir = Path(tmp) / f"{name}-{kwargs.get('input_size', 300)}"
            workdir.mkdir()
            preds: dict[str, Predictor] = {}
            notes: dict[str, str] = {}
            for backend in BACKENDS:
                if a.quick and backend != "eager" and name == "ssd300_vgg16":
                    t0 = time.perf_counter()
                    preds["eager"].predict([frame])
                    if time.perf_counter() - t0 > 0.25:
                        notes[backend] = "skipped (--quick: eager too slow)"
                        continue
                t0 = time.perf_counter()
                preds[backend] = make_predictor(model, backend, workdir, a.threads)
                setup_s = time.perf_counter() - t0
                notes[backend] = f"export {setup_s:.1f} s" if backend != "eager" else ""
            timings = measure(preds, frame, warmup, repeats)
            base = timings["eager"]
            for backend in BACKENDS:
                e2e_ms, model_ms = timings.get(backend, (None, None))
                rows.append((label, params, backend, e2e_ms, model_ms, base, notes[backend]))
                if e2e_ms is not None:
                    console.print(
                        f"  {label:26s} {backend:12s} {e2e_ms:8.1f} ms end to end, {model_ms:8.1f} ms model",
                        highlight=False,
                    )

    t = Table(
        title=f"batch-1 CPU inference, 640x480 frame ({torch.get_num_threads()} torch / "
        f"{a.threads or physical_cores()} ORT threads, median of "
        f"{repeats}; speed-up vs PyTorch eager)"
    )
    for col in (
        "model",
        "params (M)",
        "backend",
        "end-to-end ms",
        "FPS",
        "model ms",
        "model FPS",
        "speed-up e2e",
        "speed-up model",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("model", "backend", "note") else "right")
    for label, params, backend, e2e_ms, model_ms, base, note in rows:
        if e2e_ms is None:
            t.add_row(label, f"{params:.2f}", backend, "-", "-", "-", "-", "-", "-", note)
            continue
        t.add_row(
            label,
            f"{params:.2f}",
            backend,
            f"{e2e_ms:.1f}",
            f"{1000 / e2e_ms:.1f}",
            f"{model_ms:.1f}",
            f"{1000 / model_ms:.1f}",
            f"{base[0] / e2e_ms:.2f}x",
            f"{base[1] / model_ms:.2f}x",
            note,
        )
    console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
