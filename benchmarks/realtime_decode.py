"""Benchmark: the real-time path of a trained model on real frames, decoding from the display threshold
(``Predictor.detect``, what ``detect``, ``serve`` and the pyfunc run) against the full decode at the AP
protocol's ``min_score`` 0.01 and then the display threshold (``Predictor.shown`` of ``predict``: what they ran
before). Both show the same detections (checked on every frame); what differs is the NMS of the thousands of
low-score candidates that AP needs and a viewer never sees.

Random weights (``benchmarks.inference_fps``) leave no candidates to decode; a trained model on a crowded real
frame leaves thousands, so this one needs a checkpoint: ``maskssd train
experiments/cpu_effnet_lite0_pan_s4_rfs.toml`` writes one (``--checkpoint`` takes its ``best.pt``).
Frames: the paper split's validation images, resized to 640x480 as a camera sends them.
``--isa native avx2`` also runs it as on a CPU without AVX-512 or VNNI (``benchmarks._isa``).
``--in-flight 2`` (the default) adds ``detect()`` with two frames in the model at once (what ``maskssd detect``
runs on a video with ONNX Runtime); ``--spinning`` adds ``detect()`` with ONNX Runtime's threads spin-waiting between calls (off by default).
Run: ``.venv/bin/python -m benchmarks.realtime_decode --checkpoint PATH [--backends onnx onnx-int8]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks._isa import add_isa_arg, tables_per_isa
from benchmarks._timing import (
    PRINTED,
    add_record_arg,
    add_threads_arg,
    machine,
    print_table,
    save_record,
    set_threads,
)
from maskssd.data.voc import VOCLayout
from maskssd.deploy.inflight import InFlight
from maskssd.deploy.predictor import Predictor
from maskssd.deploy.quantize import Calibration
from maskssd.errors import MaskSSDError

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "face-mask-detection"


def camera_frames(data: Path, split_name: str, split: str, n: int) -> list[np.ndarray]:
    """The first ``n`` images of ``data``'s ``split`` (of split list ``split_name``), as 640x480 RGB frames."""
    try:
        layout = VOCLayout.detect(data)
        paths = [layout.image_path_for(i, None) for i in layout.read_split(split_name, split)[:n]]
    except MaskSSDError as e:
        raise SystemExit(f"{e}: pass --data (a dataset in the Kaggle or VOC layout)") from e
    return [np.asarray(Image.open(p).convert("RGB").resize((640, 480))) for p in paths]


def per_frame_ms(fn, frames: list[np.ndarray], rounds: int) -> float:
    """Median milliseconds of ``fn([frame])`` over every frame, ``rounds`` times (after one untimed round)."""
    for f in frames:
        fn([f])
    times = []
    for _ in range(rounds):
        for f in frames:
            t0 = time.perf_counter()
            fn([f])
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(pred: Predictor, frames: list[np.ndarray], threshold: float | None, rounds: int) -> list[dict]:
    """The four rows of one predictor: both paths end to end (their detections checked equal on every frame),
    and their decode + NMS alone."""
    b = pred.backend

    def full(images: list[np.ndarray]) -> list:
        return [pred.shown(d, threshold) for d in pred.predict(images)]

    def fast(images: list[np.ndarray]) -> list:
        return pred.detect(images, threshold)

    candidates, shown = [], []
    for f in frames:  # the same detections, frame by frame; how many the full decode keeps for AP
        every = pred.predict([f])[0]
        want, got = pred.shown(every, threshold), fast([f])[0]
        if not (torch.equal(want.scores, got.scores) and torch.equal(want.boxes, got.boxes)):
            raise SystemExit(f"{b}: detect() and shown(predict()) disagree: a bug")
        candidates.append(len(every))
        shown.append(len(got))
    decode_full, stages = [], []
    for _ in range(rounds):
        for f in frames:
            pred.predict([f])
            decode_full.append(pred.last_timing.postprocess)
            pred.detect([f], threshold)
            stages.append(pred.last_timing)
    decode_fast = [t.postprocess for t in stages]
    before = f"{b}: shown(predict()), full decode at 0.01 (before)"
    rows = [
        {
            "name": before,
            "seconds": per_frame_ms(full, frames, rounds),
            "note": f"{statistics.mean(candidates):.0f} detections kept for AP per frame",
        },
        {
            "name": f"{b}: detect(), decoded from the display threshold",
            "baseline": before,
            "seconds": per_frame_ms(fast, frames, rounds),
            "note": f"{statistics.mean(shown):.1f} shown per frame (the same); {where_time(stages)}",
        },
        {"name": f"{b}: decode + NMS alone, full", "seconds": statistics.median(decode_full)},
        {
            "name": f"{b}: decode + NMS alone, from the threshold",
            "baseline": f"{b}: decode + NMS alone, full",
            "seconds": statistics.median(decode_fast),
        },
    ]
    for r in rows[:2]:
        r["FPS"] = f"{1 / r['seconds']:.1f}"
    return rows


def where_time(stages: list) -> str:
    """Where a frame's time goes: the median milliseconds of each stage of ``Predictor.detect``."""
    ms = {
        k: 1000 * statistics.median(getattr(t, k) for t in stages)
        for k in ("preprocess", "model", "postprocess")
    }
    return "pre / model / post {preprocess:.1f} / {model:.1f} / {postprocess:.1f} ms".format(**ms)


