"""``maskssd detect``: annotated images and JSON for images and folders; annotated video, per-frame JSON
lines and live FPS for videos, cameras and stream URLs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maskssd.data import IMAGE_EXTENSIONS, load_image
from maskssd.errors import DataError, MaskSSDError
from maskssd.postprocess import Detections

console = Console(stderr=True)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def _keep(d: Detections, min_score: float) -> Detections:
    m = d.scores >= min_score
    return Detections(d.boxes[m], d.labels[m], d.scores[m])


def run_detect(a) -> int:
    from maskssd.registry import load_predictor

    pred = load_predictor(a.model, a.tracking_uri, a.device, a.backend,
                          class_agnostic=a.class_agnostic or None, max_overlap=a.max_overlap)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    src = a.source
    p = Path(src)
    if p.is_dir() or (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        return _detect_images(pred, p, out, a.min_score)
    if p.is_file() and p.suffix.lower() not in VIDEO_EXTENSIONS:
        raise MaskSSDError(f"{src}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or video ({', '.join(VIDEO_EXTENSIONS)})")
    if not p.exists() and not src.isdigit() and "://" not in src:
        raise MaskSSDError(f"source {src!r} not found (an image, a folder, a video, a camera index or a URL)")
    return _detect_video(pred, src, out, a)


def _detect_images(pred, src: Path, out: Path, min_score: float) -> int:
    from maskssd.visualize import draw_detections

    files = sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if src.is_dir() else [src]
    if not files:
        raise MaskSSDError(f"no images in {src}")
    results, failed = [], []
    counts = dict.fromkeys(pred.class_names, 0)
    for f in files:
        try:
            img = load_image(f)
        except DataError as e:
            failed.append(str(e))
            console.print(f"[red]skipped[/] {escape(str(e))}", highlight=False)
            continue
        d = _keep(pred.predict([np.asarray(img)])[0], min_score)
        draw_detections(img, d, pred.class_names, min_score).save(out / f"{f.stem}.png")
        for lab in d.labels.tolist():
            counts[pred.class_names[lab - 1]] += 1
        results.append({"image": str(f), "width": img.width, "height": img.height,
                        "detections": d.to_list(pred.class_names)})
    (out / "detections.json").write_text(json.dumps({"classes": list(pred.class_names), "min_score": min_score,
                                                     "images": results, "failed": failed}, indent=1))
    t = Table(title=f"{len(results)} images -> {out}")
    for c in counts:
        t.add_column(c, justify="right")
    t.add_row(*[str(v) for v in counts.values()])
    Console().print(t)
    return 0 if results else 2


def _detect_video(pred, src: str, out: Path, a) -> int:
    import cv2

    from maskssd.video import ClassSmoother, FPSMeter, frames
    from maskssd.visualize import draw_detections

    smoother = ClassSmoother(len(pred.class_names), a.smooth) if a.smooth > 0 else None
    e2e, model_fps = FPSMeter(), FPSMeter()
    writer = None
    name = Path(src).stem if not src.isdigit() and "://" not in src else f"camera{src}" if src.isdigit() else "stream"
    video_path, jsonl_path = out / f"{name}_annotated.mp4", out / f"{name}_detections.jsonl"
    n, model_total, t_start = 0, 0.0, time.perf_counter()
    with jsonl_path.open("w") as jl:
        t_prev = time.perf_counter()
        for i, frame, src_fps in frames(src, a.max_frames):
            d = _keep(pred.predict([frame])[0], a.min_score)
            if smoother is not None:
                d = smoother(d)
            model_s = pred.last_timing.model
            model_total += model_s
            model_fps.add(model_s)
            caption = f"{e2e.fps:.1f} FPS end-to-end | model {model_fps.fps:.1f} FPS ({pred.backend})"
            img = draw_detections(frame, d, pred.class_names, a.min_score, caption)
            if writer is None:
                fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                writer = cv2.VideoWriter(str(video_path), fourcc, src_fps if src_fps and src_fps < 121 else 20.0,
                                         img.size)
            bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
            writer.write(bgr)
            if a.show:
                cv2.imshow("maskssd", bgr)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
            now = time.perf_counter()
            e2e.add(now - t_prev)
            t_prev = now
            jl.write(json.dumps({"frame": i, "time": round(now - t_start, 4), "fps": round(e2e.fps, 2),
                                 "model_ms": round(1000 * model_s, 2), "detections": d.to_list(pred.class_names)}) + "\n")
            n += 1
    if writer is not None:
        writer.release()
    if n == 0:
        raise MaskSSDError(f"no frames could be read from {src}")
    wall = time.perf_counter() - t_start
    t = Table(title=f"{src}: {n} frames -> {video_path}")
    for col in ("frames", "end-to-end FPS", "model-only FPS", "backend"):
        t.add_column(col, justify="right")
    t.add_row(str(n), f"{n / wall:.1f}", f"{n / max(model_total, 1e-9):.1f}", pred.backend)
    Console().print(t)
    console.print(f"per-frame detections: {jsonl_path}")
    return 0
