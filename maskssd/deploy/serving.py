"""``maskssd serve``: an HTTP detection service with dynamic batching, Prometheus metrics and a camera montage.

Requests are decoded off the event loop, queued, and one batcher task groups them (up to ``max_batch``
images, or whatever arrived within ``max_wait_ms`` of the oldest) into a single ``Predictor.predict`` call
on a free model worker (one by default; ``model_workers`` replicas of an ONNX Runtime model, each with its
share of the cores, take batches side by side: :class:`~maskssd.deploy.inflight.ModelPool`). A replica is
never called concurrently, and on a CPU a batch of eight costs
far less than eight single calls. The cameras of the reference paper's set-up (``maskssd stream``) send
frames with an ``x-camera`` header; the server keeps each camera's latest annotated frame and a montage
of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskssd.data import MAX_IMAGE_PIXELS, decode_image_bytes
from maskssd.deploy.auth import LIVENESS_PATH, AuthMiddleware, RateLimiter, TokenSet, retry_after
from maskssd.deploy.inflight import ModelPool, check_workers
from maskssd.deploy.service_metrics import Metrics, MetricsMiddleware
from maskssd.errors import DataError
from maskssd.extras import require
from maskssd.files import atomic_path
from maskssd.ssd.postprocess import Detections

require(
    "serve",
    "maskssd serve (the HTTP detection service)",
    ("fastapi", "uvicorn", "python_multipart", "prometheus_client"),
)

from fastapi import FastAPI, Request  # noqa: E402 - after the [serve] check
from fastapi.responses import JSONResponse, Response  # noqa: E402
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.formparsers import MultiPartException  # noqa: E402
from starlette.types import Message  # noqa: E402

log = logging.getLogger(__name__)

MONTAGE_INTERVAL_S = 0.5
MAX_MONTAGE_CAMERAS = 16
MAX_CAMERA_LABELS = 256  # distinct camera names tracked in metrics; later ones count as "other"
_CAMERA_RE = re.compile(r"[^A-Za-z0-9_.:@-]")


class RequestError(Exception):
    """A request the server refuses: ``status``, a reason for the ``detail`` field and extra response headers
    (``Retry-After`` on 503)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, dict(headers or {})


@dataclass
class _Job:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    future: asyncio.Future
    floor: float | torch.Tensor | None = None  # the lowest score this request shows (None: all of them)
    t_enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Result:
    detections: Detections
    batch_size: int
    model_ms: float
    queue_ms: float


