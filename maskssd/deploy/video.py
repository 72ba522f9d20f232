"""Real-time detection on video: frame sources (files, cameras, URLs via OpenCV), FPS meters, temporal class
smoothing, and the camera client of the paper's multi-camera set-up (``maskssd stream``)."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskssd.errors import MaskSSDError
from maskssd.extras import import_extra
from maskssd.ssd.postprocess import Detections
from maskssd.ssd.priors import box_iou

log = logging.getLogger(__name__)


def open_source(source: str):
    """An OpenCV capture for a camera index (``"0"``), a video file or a stream URL."""
    cv2 = import_extra("cv2", "video", "video input (files, cameras, streams)")

    target: int | str = int(source) if source.isdigit() else source
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        raise MaskSSDError(f"cannot open video source {source!r} (no such file, camera or reachable stream)")
    return cap


def frames(source: str, max_frames: int = 0) -> Iterator[tuple[int, np.ndarray, float]]:
    """``(index, RGB frame, source fps)`` until the source ends or ``max_frames`` frames were read."""
    cv2 = import_extra("cv2", "video", "video input (files, cameras, streams)")

    cap = open_source(source)
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    i = 0
    try:
        while max_frames <= 0 or i < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), fps
            i += 1
    finally:
        cap.release()


def window_problem() -> str | None:
    """Why OpenCV cannot open a window here (``detect --show``), or None when it can."""
    import os
    import sys

    cv2 = import_extra("cv2", "video", "video input (files, cameras, streams)")
    gui = ""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            gui = line.split(":", 1)[1].strip()
            break
    if gui.upper() == "NONE":
        return (
            f"this OpenCV ({cv2.__version__}) is a headless build without windows (opencv-python-headless, "
            "what maskssd[video] installs); pip install opencv-python for --show, or watch the annotated "
            "video written to --out"
        )
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display to open a window on (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


class FPSMeter:
    """Frames per second over a sliding window of the last ``window`` frames."""

    def __init__(self, window: int = 30):
        self.times: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    @property
    def fps(self) -> float:
        return len(self.times) / sum(self.times) if self.times and sum(self.times) > 0 else 0.0


@dataclass
class _Track:
    box: torch.Tensor
    votes: collections.deque = field(default_factory=collections.deque)
    last_seen: int = 0


class ClassSmoother:
    """Stabilises each face's class across frames: faces are followed by IoU, and each takes the class with
    the highest summed score over its last ``window`` frames (the paper's "transition" frames, where a face
    flickers between two classes)."""

    def __init__(self, num_classes: int, window: int = 5, iou: float = 0.3):
        self.num_classes, self.window, self.iou = num_classes, window, iou
        self.tracks: list[_Track] = []
        self.frame = 0

    def __call__(self, dets: Detections) -> Detections:
        self.frame += 1
        labels = dets.labels.clone()
        n_old = len(self.tracks)
        ious = box_iou(dets.boxes, torch.stack([t.box for t in self.tracks])) if n_old and len(dets) else None
        taken = torch.zeros(n_old, dtype=torch.bool)
        for i in range(len(dets)):  # a handful of faces per frame
            j = -1
            if ious is not None:
                row = ious[i].masked_fill(taken, -1.0)
                j = int(row.argmax())
                if row[j] < self.iou:
                    j = -1
                else:
                    taken[j] = True
            if j < 0:
                self.tracks.append(_Track(dets.boxes[i], collections.deque(maxlen=self.window), self.frame))
                j = len(self.tracks) - 1
            track = self.tracks[j]
            track.box, track.last_seen = dets.boxes[i], self.frame
            track.votes.append((int(dets.labels[i]), float(dets.scores[i])))
            totals = np.zeros(self.num_classes + 1)
            for lab, s in track.votes:
                totals[lab] += s
            labels[i] = int(totals.argmax())
        self.tracks = [t for t in self.tracks if self.frame - t.last_seen <= self.window]
        return Detections(dets.boxes, labels, dets.scores)


@dataclass
class StreamSummary:
    camera: str
    sent: int
    failed: int
    fps: float  # end to end, over the last frames


def stream(
    server: str,
    source: str,
    *,
    camera: str = "cam1",
    max_frames: int = 0,
    fps: float = 0.0,
    jpeg_quality: int = 85,
    token: str | None = None,
    ca_file: str | None = None,
) -> StreamSummary:
    """Camera client: read frames, send them as JPEG to ``SERVER/detect`` named ``camera``, measure FPS. The
    ``token`` goes as ``Authorization: Bearer``; an ``https://`` server's certificate is verified (against
    ``ca_file`` for a self-signed one). A busy server's 503 or 429 is waited out (its ``Retry-After``)."""
    import io

    from PIL import Image

    httpx = import_extra("httpx", "serve", "maskssd stream (the camera client)")

    url = server.rstrip("/") + "/detect"
    meter, sent, failed = FPSMeter(), 0, 0
    min_interval = 1.0 / fps if fps and fps > 0 else 0.0
    headers = {"content-type": "image/jpeg", "x-camera": camera}
    if token:
        headers["authorization"] = f"Bearer {token}"
    verify: Any = True
    if ca_file:
        import ssl

        verify = ssl.create_default_context(cafile=ca_file)
    with httpx.Client(timeout=30.0, verify=verify) as client:
        t_prev = time.perf_counter()
        for i, frame, _ in frames(source, max_frames):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality)
            try:
                r = client.post(url, content=buf.getvalue(), headers=headers)
            except httpx.HTTPError as e:
                raise MaskSSDError(f"server {server} unreachable: {e}") from None
            if r.status_code == 401:
                raise MaskSSDError(
                    f"server {server} refused the token: {r.json().get('detail', r.text[:200])}"
                )
            if r.status_code in (429, 503):  # busy: wait as told, then go on with the next frame
                failed += 1
                time.sleep(min(float(r.headers.get("retry-after", "1")), 10.0))
                continue
            if r.status_code != 200:
                failed += 1
                log.warning("frame %d: %d %s", i, r.status_code, r.text[:200])
                continue
            sent += 1
            now = time.perf_counter()
            if min_interval and now - t_prev < min_interval:
                time.sleep(min_interval - (now - t_prev))
                now = time.perf_counter()
            meter.add(now - t_prev)
            t_prev = now
            if i % 10 == 0:
                log.info(
                    "%s: frame %d, %d faces, %.1f FPS end to end",
                    camera,
                    i,
                    len(r.json()["detections"]),
                    meter.fps,
                )
    return StreamSummary(camera, sent, failed, meter.fps)
