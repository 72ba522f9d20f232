"""Detection on files and streams: annotated images and JSON for images and folders; annotated video, per-frame
JSON lines and FPS for videos, cameras and stream URLs. Returns a :class:`DetectSummary`; the CLI prints it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskssd.data import IMAGE_EXTENSIONS, load_image
from maskssd.errors import DataError, MaskSSDError

__all__ = ["VIDEO_EXTENSIONS", "DetectSummary", "detect_source"]

log = logging.getLogger(__name__)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass
class DetectSummary:
    """What a detection run produced."""

    kind: str  # "images" or "video"
    out: Path
    counts: dict[str, int] = field(default_factory=dict)  # detections per class (images)
    images: int = 0
    failed: list[str] = field(default_factory=list)
    frames: int = 0
    fps: float = 0.0  # end to end (video)
    model_fps: float = 0.0
    backend: str = "torch"
    in_flight: int = 1  # video: frames in the model at once (:mod:`maskssd.deploy.inflight`)
    video_path: Path | None = None
    jsonl_path: Path | None = None


def detect_source(
    predictor: Any,
    source: str,
    out: str | Path,
    *,
    score_threshold: float | None = None,
    smooth: int = 0,
    max_frames: int = 0,
    show: bool = False,
    in_flight: int = 0,
) -> DetectSummary:
    """Detect on ``source`` (an image, a folder, a video file, a camera index or a stream URL) into ``out``.

    ``score_threshold`` is the display threshold: what is drawn and reported (decoding keeps the model's own);
    None uses the model's per-class thresholds (fitted on validation), else ``DISPLAY_THRESHOLD``. ``show``
    also shows every annotated frame in a window (``q`` stops showing), or refuses, saying why, where OpenCV
    cannot open one (the headless build, no display). ``in_flight``: video frames in the model at once
    (:class:`~maskssd.deploy.inflight.InFlight`; 0: :func:`~maskssd.deploy.inflight.auto_in_flight`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = Path(source)
    if show:
        from maskssd.deploy.video import window_problem

        problem = window_problem()
        if problem:
            raise MaskSSDError(f"--show cannot open a window: {problem}")
    if p.is_dir() or (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        return _detect_images(predictor, p, out, score_threshold, show)
    if p.is_file() and p.suffix.lower() not in VIDEO_EXTENSIONS:
        raise MaskSSDError(
            f"{source}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or video ({', '.join(VIDEO_EXTENSIONS)})"
        )
    if not p.exists() and not source.isdigit() and "://" not in source:
        raise MaskSSDError(
            f"source {source!r} not found (an image, a folder, a video, a camera index or a URL)"
        )
    return _detect_video(predictor, source, out, score_threshold, smooth, max_frames, show, in_flight)


def _detect_images(pred: Any, src: Path, out: Path, threshold: float | None, show: bool) -> DetectSummary:
    from maskssd.evaluation.drawing import draw_detections

    files = (
        sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if src.is_dir() else [src]
    )
    if not files:
        raise MaskSSDError(f"no images in {src}")
    results, failed = [], []
    counts = dict.fromkeys(pred.class_names, 0)
    for f in files:
        try:
            img = load_image(f)
        except DataError as e:
            failed.append(str(e))
            log.warning("skipped %s", e)
            continue
        d = pred.detect([np.asarray(img)], threshold)[0]
        annotated = draw_detections(img, d, pred.class_names, 0.0)
        annotated.save(out / f"{f.stem}.png")
        show = show and _show(annotated, wait_ms=0)
        for lab in d.labels.tolist():
            counts[pred.class_names[lab - 1]] += 1
        results.append(
            {
                "image": str(f),
                "width": img.width,
                "height": img.height,
                "detections": d.to_list(pred.class_names),
            }
        )
    doc = {
        "classes": list(pred.class_names),
        "score_threshold": pred.threshold_doc(threshold),
        "images": results,
        "failed": failed,
    }
    (out / "detections.json").write_text(json.dumps(doc, indent=1))
    return DetectSummary("images", out, counts, len(results), failed, backend=pred.backend)


def _detect_video(
    pred: Any,
    src: str,
    out: Path,
    threshold: float | None,
    smooth: int,
    max_frames: int,
    show: bool,
    in_flight: int,
) -> DetectSummary:
    from maskssd.deploy.inflight import InFlight, auto_in_flight
    from maskssd.deploy.video import ClassSmoother, FPSMeter, frames
    from maskssd.evaluation.drawing import draw_detections
    from maskssd.extras import import_extra

    smoother = ClassSmoother(len(pred.class_names), smooth) if smooth > 0 else None
    e2e, model_fps = FPSMeter(), FPSMeter()
    writer = None
    name = (
        Path(src).stem
        if not src.isdigit() and "://" not in src
        else f"camera{src}"
        if src.isdigit()
        else "stream"
    )
    video_path, jsonl_path = out / f"{name}_annotated.mp4", out / f"{name}_detections.jsonl"
    n, model_total, t_start = 0, 0.0, time.perf_counter()
    cv2 = import_extra("cv2", "video", "video input (files, cameras, streams)")
    flight = InFlight(pred, in_flight or auto_in_flight(pred))
    keyed = (((i, frame, src_fps), frame) for i, frame, src_fps in frames(src, max_frames))
    with jsonl_path.open("w") as jl, flight:
        t_prev = time.perf_counter()
        for (i, frame, src_fps), d, timing in flight.detect(keyed, threshold):
            if smoother is not None:
                d = smoother(d)  # in frame order: the frames in flight come back in the order they were read
            model_s = timing.model
            model_total += model_s
            model_fps.add(model_s)
            caption = f"{e2e.fps:.1f} FPS end-to-end | model {model_fps.fps:.1f} FPS ({pred.backend})"
            img = draw_detections(frame, d, pred.class_names, 0.0, caption)
            if writer is None:
                fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                writer = cv2.VideoWriter(
                    str(video_path), fourcc, src_fps if src_fps and src_fps < 121 else 20.0, img.size
                )
            bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
            writer.write(bgr)
            if show and not _show(img, wait_ms=1):
                break
            now = time.perf_counter()
            e2e.add(now - t_prev)
            t_prev = now
            jl.write(
                json.dumps(
                    {
                        "frame": i,
                        "time": round(now - t_start, 4),
                        "fps": round(e2e.fps, 2),
                        "model_ms": round(1000 * model_s, 2),
                        "detections": d.to_list(pred.class_names),
                    }
                )
                + "\n"
            )
            n += 1
    if writer is not None:
        writer.release()
    if n == 0:
        raise MaskSSDError(f"no frames could be read from {src}")
    wall = time.perf_counter() - t_start
    return DetectSummary(
        "video",
        out,
        frames=n,
        fps=n / wall,
        model_fps=n / max(model_total, 1e-9),
        backend=pred.backend,
        in_flight=flight.workers,
        video_path=video_path,
        jsonl_path=jsonl_path,
    )


def _show(image: Any, wait_ms: int) -> bool:
    """Show an annotated RGB image in the ``maskssd`` window; False once the user pressed ``q``."""
    from maskssd.extras import import_extra

    cv2 = import_extra("cv2", "video", "--show")
    cv2.imshow("maskssd", cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    return cv2.waitKey(wait_ms) & 0xFF != ord("q")
