"""``maskssd detect`` on videos and image folders, and temporal class smoothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskssd.cli import main
from maskssd.deploy.video import ClassSmoother, FPSMeter
from maskssd.ssd.postprocess import Detections

CLASSES = ["with_mask", "without_mask", "mask_weared_incorrect"]
N_FRAMES = 8
VIDEO_EXTRA = 'video input is the [video] extra: pip install "maskssd[video]"'


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cv2 = pytest.importorskip("cv2", reason=VIDEO_EXTRA)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
    assert w.isOpened()
    for i in range(N_FRAMES):
        f = np.full((120, 160, 3), 40, np.uint8)
        cv2.rectangle(f, (10 + 6 * i, 20), (60 + 6 * i, 80), (0, 200, 0), -1)
        cv2.rectangle(f, (100, 30 + 4 * i), (140, 70 + 4 * i), (0, 0, 220), -1)
        w.write(f)
    w.release()
    return path


def _count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    cv2 = pytest.importorskip("cv2", reason=VIDEO_EXTRA)

    cap = cv2.VideoCapture(str(path))
    n, size = 0, (0, 0)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, size = n + 1, (frame.shape[1], frame.shape[0])
    cap.release()
    return n, size


def test_detect_video_writes_annotated_video_and_jsonl(
    tiny_checkpoint: Path, video: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(["detect", "--model", str(tiny_checkpoint), "--source", str(video), "--out", str(out)]) == 0
    assert _count_frames(out / "clip_annotated.mp4") == (N_FRAMES, (160, 120))
    lines = [json.loads(x) for x in (out / "clip_detections.jsonl").read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(N_FRAMES))
    for x in lines:
        assert x["fps"] >= 0 and x["model_ms"] > 0
        assert x["detections"] and all(d["label"] in CLASSES and d["score"] >= 0.4 for d in x["detections"])
    assert lines[-1]["fps"] > 0


def test_detect_video_with_smoothing_and_class_agnostic_nms(
    tiny_checkpoint: Path, video: Path, tmp_path: Path
) -> None:
    plain, agnostic = tmp_path / "plain", tmp_path / "agnostic"
    assert (
        main(
            [
                "detect",
                "--model",
                str(tiny_checkpoint),
                "--source",
                str(video),
                "--out",
                str(plain),
                "--max-frames",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "detect",
                "--model",
                str(tiny_checkpoint),
                "--source",
                str(video),
                "--out",
                str(agnostic),
                "--smooth",
                "3",
                "--class-agnostic",
                "--max-frames",
                "4",
            ]
        )
        == 0
    )
    a = [json.loads(x) for x in (plain / "clip_detections.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (agnostic / "clip_detections.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4 and _count_frames(agnostic / "clip_annotated.mp4")[0] == 4
    # NMS across classes can only remove boxes
    assert all(len(y["detections"]) <= len(x["detections"]) for x, y in zip(a, b, strict=True))


def _one_face(label: int, score: float = 0.9, shift: float = 0.0) -> Detections:
    return Detections(
        torch.tensor([[10.0 + shift, 10.0, 60.0 + shift, 70.0]]), torch.tensor([label]), torch.tensor([score])
    )


def test_class_smoother_flips_a_single_frame_change_back() -> None:
    smoother = ClassSmoother(num_classes=3, window=3)
    raw = [1, 1, 1, 2, 1, 1, 3, 1]  # single-frame "transitions" to without_mask and incorrect
    out = [int(smoother(_one_face(lab, shift=i)).labels[0]) for i, lab in enumerate(raw)]
    assert out == [1] * len(raw)

    # a lasting change wins once it has the majority of the window; two faces are followed separately
    smoother = ClassSmoother(num_classes=3, window=3)
    labels = []
    for i, lab in enumerate([1, 1, 2, 2, 2, 2]):
        d = Detections(
            torch.tensor([[10.0 + i, 10, 60 + i, 70], [100, 10, 150, 70]]),
            torch.tensor([lab, 3]),
            torch.tensor([0.8, 0.7]),
        )
        res = smoother(d)
        labels.append(res.labels.tolist())
    assert [x[0] for x in labels] == [1, 1, 1, 2, 2, 2]
    assert all(x[1] == 3 for x in labels)


def test_class_smoother_new_face_listed_before_a_known_one() -> None:
    smoother = ClassSmoother(num_classes=3, window=3)
    smoother(_one_face(1))
    # a face appears far away (listed first), the known face flickers to class 2 for this frame
    d = Detections(
        torch.tensor([[200.0, 10, 250, 70], [11.0, 10, 61, 70]]),
        torch.tensor([3, 2]),
        torch.tensor([0.9, 0.9]),
    )
    assert smoother(d).labels.tolist() == [3, 1]
    assert len(smoother.tracks) == 2


def test_fps_meter() -> None:
    m = FPSMeter(window=4)
    assert m.fps == 0.0
    for _ in range(10):
        m.add(0.05)
    assert m.fps == pytest.approx(20.0)


def test_detect_image_folder_skips_bad_images(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(160, 120), (320, 240), (200, 200)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(src / f"img{i}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (src / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out"
    assert main(["detect", "--model", str(tiny_checkpoint), "--source", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    with Image.open(out / "img1.png") as im:
        assert im.size == (320, 240)
    doc = json.loads((out / "detections.json").read_text())
    assert [Path(x["image"]).name for x in doc["images"]] == ["img0.png", "img1.png", "img2.png"]
    assert len(doc["failed"]) == 1 and "broken.jpg" in doc["failed"][0]
    for x in doc["images"]:
        for d in x["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= x["width"] and 0 <= y1 < y2 <= x["height"]
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err


def test_frames_in_flight_return_each_frames_detections_in_order(
    tiny_checkpoint: Path, video: Path, tmp_path: Path
) -> None:
    """Two frames in the model at once (two ONNX Runtime sessions) write what one at a time writes, frame by
    frame in order; a PyTorch backend refuses, saying why; the process's thread count is left as it was."""
    pytest.importorskip("onnxruntime", reason='ONNX Runtime is the [onnx] extra: pip install "maskssd[onnx]"')
    got = {}
    threads = torch.get_num_threads()
    for n in (1, 2):
        out = tmp_path / f"in{n}"
        argv = ["detect", "--model", str(tiny_checkpoint), "--source", str(video), "--out", str(out)]
        assert main([*argv, "--backend", "onnx", "--in-flight", str(n)]) == 0
        got[n] = [json.loads(x) for x in (out / "clip_detections.jsonl").read_text().splitlines()]
    assert torch.get_num_threads() == threads
    assert [x["frame"] for x in got[2]] == list(range(N_FRAMES))
    assert [x["detections"] for x in got[2]] == [x["detections"] for x in got[1]]

    argv = ["detect", "--model", str(tiny_checkpoint), "--source", str(video), "--out", str(tmp_path / "t")]
    assert main([*argv, "--backend", "torch", "--in-flight", "2"]) != 0


def test_in_flight_keeps_frame_order_when_frames_finish_out_of_order(tiny_checkpoint: Path) -> None:
    """A slow frame does not let the one behind it overtake: results come back in the order frames went in."""
    pytest.importorskip("onnxruntime", reason='ONNX Runtime is the [onnx] extra: pip install "maskssd[onnx]"')
    import time

    from maskssd.deploy.inflight import InFlight
    from maskssd.deploy.predictor import Predictor

    pred = Predictor.from_checkpoint(tiny_checkpoint, backend="onnx")
    flight = InFlight(pred, 2)
    for r in flight.pool.replicas:  # every other frame is slow: it finishes after the next one
        detect = r.detect

        def slow(images, threshold=None, detect=detect):
            if images[0][0, 0, 0] == 1:
                time.sleep(0.2)
            return detect(images, threshold)

        r.detect = slow
    frames = [np.full((64, 64, 3), i % 2, np.uint8) for i in range(6)]
    with flight:
        keys = [k for k, _, _ in flight.detect(enumerate(frames))]
    assert keys == list(range(6))
