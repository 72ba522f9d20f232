"""ONNX and TorchScript exports give PyTorch's outputs; the ONNX backend gives the torch backend's detections."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from maskssd.deploy.export import (
    export_onnx,
    export_torchscript,
    load_torchscript,
    onnx_cache_path,
    onnx_session,
    physical_cores,
)
from maskssd.deploy.predictor import Predictor
from maskssd.ssd.models import build_model

CLASSES = ["with_mask", "without_mask", "mask_weared_incorrect"]
ONNX_EXTRA = 'ONNX export and ONNX Runtime are the [onnx] extra: pip install "maskssd[onnx]"'


def need_onnx() -> None:
    for module in ("onnx", "onnxruntime"):
        pytest.importorskip(module, reason=ONNX_EXTRA)


MODELS = {
    "tiny": {"input_size": 128},
    "ssdlite_effnet_lite0": {"input_size": 192, "pretrained": False},
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(request.param, num_classes=4, **MODELS[request.param]).eval()


def _inputs(model: torch.nn.Module, batch: int) -> torch.Tensor:
    s = model.input_size
    return torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(batch))


def test_onnx_matches_pytorch_with_dynamic_batch(model: torch.nn.Module, tmp_path: Path) -> None:
    need_onnx()
    path = export_onnx(model, tmp_path / "m.onnx")
    sess = onnx_session(path)
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["locs", "scores"]
    assert sess.get_inputs()[0].shape[1:] == [3, model.input_size, model.input_size]
    for batch in (1, 3):
        x = _inputs(model, batch)
        with torch.no_grad():
            ref_locs, ref_scores = model(x)
        locs, scores = sess.run(None, {"images": x.numpy()})
        assert locs.shape == tuple(ref_locs.shape) and scores.shape == tuple(ref_scores.shape)
        assert np.abs(locs - ref_locs.numpy()).max() < 1e-4
        assert np.abs(scores - ref_scores.numpy()).max() < 1e-4
    assert not list(tmp_path.glob(".*"))  # written atomically, no temporary left


def test_torchscript_matches_pytorch(model: torch.nn.Module, tmp_path: Path) -> None:
    ts = load_torchscript(export_torchscript(model, tmp_path / "m.ts"))
    for batch in (1, 3):
        x = _inputs(model, batch)
        with torch.no_grad():
            ref_locs, ref_scores = model(x)
            locs, scores = ts(x)
        assert (locs - ref_locs).abs().max() < 1e-5 and (scores - ref_scores).abs().max() < 1e-5


def test_cpu_predictor_runs_channels_last_with_the_same_detections(tiny_checkpoint: Path) -> None:
    """On CPU the PyTorch backend runs NHWC (faster there); asking for NCHW gives the same detections."""
    nhwc = Predictor.from_checkpoint(tiny_checkpoint)
    nchw = Predictor.from_checkpoint(tiny_checkpoint, channels_last=False)
    assert nhwc.channels_last and not nchw.channels_last
    conv = next(m for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = [np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8)]
    a, b = nhwc.predict(images)[0], nchw.predict(images)[0]
    assert len(a) == len(b) > 0 and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)


def test_onnx_backend_gives_the_torch_backends_detections(tiny_checkpoint: Path) -> None:
    need_onnx()
    cache = onnx_cache_path(tiny_checkpoint)
    cache.unlink(missing_ok=True)
    torch_pred = Predictor.from_checkpoint(tiny_checkpoint, backend="torch")
    onnx_pred = Predictor.from_checkpoint(tiny_checkpoint, backend="onnx")
    assert onnx_pred.backend == "onnx" and onnx_pred.model is None and cache.is_file()
    assert onnx_pred.onnx_session.get_session_options().intra_op_num_threads == physical_cores()
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((120, 160), (480, 640), (300, 300))
    ]
    a, b = torch_pred.predict(images), onnx_pred.predict(images)
    assert sum(len(d) for d in a) > 0
    for da, db in zip(a, b, strict=True):
        assert len(da) == len(db)
        assert torch.equal(da.labels, db.labels)
        assert (da.boxes - db.boxes).abs().max() < 1e-3 if len(da) else True
        assert (da.scores - db.scores).abs().max() < 1e-4 if len(da) else True

    # the cached export is reused while the checkpoint is unchanged, rebuilt when it changes
    mtime = cache.stat().st_mtime_ns
    Predictor.from_checkpoint(tiny_checkpoint, backend="onnx")
    assert cache.stat().st_mtime_ns == mtime
    time.sleep(0.01)
    os.utime(tiny_checkpoint)  # a newer checkpoint
    Predictor.from_checkpoint(tiny_checkpoint, backend="onnx")
    assert cache.stat().st_mtime_ns > mtime
    cache.write_bytes(b"garbage")  # a corrupt cache is rebuilt too
    os.utime(cache, ns=(time.time_ns() + 10**9,) * 2)
    p = Predictor.from_checkpoint(tiny_checkpoint, backend="onnx")
    assert len(p.predict(images[:1])[0]) == len(a[0])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_cli(
    tiny_checkpoint: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from maskssd.cli import main

    if fmt == "onnx":
        need_onnx()
    out = tmp_path / "exported" / f"model.{fmt}"
    assert main(["export", "--model", str(tiny_checkpoint), "--format", fmt, "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    text = capsys.readouterr().out
    assert "wrote" in text and "locs" in text and "scores" in text and "max abs diff" in text
    if fmt == "onnx":
        meta = onnx_session(out).get_modelmeta().custom_metadata_map
        assert "with_mask" in meta["maskssd.class_names"] and meta["maskssd.input_size"] == "128"
    else:
        with torch.no_grad():
            locs, scores = load_torchscript(out)(torch.rand(2, 3, 128, 128))
        assert locs.shape[0] == 2 and scores.shape[-1] == 4


def test_export_cli_missing_model(tmp_path: Path) -> None:
    from maskssd.cli import main

    assert (
        main(
            [
                "export",
                "--model",
                str(tmp_path / "nope.pt"),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 2
    )


def test_neck_model_exports_to_onnx_and_verifies(tmp_path: Path) -> None:
    """A PAN neck with a stride-4 level (nearest resizes, depthwise stride-2 convs) exports at opset 17 and the
    export's outputs agree with PyTorch's (the verify path of ``maskssd export``), at a small odd size (maps 25,
    13, 7 at 100 px: resizes that are not exact doublings)."""
    need_onnx()
    from maskssd.deploy.export import verify_export

    torch.manual_seed(0)
    model = build_model(
        "ssdlite_effnet_lite0",
        num_classes=4,
        input_size=100,
        pretrained=False,
        neck="pan",
        neck_channels=32,
        stride4=True,
    ).eval()
    path = export_onnx(model, tmp_path / "neck.onnx")
    sess = onnx_session(path)
    assert sess.get_outputs()[0].shape[1:] == [model.prior_spec.num_priors, 4]
    d_locs, d_scores = verify_export(model, path, "onnx", batch=2)
    assert d_locs < 1e-4 and d_scores < 1e-4
    ts = tmp_path / "neck.ts"
    export_torchscript(model, ts)
    assert max(verify_export(model, ts, "torchscript", batch=2)) < 1e-5


def test_onnx_backend_with_tta_gives_the_torch_backends_tta_detections(tiny_checkpoint: Path) -> None:
    """Test-time augmentation runs the frame and its mirror through any backend."""
    from maskssd.ssd.postprocess import DecodeSpec

    decode = DecodeSpec(min_score=0.05, class_agnostic=True)
    torch_pred = Predictor.from_checkpoint(tiny_checkpoint, decode=decode, tta_hflip=True)
    onnx_pred = Predictor.from_checkpoint(tiny_checkpoint, decode=decode, backend="onnx", tta_hflip=True)
    assert onnx_pred.tta_hflip and onnx_pred.prior_spec is not None
    images = [np.random.default_rng(5).integers(0, 255, (180, 240, 3), dtype=np.uint8)]
    a, b = torch_pred.predict(images)[0], onnx_pred.predict(images)[0]
    assert len(a) == len(b) > 0 and torch.equal(a.labels, b.labels)
    assert (a.boxes - b.boxes).abs().max() < 1e-3 and (a.scores - b.scores).abs().max() < 1e-4


def test_auto_backend_is_onnx_runtime_on_a_cpu_when_installed(monkeypatch, tiny_checkpoint, caplog):
    import importlib.util
    import logging

    from maskssd.deploy.model_ref import resolve_backend
    from maskssd.deploy.predictor import Predictor

    assert resolve_backend("auto", "cpu")[0] == "onnx"
    assert resolve_backend("auto", "cuda:0")[0] == "torch" and resolve_backend("torch", "cpu")[0] == "torch"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    backend, why = resolve_backend("auto", "cpu")
    assert backend == "torch" and 'pip install "maskssd[onnx]"' in why
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with caplog.at_level(logging.INFO, logger="maskssd.deploy.predictor"):
        auto = Predictor.from_checkpoint(tiny_checkpoint, backend="auto")
    assert auto.backend == "onnx" and "backend onnx (auto: ONNX Runtime" in caplog.text  # said at start
    torch_pred = Predictor.from_checkpoint(tiny_checkpoint, backend="torch")
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    a, b = auto.predict([frame])[0], torch_pred.predict([frame])[0]
    assert len(a) == len(b) and torch.allclose(a.scores, b.scores, atol=1e-4)
