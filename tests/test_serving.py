"""The detection service on a real uvicorn server: concurrent clients, bad uploads, batching, metrics,
the camera client and the montage."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

SERVE_EXTRA = 'serving is the [serve] extra: pip install "maskssd[serve]"'
for _module in ("fastapi", "uvicorn", "python_multipart", "prometheus_client", "httpx"):
    pytest.importorskip(_module, reason=SERVE_EXTRA)

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from maskssd.deploy.predictor import Predictor  # noqa: E402
from maskssd.deploy.serving import create_app  # noqa: E402
from maskssd.errors import MaskSSDError  # noqa: E402

CLASSES = ["with_mask", "without_mask", "mask_weared_incorrect"]


class SpyPredictor:
    """Wraps a Predictor and records the largest number of concurrent ``predict`` calls."""

    def __init__(self, predictor: Predictor):
        self._p = predictor
        self._lock = threading.Lock()
        self.active = self.max_active = self.calls = self.warmups = 0

    def warmup(self) -> float:
        self.warmups += 1
        return self._p.warmup()

    def predict(self, images: Any, decode: Any = None, floor: Any = None) -> Any:
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self._p.predict(images, decode, floor)
        finally:
            with self._lock:
                self.active -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


class LiveServer:
    """A uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app: Any):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/livez", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def jpeg(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.full((size[1], size[0], 3), rng.integers(0, 255, 3), np.uint8)
    x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    img[y : y + size[1] // 3, x : x + size[0] // 3] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# bad uploads sent in the middle of the concurrent run: (what, request kwargs, expected status)
BAD: dict[int, tuple[str, dict[str, Any], int]] = {
    0: ("not an image", {"content": b"hello, this is not an image"}, 400),
    1: ("truncated jpeg", {"content": jpeg(99)[:400]}, 400),
    2: ("empty body", {"content": b""}, 400),
    3: ("decompression bomb", {"content": png_bomb()}, 413),
    4: ("oversized body", {"content": b"\xff" * 300_001}, 413),
    5: ("multipart without file", {"files": {"photo": ("a.jpg", jpeg(5), "image/jpeg")}}, 400),
    6: ("too many pixels", {"content": None}, 413),  # filled in below: a real 1200x1000 PNG
}
_buf = io.BytesIO()
Image.new("RGB", (1200, 1000), (10, 20, 30)).save(_buf, format="PNG")
BAD[6] = ("too many pixels", {"content": _buf.getvalue()}, 413)


def _check_good(r: httpx.Response, camera: str | None) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc) >= {"detections", "width", "height", "camera", "model_ms", "batch_size"}
    assert (doc["width"], doc["height"]) == (160, 120)
    assert doc["camera"] == camera
    assert doc["model_ms"] > 0 and doc["batch_size"] >= 1
    assert doc["detections"], "the confident model should find something"
    for d in doc["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 120
        assert d["label"] in CLASSES and 0.4 <= d["score"] <= 1.0
    return doc


def test_concurrent_clients_with_bad_uploads_and_batching(predictor: Predictor) -> None:
    spy = SpyPredictor(predictor)
    app = create_app(spy, max_batch=8, max_wait_ms=50, batching=True, max_bytes=300_000, max_pixels=1_000_000)
    n_clients, n_requests = 8, 5
    results: list[tuple[int, int, httpx.Response | Exception]] = []
    lock = threading.Lock()
    with LiveServer(app) as srv:
        barrier = threading.Barrier(n_clients)

        def client(ci: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                barrier.wait()
                for ri in range(n_requests):
                    try:
                        if ri == 2 and ci in BAD:
                            r = c.post("/detect", **BAD[ci][1])
                        elif ri % 2:  # multipart upload, camera in the query
                            r = c.post(
                                "/detect",
                                params={"camera": f"cam{ci}"},
                                files={"file": ("f.jpg", jpeg(ci * 10 + ri), "image/jpeg")},
                            )
                        else:  # raw body, camera in the header (like maskssd stream)
                            r = c.post(
                                "/detect",
                                content=jpeg(ci * 10 + ri),
                                headers={"content-type": "image/jpeg", "x-camera": f"cam{ci}"},
                            )
                    except httpx.HTTPError as e:
                        r = e  # type: ignore[assignment]
                    with lock:
                        results.append((ci, ri, r))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

        assert len(results) == n_clients * n_requests
        n_good, batch_sizes = 0, []
        for ci, ri, r in results:
            assert isinstance(r, httpx.Response), f"client {ci} request {ri}: {r!r}"
            if ri == 2 and ci in BAD:
                what, _, status = BAD[ci]
                assert r.status_code == status, (what, r.status_code, r.text)
                detail = r.json()["detail"]
                assert isinstance(detail, str) and detail, what
            else:
                batch_sizes.append(_check_good(r, f"cam{ci}")["batch_size"])
                n_good += 1
        assert max(batch_sizes) > 1

        # the server keeps serving after the bad uploads; per-request score_threshold works
        r = httpx.post(srv.url + "/detect", content=jpeg(1), params={"score_threshold": 0.0})
        assert r.status_code == 200 and len(r.json()["detections"]) >= 1 and r.json()["camera"] is None
        r = httpx.post(srv.url + "/detect", content=jpeg(1), params={"score_threshold": 1.5})
        assert r.status_code == 422 and "score_threshold" in r.json()["detail"]
        n_good += 1
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "ok" and health["model"]["classes"] == CLASSES
        assert health["model"]["backend"] == "torch" and health["uptime_s"] >= 0

        m = metric_samples(httpx.get(srv.url + "/metrics").text)

    assert sample(m, "maskssd_requests_total", endpoint="/detect", status="200") == n_good
    assert sample(m, "maskssd_requests_total", endpoint="/detect", status="400") == sum(
        1 for _, _, s in BAD.values() if s == 400
    )
    assert sample(m, "maskssd_requests_total", endpoint="/detect", status="413") == sum(
        1 for _, _, s in BAD.values() if s == 413
    )
    assert sample(m, "maskssd_requests_total", endpoint="/detect", status="422") == 1
    assert (
        sample(m, "maskssd_request_latency_seconds_count", endpoint="/detect") == n_clients * n_requests + 2
    )
    # every good image went through the model exactly once; some batches held several
    assert sample(m, "maskssd_batch_size_sum") == n_good
    n_batches = sample(m, "maskssd_batch_size_count")
    assert sample(m, "maskssd_batch_size_bucket", le="1.0") < n_batches
    assert sample(m, "maskssd_model_inference_seconds_count") == n_batches
    assert sample(m, "maskssd_images_in_flight") == 0
    assert sample(m, "maskssd_camera_frames_total", camera="cam7") == n_requests
    assert sample(m, "maskssd_camera_frames_total", camera="cam0") == n_requests - 1
    assert spy.max_active == 1 and spy.calls == n_batches


def test_batching_off_runs_every_image_alone(predictor: Predictor) -> None:
    spy = SpyPredictor(predictor)
    app = create_app(spy, max_batch=8, max_wait_ms=50, batching=False)
    with LiveServer(app) as srv:
        # warmed once before the first request (the kernels' compile is not a camera's wait), and not counted
        assert spy.warmups == 1 and spy.calls == 0
        sizes: list[int] = []

        def client(ci: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for ri in range(4):
                    sizes.append(_check_good(c.post("/detect", content=jpeg(ci + ri)), None)["batch_size"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        m = metric_samples(httpx.get(srv.url + "/metrics").text)
        assert httpx.get(srv.url + "/health").json()["batching"]["enabled"] is False
    assert sizes == [1] * 16
    assert sample(m, "maskssd_batch_size_count") == 16 and sample(m, "maskssd_batch_size_sum") == 16
    assert sample(m, "maskssd_batch_size_bucket", le="1.0") == 16
    assert spy.max_active == 1


LOCK, ALL = threading.Lock(), {"active": 0, "max": 0}


class SlowReplicas(SpyPredictor):
    """A spy slow enough (50 ms a call) that two clients' batches overlap where they can; its replicas are spies
    too, all listed in ``made``."""

    def __init__(self, predictor: Predictor, made: list[SpyPredictor]):
        super().__init__(predictor)
        self.made = made
        made.append(self)

    def predict(self, images: Any, decode: Any = None, floor: Any = None) -> Any:
        with LOCK:  # across every replica: batches in the model at once
            ALL["active"] += 1
            ALL["max"] = max(ALL["max"], ALL["active"])
        try:
            time.sleep(0.05)
            return super().predict(images, decode, floor)
        finally:
            with LOCK:
                ALL["active"] -= 1

    def replica(self, threads: int) -> SlowReplicas:
        return SlowReplicas(self._p.replica(threads), self.made)


def test_model_workers_take_batches_side_by_side(tiny_checkpoint: Path) -> None:
    """Two model workers (ONNX Runtime replicas, one thread each) have two batches in the model at once and
    answer what one worker answers; a PyTorch model refuses two workers before the server starts."""
    pytest.importorskip("onnxruntime", reason='ONNX Runtime is the [onnx] extra: pip install "maskssd[onnx]"')
    with pytest.raises(MaskSSDError, match="ONNX Runtime backend"):
        create_app(Predictor.from_checkpoint(tiny_checkpoint), model_workers=2)
    onnx = Predictor.from_checkpoint(tiny_checkpoint, backend="onnx")
    answers: dict[int, dict[int, Any]] = {}
    for workers in (1, 2):
        made: list[SpyPredictor] = []
        ALL["max"] = 0
        app = create_app(SlowReplicas(onnx, made), max_batch=2, max_wait_ms=5, model_workers=workers)
        got: dict[int, Any] = {}
        with LiveServer(app) as srv:
            assert httpx.get(srv.url + "/health").json()["batching"]["model_workers"] == workers

            def client(ci: int, url: str = srv.url, got: dict[int, Any] = got) -> None:
                with httpx.Client(base_url=url, timeout=30) as c:
                    for ri in range(3):
                        got[ci * 3 + ri] = _check_good(c.post("/detect", content=jpeg(ci * 3 + ri)), None)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        answers[workers] = {k: v["detections"] for k, v in got.items()}
        used = made[1:] if workers > 1 else made  # the replicas, or the predictor itself
        assert len(answers[workers]) == 12 and len(used) == workers
        assert all(s.calls and s.max_active == 1 for s in used)  # each took batches, one at a time
        assert ALL["max"] == workers  # two workers: two batches in the model at once
    assert answers[2] == answers[1]


def _write_video(path: Path, n: int = 6) -> Path:
    cv2 = pytest.importorskip("cv2", reason='video input is the [video] extra: pip install "maskssd[video]"')

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
    assert w.isOpened()
    for i in range(n):
        f = np.zeros((120, 160, 3), np.uint8)
        cv2.rectangle(f, (10 + 8 * i, 20), (70 + 8 * i, 90), (0, 180, 0), -1)
        w.write(f)
    w.release()
    return path


def test_stream_cameras_update_the_montage(predictor: Predictor, tmp_path: Path) -> None:
    from maskssd.deploy.video import stream

    video = _write_video(tmp_path / "clip.mp4")
    montage = tmp_path / "montage" / "cams.jpg"
    app = create_app(predictor, max_wait_ms=20, montage_path=montage)
    with LiveServer(app) as srv:
        r = httpx.get(srv.url + "/montage")
        assert r.status_code == 404 and "no montage" in r.json()["detail"]
        sent: list[int] = []

        def camera(name: str) -> None:
            sent.append(stream(srv.url, str(video), camera=name).sent)

        threads = [threading.Thread(target=camera, args=(n,)) for n in ("door", "hall")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sent == [6, 6]
        deadline = time.monotonic() + 5
        size = None
        while time.monotonic() < deadline:  # the montage is rewritten at most every 0.5 s
            if montage.is_file():
                with Image.open(montage) as im:
                    size = im.size
                if size == (960, 360):  # two 480x360 tiles side by side
                    break
            time.sleep(0.1)
        assert size == (960, 360)
        r = httpx.get(srv.url + "/montage")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (960, 360)
        m = metric_samples(httpx.get(srv.url + "/metrics").text)
    assert sample(m, "maskssd_camera_frames_total", camera="door") == 6
    assert sample(m, "maskssd_camera_frames_total", camera="hall") == 6
    assert [p.name for p in montage.parent.iterdir()] == ["cams.jpg"]  # no temporary files left behind


def test_serve_cli_wires_arguments(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from maskssd.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    rc = main(
        [
            "serve",
            "--model",
            str(tiny_checkpoint),
            "--port",
            "8123",
            "--no-batching",
            "--backend",
            "onnx",
            "--class-agnostic",
            "--montage",
            str(tmp_path / "m.jpg"),
            "--score-threshold",
            "0.5",
        ]
    )
    assert rc == 0 and seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    svc = seen["app"].state.service
    assert svc.batching is False and svc.max_batch == 1 and svc.score_threshold == 0.5
    assert svc.montage_path == tmp_path / "m.jpg"
    assert svc.predictor.backend == "onnx" and svc.predictor.decode.class_agnostic is True


class FlakyPredictor(SpyPredictor):
    """Fails its first call: the batch fails with 500, the next requests are served."""

    def predict(self, images: Any, decode: Any = None, floor: Any = None) -> Any:
        if self.calls == 0:
            self.calls += 1
            raise RuntimeError("simulated model failure")
        return super().predict(images, decode, floor)


def test_edge_cases_in_process(predictor: Predictor) -> None:
    from fastapi.testclient import TestClient

    app = create_app(FlakyPredictor(predictor), batching=False)
    with TestClient(app) as c:
        r = c.post("/detect", content=jpeg(0))
        assert r.status_code == 500 and "simulated model failure" in r.json()["detail"]
        assert c.post("/detect", content=jpeg(0)).status_code == 200
        r = c.post("/detect", data={"file": "not a file"}, files={"x": ("x.bin", b"1")})
        assert r.status_code == 400 and "file upload" in r.json()["detail"]
        r = c.post("/detect", content=b"--b\r\nbroken", headers={"content-type": "multipart/form-data"})
        assert r.status_code == 400 and "multipart" in r.json()["detail"]
        r = c.post("/detect", content=jpeg(0), headers={"content-type": "multipart/mixed; boundary=b"})
        assert r.status_code == 415
        assert c.get("/montage").status_code == 404
        assert c.get("/nope").status_code == 404
        m = metric_samples(c.get("/metrics").text)
    assert sample(m, "maskssd_requests_total", endpoint="/detect", status="500") == 1
    assert sample(m, "maskssd_requests_total", endpoint="other", status="404") == 1
    # an app used without its lifespan starts its batcher on the first request
    plain = TestClient(create_app(predictor))  # (every request on a new event loop)
    for _ in range(2):
        r = plain.post("/detect", content=jpeg(0), headers={"x-camera": "lobby/1"})
        assert r.status_code == 200 and r.json()["camera"] == "lobby_1"


def test_a_batch_decodes_from_the_lowest_threshold_any_of_its_requests_shows() -> None:
    from maskssd.deploy.serving import _batch_floor, _Job

    def job(floor: Any) -> _Job:
        return _Job(np.zeros((2, 2, 3), np.uint8), None, floor)  # type: ignore[arg-type]

    per_class = torch.tensor([0.5, 0.2, 0.9])
    assert _batch_floor([job(0.4), job(per_class)]).tolist() == pytest.approx([0.4, 0.2, 0.4])
    assert _batch_floor([job(0.4), job(0.6)]).tolist() == pytest.approx([0.4])
    assert _batch_floor([job(0.4), job(None)]) is None  # one request shows everything
