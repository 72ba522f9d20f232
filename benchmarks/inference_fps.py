"""Benchmark: single-image CPU inference speed per model and backend (PyTorch eager NCHW and channels_last,
TorchScript, ONNX Runtime), and the inference levers of issue 16 (BatchNorm folding, ONNX Runtime int8,
horizontal-flip test-time augmentation).

For each model (random weights: speed does not depend on them) and backend, a :class:`maskssd.predictor.Predictor`
runs batch-1 inference on a 640x480 uint8 frame, as a camera would send it: end to end (resize + forward +
decode/NMS) and the forward alone (``Predictor.last_timing.model``). The median of ``--repeats`` runs after
warm-up is reported; PyTorch eager is the baseline of the speed-up column. Backends take turns call by call.
On a machine busy with other work, multi-threaded PyTorch can stall at every parallel region waiting for a
descheduled worker thread; ``--threads 1`` then gives steadier numbers.

Backends: ``eager`` (NCHW), ``eager NHWC`` (channels_last), ``eager folded`` (NHWC, BatchNorm folded and "same"
padding static: what ``Predictor.from_checkpoint`` runs on CPU), ``eager folded TTA`` (the same on the frame and
its mirror), ``torchscript``, ``onnx`` (the plain export), ``onnx folded`` (exported after
``maskssd.deploy.optimize``: what ``--backend onnx`` runs), ``onnx int8`` (static int8, calibrated on
``--calibration-images`` training images of ``--calibration``; skipped without that dataset) and ``onnx int8
TTA``. ``--backends`` picks some. ``--profile`` times the stages of one frame through the eager folded predictor.
Run: ``.venv/bin/python -m benchmarks.inference_fps [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
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
from torchvision.transforms import v2

from benchmarks._isa import Avx2, add_isa_arg, avx2, without
from benchmarks._timing import add_record_arg, in_child, machine, record_table, save_record
from maskssd.data.transforms import to_chw
from maskssd.deploy.export import (
    export_onnx,
    export_torchscript,
    load_torchscript,
    onnx_session,
    physical_cores,
)
from maskssd.deploy.optimize import optimize_for_inference
from maskssd.deploy.predictor import Predictor
from maskssd.deploy.quantize import Calibration, build_int8, calibration_files
from maskssd.ssd.models import build_model
from maskssd.ssd.postprocess import DecodeSpec, postprocess

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")
LITE = {"pretrained": False, "input_size": 384}
#: The default boxes of experiments/cpu_effnet_lite0.toml, and its small-face variant (PAN neck, stride-4 map,
#: 7 fitted scales): what the shipped CPU model and the next candidate decode.
CPU_BOXES = {"scales": [0.04, 0.08, 0.16, 0.3, 0.5, 0.7], "aspect_ratios": [0.6, 0.4, 0.8]}
PAN_S4 = {
    "scales": [0.03022, 0.0647, 0.1245, 0.2476, 0.4025, 0.425, 0.8025],
    "aspect_ratios": [0.6, 0.4, 0.8],
    "neck": "pan",
    "stride4": True,
}
MODELS: list[tuple[str, str, dict[str, Any]]] = [  # (label, registry name, build kwargs)
    ("tiny 128", "tiny", {"input_size": 128}),
    ("ssdlite_mobilenet_v3 320", "ssdlite_mobilenet_v3", {"input_size": 320, "pretrained": False}),
    ("ssdlite_effnet_lite0 320", "ssdlite_effnet_lite0", {"input_size": 320, "pretrained": False}),
    ("ssdlite_effnet_lite0 384", "ssdlite_effnet_lite0", LITE),
    ("ssdlite_effnet_lite0 384 fpn", "ssdlite_effnet_lite0", {**LITE, "neck": "fpn"}),
    ("ssdlite_effnet_lite0 384 pan", "ssdlite_effnet_lite0", {**LITE, "neck": "pan"}),
    ("ssdlite_effnet_lite0 384 cpu", "ssdlite_effnet_lite0", {**LITE, **CPU_BOXES}),
    ("ssdlite_effnet_lite0 384 cpu pan s4", "ssdlite_effnet_lite0", {**LITE, **PAN_S4}),
    # the accurate model at smaller inputs (issue 27): the backbone is most of its work and scales with the
    # pixels; the stride-4 map stays, so small faces keep their map
    ("ssdlite_effnet_lite0 352 cpu pan s4", "ssdlite_effnet_lite0", {**LITE, **PAN_S4, "input_size": 352}),
    ("ssdlite_effnet_lite0 320 cpu pan s4", "ssdlite_effnet_lite0", {**LITE, **PAN_S4, "input_size": 320}),
    ("ssdlite_effnet_lite1 384", "ssdlite_effnet_lite1", LITE),
    ("ssdlite_effnet_lite2 384", "ssdlite_effnet_lite2", LITE),
    ("ssd300_vgg16", "ssd300_vgg16", {"pretrained": False}),
]
BACKENDS = (
    "eager",
    "eager NHWC",
    "eager folded",
    "eager folded TTA",
    "torchscript",
    "onnx",
    "onnx folded",
    "onnx int8",
    "onnx int8 TTA",
)
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "face-mask-detection"
#: the deployment decode (the default display threshold, the paper's NMS settings): what
#: ``Predictor.detect`` decodes for ``detect`` and ``serve`` (benchmarks.realtime_decode times it on real frames)
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


def make_predictor(
    model: torch.nn.Module,
    backend: str,
    workdir: Path,
    threads: int = 0,
    calibration: list[Path] | None = None,
) -> Predictor:
    """A Predictor running ``model`` through ``backend`` (exported to ``workdir`` when needed; int8 calibrated
    on the ``calibration`` image files)."""
    tta = backend.endswith(" TTA")
    kind = backend.removesuffix(" TTA")
    if kind.startswith("eager ") or kind == "onnx folded":  # on a copy: the others stay NCHW, unfolded
        model = optimize_for_inference(model) if "folded" in kind else copy.deepcopy(model)
    pred = Predictor(
        model,
        CLASSES,
        model.input_size,
        model.priors_cxcy,
        DECODE,
        channels_last=kind.startswith("eager "),
        tta_hflip=tta,
    )
    if kind == "torchscript":
        pred.model = _TorchScriptRunner(load_torchscript(export_torchscript(model, workdir / "model.ts")))  # type: ignore[assignment]
    elif kind in ("onnx", "onnx folded"):
        path = export_onnx(model, workdir / f"{kind.replace(' ', '_')}.onnx")
        pred.onnx_session, pred.model = onnx_session(path, threads or None), None
    elif kind == "onnx int8":
        path = workdir / "model.int8.onnx"
        if not path.is_file():
            build_int8(model, path, calibration or [])
        pred.onnx_session, pred.model = onnx_session(path, threads or None), None
    return pred


def profile_frame(pred: Predictor, frame: np.ndarray, repeats: int) -> list[tuple[str, float]]:
    """Median milliseconds of each stage of one frame through ``pred`` (an eager channels_last predictor)."""
    size = pred.input_size
    chw = to_chw(frame)
    resized = v2.functional.resize(chw, [size, size], antialias=True)[None]
    batch = resized.to(torch.float32, copy=True).div_(255.0)
    with torch.inference_mode():
        locs, scores = pred.model(batch.contiguous(memory_format=torch.channels_last))
    sizes = torch.tensor([[frame.shape[1], frame.shape[0]]], dtype=torch.float32)
    stages = {
        "to tensor (HWC view)": lambda: to_chw(frame),
        "resize (uint8, antialias)": lambda: v2.functional.resize(chw, [size, size], antialias=True),
        "to float / 255": lambda: resized.to(torch.float32, copy=True).div_(255.0),
        "NHWC conversion (a no-op now)": lambda: batch.contiguous(memory_format=torch.channels_last),
        "forward": lambda: pred.forward(batch),
        "decode + NMS": lambda: postprocess(locs, scores, pred.priors_cxcy, DECODE, sizes),
        "whole predict()": lambda: pred.predict([frame]),
    }
    out = []
    for name, fn in stages.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append((name, 1000 * statistics.median(times)))
    return out


STATS = {"median": statistics.median, "min": min, "p25": lambda v: statistics.quantiles(v, n=4)[0]}


def measure(
    preds: dict[str, Predictor], frame: np.ndarray, warmup: int, repeats: int, stat: str = "median"
) -> dict[str, tuple[float, float]]:
    """End-to-end and model-only milliseconds (``stat`` of ``repeats`` batch-1 predictions) per backend.

    Backends take turns call by call, so a change of machine load (other jobs) hits them all alike; on a machine
    shared with other jobs ``stat="min"`` (or ``p25``) estimates the cost of an undisturbed call.
    """
    agg = STATS[stat]
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
    return {k: (1000 * agg(e2e[k]), 1000 * agg(model[k])) for k in preds}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats; skip VGG's other backends if eager is slow"
    )
    p.add_argument("--repeats", type=int, help="timed runs per cell (default 30, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed runs per cell (default 5, quick 3)")
    p.add_argument("--models", nargs="+", help="only models whose label contains one of these words")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, help="only these backends (eager always runs)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of torch and ONNX Runtime (0 = their defaults: the physical cores)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=DEFAULT_CALIBRATION,
        help="dataset whose training images calibrate the int8 models (default: ../shared's face-mask data)",
    )
    p.add_argument("--split-name", default="paper", help="split list of --calibration (default: paper)")
    p.add_argument(
        "--calibration-images",
        type=int,
        default=20,
        help="images calibrating int8 (speed does not depend on it)",
    )
    p.add_argument("--profile", action="store_true", help="also time the stages of one frame (eager folded)")
    p.add_argument(
        "--stat", choices=tuple(STATS), default="median", help="of the timed runs (busy machine: min or p25)"
    )
    add_isa_arg(p)
    add_record_arg(p)
    return p.parse_args(argv)


def run_model(
    label: str, name: str, kwargs: dict[str, Any], a: argparse.Namespace, workdir: Path, calibration: Any
) -> tuple[float, dict[str, tuple[float, float] | None], dict[str, str], Predictor]:
    """Params (M), (end-to-end ms, model ms) per backend (None: skipped), notes, and the eager folded
    predictor of one model."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    frame = camera_frame()
    backends = ["eager", *(b for b in BACKENDS if b != "eager" and (not a.backends or b in a.backends))]
    preds: dict[str, Predictor] = {}
    notes: dict[str, str] = {}
    for backend in backends:
        if a.quick and backend != "eager" and name == "ssd300_vgg16":
            t0 = time.perf_counter()
            preds["eager"].predict([frame])
            if time.perf_counter() - t0 > 0.25:
                notes[backend] = "skipped (--quick: eager too slow)"
                continue
        if "int8" in backend and calibration is None:
            notes[backend] = "skipped (no --calibration dataset)"
            continue
        t0 = time.perf_counter()
        preds[backend] = make_predictor(model, backend, workdir, a.threads, calibration)
        setup_s = time.perf_counter() - t0
        notes[backend] = f"setup {setup_s:.1f} s" if setup_s > 0.5 else ""
    timings = measure(preds, frame, a.warmup, a.repeats, a.stat)
    for backend, (e2e_ms, model_ms) in timings.items():
        print(
            f"  {label:30s} {backend:18s} {e2e_ms:8.1f} ms end to end, {model_ms:8.1f} ms model", flush=True
        )
    folded = preds.get("eager folded") or make_predictor(model, "eager folded", workdir)
    return params, {b: timings.get(b) for b in backends}, notes, folded