def in_flight_row(pred: Predictor, frames: list[np.ndarray], threshold, rounds: int, workers: int) -> dict:
    """``detect()`` with ``workers`` frames in the model at once (:class:`maskssd.deploy.inflight.InFlight`,
    what ``maskssd detect`` runs on a video): the frames per second a camera gets, each frame later."""
    with InFlight(pred, workers) as flight:
        keyed = list(enumerate(frames))
        for _ in flight.detect(keyed, threshold):  # one untimed round
            pass
        walls, stages = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            stages += [timing for _, _, timing in flight.detect(keyed, threshold)]
            walls.append((time.perf_counter() - t0) / len(frames))
    seconds = statistics.median(walls)
    return {
        "name": f"{pred.backend}: detect(), {workers} frames in flight ({flight.threads} thread(s) each)",
        "baseline": f"{pred.backend}: detect(), decoded from the display threshold",
        "seconds": seconds,
        "FPS": f"{1 / seconds:.1f}",
        "note": f"each frame {1000 * statistics.median(t.total for t in stages):.1f} ms: {where_time(stages)}",
    }


def spinning_row(a: argparse.Namespace, backend: str, frames: list[np.ndarray], threshold) -> dict:
    """``detect()`` again with ONNX Runtime's threads spin-waiting between calls ($MASKSSD_ORT_SPINNING=1),
    against the same backend's default (sleeping threads) measured just before in this process."""
    os.environ["MASKSSD_ORT_SPINNING"] = "1"
    try:
        pred = load(a, backend)
    finally:
        os.environ.pop("MASKSSD_ORT_SPINNING")

    stages = []

    def fast(images: list[np.ndarray]) -> list:
        out = pred.detect(images, threshold)
        stages.append(pred.last_timing)
        return out

    seconds = per_frame_ms(fast, frames, a.rounds)
    return {
        "name": f"{backend}: detect(), threads spinning between calls",
        "baseline": f"{backend}: detect(), decoded from the display threshold",
        "seconds": seconds,
        "FPS": f"{1 / seconds:.1f}",
        "note": where_time(stages[len(frames) :]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained model's checkpoint (best.pt)")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["onnx"],
        choices=("torch", "onnx", "onnx-int8"),
        help="predictor backends (default onnx: the CPU default); onnx-int8 calibrates on --data's train split",
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="dataset (default: ../shared's face-mask data)"
    )
    p.add_argument("--split-name", default="paper", help="split list of --data (default paper)")
    p.add_argument("--split", default="val", help="split whose images are the frames (default val)")
    p.add_argument("--frames", type=int, default=32, help="frames (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="timed passes over the frames (default 5)")
    p.add_argument("--threshold", type=float, default=None, help="display threshold (default: the model's)")
    p.add_argument("--label", help="the model's name in the title (default: the checkpoint's path)")
    p.add_argument(
        "--in-flight",
        type=int,
        default=2,
        metavar="N",
        help="also time detect() with N frames in the model at once (onnx backends; default 2, 0 or 1: not)",
    )
    p.add_argument(
        "--spinning",
        action="store_true",
        help="also time detect() with ONNX Runtime's threads spin-waiting between calls (onnx backends)",
    )
    add_isa_arg(p)
    add_threads_arg(p)
    add_record_arg(p)
    a = p.parse_args(argv)
    set_threads(a.threads, a.default_allocator)
    PRINTED.clear()  # this call's tables only, when called again in one process
    tables = tables_per_isa(a, "benchmarks.realtime_decode", argv, run, backends=a.backends)
    if tables is None:  # the AVX2 child: its table is written
        return
    for title, rows in tables:
        print_table(title, rows, extra_columns=["FPS"])
    save_record(
        a.record,
        "realtime_decode",
        {
            "checkpoint": str(a.checkpoint),
            "backends": a.backends,
            "isa": a.isa,
            "spinning": a.spinning,
            "in_flight": a.in_flight,
        },
    )


def load(a: argparse.Namespace, backend: str) -> Predictor:
    calibration = Calibration(a.data, a.split_name, 100) if backend == "onnx-int8" else None
    try:
        return Predictor.from_checkpoint(a.checkpoint, backend=backend, calibration=calibration)
    except (MaskSSDError, OSError) as e:
        raise SystemExit(f"cannot load {a.checkpoint} ({backend}): {e}") from None


def run(a: argparse.Namespace) -> tuple[str, list[dict]]:
    """The title and rows of every backend in this process."""
    frames = camera_frames(a.data, a.split_name, a.split, a.frames)
    rows, where = [], ""
    for backend in a.backends:
        pred = load(a, backend)
        t = pred.display_threshold(a.threshold)
        where = "the model's per-class thresholds" if not isinstance(t, float) else f"threshold {t}"
        rows += measure(pred, frames, a.threshold, a.rounds)
        if a.in_flight > 1 and backend != "torch":
            rows.append(in_flight_row(pred, frames, a.threshold, a.rounds, a.in_flight))
        if a.spinning and backend != "torch":
            del pred  # its threads would share the cores with the next session's
            rows.append(spinning_row(a, backend, frames, a.threshold))
    title = (
        f"Real-time path per 640x480 frame, end to end: {a.label or a.checkpoint} ({where};"
        f" {len(frames)} {a.split} frames x {a.rounds}; {machine()})"
    )
    return title, rows


if __name__ == "__main__":
    main()