class DetectionService:
    """Queue, batcher, model worker and montage of one app (created by :func:`create_app`)."""

    def __init__(
        self,
        predictor: Any,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        batching: bool = True,
        max_bytes: int = 20_000_000,
        max_pixels: int = MAX_IMAGE_PIXELS,
        montage_path: str | Path | None = None,
        score_threshold: float | None = None,
        max_queue: int = 256,
        model_workers: int = 1,
    ):
        check_workers(predictor, int(model_workers))  # before the server starts, not in its lifespan
        self.predictor = predictor
        self.model_workers = int(model_workers)
        self.max_batch = max(1, int(max_batch)) if batching else 1
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0 if batching else 0.0
        self.batching = batching
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
        self.montage_path = Path(montage_path) if montage_path else None
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.max_queue = max_queue
        self.metrics = Metrics(self.max_batch)
        self.started = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[_Job] | None = None
        self.pool: ModelPool | None = None
        self.slots: asyncio.Semaphore | None = None  # one per model worker: batches in the model at once
        self.running: set[asyncio.Task] = set()
        self.aux_executor: ThreadPoolExecutor | None = None
        self.tasks: list[asyncio.Task] = []
        self.cameras: OrderedDict[str, tuple[np.ndarray, Detections]] = (
            OrderedDict()
        )  # latest frame per camera
        self.camera_labels: set[str] = set()
        self.montage_dirty: asyncio.Event | None = None
        self.montage_written = 0
        self.last_batch_s = 0.1  # the last model call's time: a busy server's Retry-After estimate

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.aux_executor is not None:  # a restart on another event loop
            self.aux_executor.shutdown(wait=False)
        if self.pool is not None:
            self.pool.close()
        self.loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.pool = ModelPool(self.predictor, self.model_workers)
        self.slots = asyncio.Semaphore(self.model_workers)
        self.aux_executor = ThreadPoolExecutor(1, thread_name_prefix="maskssd-montage")
        for model in self.pool.replicas:  # before the server takes requests (uvicorn waits for the lifespan)
            if getattr(model, "warmup", None) is not None:
                seconds = await self.loop.run_in_executor(self.pool.executor, model.warmup)
                log.info("model warmed up in %.1f s", seconds)
        self.tasks = [asyncio.create_task(self._batcher(), name="maskssd-batcher")]
        if self.montage_path is not None:
            self.montage_dirty = asyncio.Event()
            self.tasks.append(asyncio.create_task(self._montage_loop(), name="maskssd-montage"))

    async def stop(self) -> None:
        tasks = [*self.tasks, *self.running]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.tasks = []
        if self.queue is not None:
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(RequestError(503, "server shutting down"))
        if self.aux_executor is not None:
            self.aux_executor.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.close(cancel=True)

    # --------------------------------------------------------------------------------------- batching
    async def submit(self, image: np.ndarray, floor: float | torch.Tensor | None = None) -> _Result:
        """Queue one decoded image and wait for its detections (those scoring at least ``floor``, one score or
        one per class, when given: a batch decodes from its requests' lowest)."""
        if self.queue is None or self.loop is not asyncio.get_running_loop():
            await self.start()  # an app driven without its lifespan (e.g. TestClient outside ``with``)
        assert self.queue is not None
        if self.tasks[0].done():
            raise RequestError(503, "the batcher has stopped; restart the server")
        if self.queue.qsize() >= self.max_queue:
            wait = self.queue.qsize() * self.last_batch_s / self.max_batch
            raise RequestError(
                503,
                f"server busy: {self.queue.qsize()} images queued; retry later",
                {"retry-after": retry_after(wait)},
            )
        job = _Job(image, asyncio.get_running_loop().create_future(), floor)
        self.metrics.in_flight.inc()
        try:
            await self.queue.put(job)
            return await job.future
        finally:
            self.metrics.in_flight.dec()

    async def _batcher(self) -> None:
        """Group queued requests into batches, one batch per free model worker."""
        assert self.queue is not None and self.slots is not None
        while True:
            await self.slots.acquire()  # a model worker is free: the batch grows while none is
            try:
                batch = await self._next_batch()
            except BaseException:
                self.slots.release()
                raise
            task = asyncio.create_task(self._run(batch), name="maskssd-batch")
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _next_batch(self) -> list[_Job]:
        assert self.queue is not None
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = first.t_enqueued + self.max_wait  # the oldest request waits at most max_wait
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            batch = [j for j in batch if not j.future.done()]  # clients that went away
            if batch:
                return batch

    async def _run(self, batch: list[_Job]) -> None:
        """One batch through a free model worker; its requests get their detections (or the error)."""
        assert self.pool is not None and self.slots is not None
        t_start = time.perf_counter()
        try:
            dets, timing = await asyncio.get_running_loop().run_in_executor(
                self.pool.executor, self._predict, [j.image for j in batch], _batch_floor(batch)
            )
        except (Exception, asyncio.CancelledError) as e:  # a model failure fails this batch only
            err = RequestError(500, f"inference failed: {type(e).__name__}: {e}")
            if isinstance(e, asyncio.CancelledError):
                err = RequestError(503, "server shutting down")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(err)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        finally:
            self.slots.release()
        m = self.metrics
        self.last_batch_s = timing.total
        m.batch_size.observe(len(batch))
        m.inference.observe(timing.model)
        m.batch_seconds.observe(timing.total)
        for j, d in zip(batch, dets, strict=True):
            if not j.future.done():
                j.future.set_result(
                    _Result(d, len(batch), 1000 * timing.model, 1000 * (t_start - j.t_enqueued))
                )

    def _predict(self, images: list[np.ndarray], floor: torch.Tensor | None) -> tuple[list[Detections], Any]:
        assert self.pool is not None
        # the replica's timing is read in the same thread, before the replica is free again: this call's
        return self.pool.call(lambda pred: (pred.predict(images, floor=floor), pred.last_timing))

    # --------------------------------------------------------------------------------------- requests
    async def read_image_bytes(self, request: Request) -> bytes:
        """The upload: multipart field ``file`` or the raw body, at most ``max_bytes``."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise RequestError(
                413, f"request body of {int(declared):,} bytes is over the limit of {self.max_bytes:,} bytes"
            )
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_bytes:
                raise RequestError(413, f"request body is over the limit of {self.max_bytes:,} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/"):
            body = await self._multipart_file(request, body)
        if not body:
            raise RequestError(
                400, "empty image: send the image bytes as the body or as the multipart field 'file'"
            )
        return body

    async def _multipart_file(self, request: Request, body: bytes) -> bytes:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise RequestError(
                415, "multipart bodies must be multipart/form-data with the image in field 'file'"
            )
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        replayed = Request(request.scope, replay)
        try:
            form = await replayed.form(max_files=4, max_fields=16)
        except (MultiPartException, HTTPException) as e:
            raise RequestError(400, f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
        try:
            upload = form.get("file")
            if upload is None:
                raise RequestError(
                    400, f"multipart body has no field 'file' (fields: {', '.join(form.keys()) or 'none'})"
                )
            if isinstance(upload, str):
                raise RequestError(
                    400, "multipart field 'file' must be a file upload (curl -F file=@photo.jpg)"
                )
            return await upload.read()
        finally:
            await form.close()

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """RGB uint8 pixels; 413 for a header claiming more than ``max_pixels`` pixels, 400 for the rest."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as probe:
                    w, h = probe.size
            if w * h > self.max_pixels:
                raise RequestError(
                    413,
                    f"image is {w}x{h} = {w * h:,} pixels, over the limit of "
                    f"{self.max_pixels:,} (decompression-bomb guard)",
                )
        except Image.DecompressionBombError as e:
            raise RequestError(413, f"image refused as a decompression bomb: {e}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            pass  # decode_image_bytes names the problem
        try:
            img = decode_image_bytes(data, self.max_pixels, name)
        except DataError as e:
            raise RequestError(400, e.reason) from None
        return np.asarray(img)

    def camera_label(self, camera: str | None) -> str:
        """A bounded set of metric label values for camera names."""
        name = camera or "none"
        if name in self.camera_labels:
            return name
        if len(self.camera_labels) >= MAX_CAMERA_LABELS:
            return "other"
        self.camera_labels.add(name)
        return name

    # ---------------------------------------------------------------------------------------- montage
    def remember_frame(self, camera: str, image: np.ndarray, dets: Detections) -> None:
        self.cameras[camera] = (image, dets)
        self.cameras.move_to_end(camera)
        while len(self.cameras) > MAX_MONTAGE_CAMERAS:
            self.cameras.popitem(last=False)
        if self.montage_dirty is not None:
            self.montage_dirty.set()

    async def _montage_loop(self) -> None:
        """Rewrite the montage when frames arrived, at most every ``MONTAGE_INTERVAL_S`` seconds."""
        assert self.montage_dirty is not None
        loop = asyncio.get_running_loop()
        while True:
            await self.montage_dirty.wait()
            self.montage_dirty.clear()
            snapshot = list(self.cameras.items())
            try:
                await loop.run_in_executor(self.aux_executor, self._write_montage, snapshot)
            except Exception as e:  # the montage is a side show: report and keep serving
                print(
                    f"maskssd serve: cannot write montage {self.montage_path}: {type(e).__name__}: {e}",
                    flush=True,
                )
            await asyncio.sleep(MONTAGE_INTERVAL_S)

    def _write_montage(self, snapshot: list[tuple[str, tuple[np.ndarray, Detections]]]) -> None:
        from maskssd.evaluation.drawing import draw_detections, montage

        assert self.montage_path is not None
        names = [name for name, _ in snapshot]
        frames = [
            draw_detections(img, d, self.predictor.class_names, 0.0)  # already the shown detections
            for _, (img, d) in snapshot
        ]
        grid = montage(frames, names)
        path = self.montage_path
        with atomic_path(path) as tmp:
            if path.suffix.lower() == ".png":
                grid.save(tmp, format="PNG")
            else:
                grid.save(tmp, format="JPEG", quality=85)
        self.montage_written += 1


def _camera_of(request: Request) -> str | None:
    """The camera name of a request (``?camera=`` or header ``x-camera``), made safe for metrics labels."""
    q = request.query_params
    camera = q.get("camera") or q.get("x-camera") or request.headers.get("x-camera") or None
    return None if camera is None else _CAMERA_RE.sub("_", camera)[:64]


def _batch_floor(batch: list[_Job]) -> torch.Tensor | None:
    """The lowest score any request of the batch shows, per class (None when one shows everything)."""
    if any(j.floor is None for j in batch):
        return None
    floors = [torch.as_tensor(j.floor, dtype=torch.float32) for j in batch]
    width = max(f.numel() for f in floors)
    return torch.stack([f.expand(width) for f in floors]).amin(0)


def _threshold(raw: str | None, default: float | None) -> float | None:
    """The request's ``?score_threshold=`` (display threshold in [0, 1]), else the server's (None: the
    model's per-class thresholds)."""
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RequestError(422, f"score_threshold must be a number, not {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise RequestError(422, f"score_threshold must be in [0, 1], not {value}")
    return value


def _add_status_routes(app: FastAPI, svc: DetectionService) -> None:
    """``GET /health``, ``GET /metrics`` and ``GET /montage``."""
    predictor = svc.predictor

    @app.get(LIVENESS_PATH)
    async def livez() -> dict[str, str]:
        """Liveness only (no token needed, nothing about the model): for load balancers and orchestrators."""
        return {"status": "ok"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness plus what is served (behind the token, like every other route)."""
        return {
            "status": "ok",
            "model": predictor.describe(),
            "uptime_s": round(time.time() - svc.started, 3),
            "batching": {
                "enabled": svc.batching,
                "max_batch": svc.max_batch,
                "max_wait_ms": 1000 * svc.max_wait,
                "model_workers": svc.model_workers,
            },
            "queued": svc.queue.qsize() if svc.queue is not None else 0,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition of this app's registry."""
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/montage")
    async def get_montage() -> Response:
        """The latest montage of every camera's last annotated frame (JPEG)."""
        path = svc.montage_path
        if path is None:
            raise RequestError(404, "montage disabled (start the server with --montage FILE.jpg)")
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise RequestError(404, "no montage yet: no camera has sent a frame") from None
        media = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        return Response(data, media_type=media, headers={"cache-control": "no-store"})


def create_app(
    predictor: Any,
    *,
    max_batch: int = 8,
    max_wait_ms: float = 10,
    batching: bool = True,
    max_bytes: int = 20_000_000,
    max_pixels: int = MAX_IMAGE_PIXELS,
    montage_path: str | Path | None = None,
    score_threshold: float | None = None,
    max_queue: int = 256,
    tokens: list[str] | None = None,
    rate_limit: float = 0.0,
    burst: int = 10,
    model_workers: int = 1,
) -> FastAPI:
    """The detection service as a FastAPI app (``app.state.service`` holds queue, metrics and montage).

    ``tokens``: the accepted bearer tokens (:mod:`maskssd.deploy.auth`; None: no authentication); ``rate_limit``
    requests per second per client (0: none), ``burst`` at once.

    ``POST /detect`` (image as multipart field ``file`` or the raw body; ``?camera=`` or header ``x-camera``;
    ``?score_threshold=``; default ``score_threshold``, else the model's per-class thresholds), ``GET /health``, ``GET /metrics`` (Prometheus, this app's own registry) and
    ``GET /montage`` (latest frame of every camera, when ``montage_path`` is set). Refused requests get a
    4xx JSON ``{"detail": reason}``. ``max_queue`` bounds the images waiting for the model (503 beyond).
    ``model_workers``: batches in the model at once, each on a replica with its share of the cores
    (:class:`~maskssd.deploy.inflight.ModelPool`; ONNX Runtime backends).
    """
    svc = DetectionService(
        predictor,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        batching=batching,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        montage_path=montage_path,
        score_threshold=score_threshold,
        max_queue=max_queue,
        model_workers=model_workers,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="maskssd",
        description="Face-mask detection (SSD) with dynamic batching.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = svc
    limiter = RateLimiter(rate_limit, burst) if rate_limit > 0 else None
    app.add_middleware(
        AuthMiddleware, tokens=TokenSet(list(tokens)) if tokens is not None else None, limiter=limiter
    )
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)  # outermost: counts refused requests too

    @app.exception_handler(RequestError)
    async def _refused(_: Request, e: RequestError) -> JSONResponse:
        if e.status < 500:
            svc.metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse({"detail": e.reason}, status_code=e.status, headers=e.headers)

    @app.post("/detect")
    async def detect(request: Request) -> dict[str, Any]:
        """Detect faces and mask use in one image: multipart field ``file`` or the raw bytes as the body.

        ``?camera=NAME`` or header ``x-camera`` names the camera; ``?score_threshold=S`` overrides the server's.
        """
        camera = _camera_of(request)
        threshold = _threshold(request.query_params.get("score_threshold"), svc.score_threshold)
        data = await svc.read_image_bytes(request)
        image = await asyncio.to_thread(svc.decode, data, f"upload from {camera or 'client'}")
        r = await svc.submit(image, predictor.display_threshold(threshold))
        dets = predictor.shown(r.detections, threshold)
        svc.metrics.frames.labels(svc.camera_label(camera)).inc()
        if svc.montage_path is not None:
            svc.remember_frame(camera or "unnamed", image, dets)
        return {
            "detections": dets.to_list(predictor.class_names),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "camera": camera,
            "model_ms": round(r.model_ms, 3),
            "batch_size": r.batch_size,
            "queue_ms": round(r.queue_ms, 3),
        }

    _add_status_routes(app, svc)
    return app


def run_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Serve ``app`` with uvicorn (one worker: the model and its batching queue live in this process), over TLS
    when given a certificate and its key."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        workers=1,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