def run_models(a: argparse.Namespace) -> tuple[list[Any], list[tuple[str, float]] | None]:
    """Every selected model through every selected backend; the profile of the first (``--profile``)."""
    calibration = None
    if a.calibration.is_dir():
        calibration = calibration_files(Calibration(a.calibration, a.split_name, a.calibration_images))
    results, profile = [], None
    models = [m for m in MODELS if not a.models or any(w in m[0] for w in a.models)]
    with tempfile.TemporaryDirectory(prefix="maskssd-bench-") as tmp:
        for label, name, kwargs in models:
            workdir = Path(tmp) / label.replace(" ", "_")
            workdir.mkdir()
            params, timings, notes, folded = run_model(label, name, kwargs, a, workdir, calibration)
            results.append((label, params, timings, notes))
            if a.profile and label == models[0][0]:
                profile = profile_frame(folded, camera_frame(), a.repeats)
    return results, profile


def _child_argv(argv: list[str], held: Avx2, backends: list[str]) -> list[str]:
    """This command's arguments for an AVX2 child: no record, no second ISA, and of ``backends`` those that
    ``held`` reaches (eager runs anyway)."""
    if held.all_libraries:
        return without(argv, "--isa", "--record")
    return [
        *without(argv, "--isa", "--record", "--backends"),
        "--backends",
        *(held.reaches(backends) or ["eager"]),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    a.repeats = a.repeats or (5 if a.quick else 30)
    a.warmup = a.warmup or (3 if a.quick else 5)
    if a.threads:
        torch.set_num_threads(a.threads)
    results, profile = run_models(a)
    if a.child_json:
        Path(a.child_json).write_text(json.dumps([[lab, p, t, n] for lab, p, t, n in results]))
        return 0
    by_isa = {"native": results}
    if "avx2" in a.isa:
        held = avx2()
        if held.why:
            print(f"AVX2 for PyTorch alone: {held.why}")
        child = _child_argv(argv, held, a.backends or list(BACKENDS))
        by_isa[held.label] = in_child("benchmarks.inference_fps", child, held.env)
    console = Console(width=None if sys.stdout.isatty() else 190)
    threads = f"{torch.get_num_threads()} torch / {a.threads or physical_cores()} ORT threads"
    console.print(
        detail_table(results, f"batch-1 CPU inference, 640x480 frame ({threads}, {a.stat} of {a.repeats})")
    )
    console.print(fps_table(by_isa, f"end-to-end FPS per model, backend and ISA ({machine()}; {a.stat})"))
    if profile is not None:
        t = Table(
            title=f"one 640x480 frame through the eager folded predictor of {results[0][0]} (median ms)"
        )
        t.add_column("stage")
        t.add_column("ms", justify="right")
        for stage, ms in profile:
            t.add_row(stage, f"{ms:.3f}")
        console.print(t)
    rows = [
        {"model": label, "backend": b, "isa": isa, "fps": 1000 / tm[0], "e2e_ms": tm[0], "model_ms": tm[1]}
        for isa, res in by_isa.items()
        for label, _, timings, _ in res
        for b, tm in timings.items()
        if tm
    ]
    save_record(a.record, "inference_fps", {"rows": rows, "repeats": a.repeats, "stat": a.stat})
    return 0


def detail_table(results: list[Any], title: str) -> Table:
    t = Table(title=title + "; speed-up vs PyTorch eager")
    cols = ("model", "params (M)", "backend", "end-to-end ms", "FPS", "model ms", "model FPS", "speed-up e2e")
    for col in (*cols, "speed-up model", "note"):
        t.add_column(col, justify="left" if col in ("model", "backend", "note") else "right")
    for label, params, timings, notes in results:
        base = timings["eager"]
        for backend, tm in timings.items():
            if tm is None:
                t.add_row(
                    label, f"{params:.2f}", backend, "-", "-", "-", "-", "-", "-", notes.get(backend, "")
                )
                continue
            e2e_ms, model_ms = tm
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
                notes.get(backend, ""),
            )
    return t


def fps_table(by_isa: dict[str, list[Any]], title: str) -> Table:
    """Models (per ISA) as rows, backends as columns: end-to-end FPS. Where the AVX2 emulation holds PyTorch
    alone (ATen), ONNX Runtime's cells are left out of its rows."""
    backends = list(dict.fromkeys(b for res in by_isa.values() for _, _, timings, _ in res for b in timings))
    t = Table(title=title)
    t.add_column("model")
    t.add_column("ISA")
    for b in backends:
        t.add_column(b, justify="right")
    rows = []
    for isa, res in by_isa.items():
        for label, _, timings, _ in res:
            cells = [f"{1000 / timings[b][0]:.1f}" if timings.get(b) else "-" for b in backends]
            t.add_row(label, isa, *cells)
            rows.append([label, isa, *cells])
    record_table(title, ["model", "ISA", *backends], rows)
    return t


if __name__ == "__main__":
    sys.exit(main())
