"""ONNX Runtime int8 (maskssd.deploy.quantize): static quantisation calibrated on training images runs, follows the
float model (not equal to it), keeps the heads and shape arithmetic float, and is cached per checkpoint and
calibration set behind ``--backend onnx-int8``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from maskssd.deploy.export import export_onnx, onnx_session
from maskssd.deploy.quantize import (
    Calibration,
    ImageCalibrationReader,
    build_int8,
    calibration_files,
    calibration_key,
    compare_int8,
    head_nodes,
    int8_cache_path,
    quantize_onnx,
    shape_nodes,
)
from maskssd.errors import MaskSSDError
from maskssd.ssd.checkpoint import load
from maskssd.ssd.models import build_model


def _image_dependent_tiny() -> nn.Module:
    """The tiny model with weights large enough that its outputs depend on the image (not only on biases)."""
    torch.manual_seed(0)
    m = build_model("tiny", num_classes=4, input_size=96)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    return m.eval()


def test_calibration_files_are_spread_over_the_training_split(synth_root: Path) -> None:
    files = calibration_files(Calibration(synth_root, "default", 5))
    assert len(files) == 5 and len(set(files)) == 5 and all(f.is_file() for f in files)
    assert len(calibration_files(Calibration(synth_root, "default", 10_000))) < 40  # the whole split, no more
    assert calibration_key(files, 96) != calibration_key(files[:4], 96) != calibration_key(files[:4], 128)
    with pytest.raises(MaskSSDError):
        calibration_files(Calibration(synth_root, "default", 0))


@pytest.mark.parametrize("exclude_heads", [True, False])
def test_int8_model_runs_and_follows_the_float_model(
    synth_root: Path, tmp_path: Path, exclude_heads: bool
) -> None:
    model = _image_dependent_tiny()
    files = calibration_files(Calibration(synth_root, "default", 8))
    path = build_int8(model, tmp_path / "m.int8.onnx", files, exclude_heads=exclude_heads)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and "BatchNormalization" not in ops
    # the nodes from the heads' last convolutions to the outputs are float exactly when the heads are excluded
    assert ("DequantizeLinear" in {n.op_type for n in proto.graph.node if n.name in head_nodes(proto)}) != (
        exclude_heads
    )
    session = onnx_session(path)
    corr_locs, corr_scores, diff_locs, diff_scores = compare_int8(model, session, files)
    assert corr_locs > 0.95 and corr_scores > 0.95  # follows the float model ...
    assert diff_locs > 1e-5 and diff_scores > 1e-5  # ... in 8 bits, not exactly
    x = np.random.default_rng(0).random((3, 3, 96, 96), dtype=np.float32)
    locs, scores = session.run(None, {"images": x})  # the batch stays dynamic
    assert locs.shape == (3, model.prior_spec.num_priors, 4) and scores.shape[-1] == 4


def test_shape_arithmetic_is_not_quantised(synth_root: Path, tmp_path: Path) -> None:
    """timm's ``Conv2dSame`` (EfficientNet-Lite) exports its padding as float arithmetic on the input's shape
    (Cast, Div, Ceil, ...); quantising that rounds the pads and shrinks the feature maps (here 414 boxes instead
    of 522 came out when it was quantised). It is excluded."""
    torch.manual_seed(0)
    model = build_model("ssdlite_effnet_lite0", num_classes=4, input_size=64, pretrained=False).eval()
    float_path = export_onnx(model, tmp_path / "dynamic_pads.onnx")  # not optimised: pads computed per call
    assert len(shape_nodes(onnx.load(str(float_path)))) > 50
    files = calibration_files(Calibration(synth_root, "default", 2))
    out = quantize_onnx(float_path, tmp_path / "q.onnx", ImageCalibrationReader(files, 64))
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    assert onnx_session(out).run(None, {"images": x})[0].shape == (1, model.prior_spec.num_priors, 4)


def test_onnx_int8_backend_is_cached_per_checkpoint_and_calibration(
    tiny_checkpoint: Path, synth_root: Path
) -> None:
    from maskssd.deploy.predictor import Predictor

    with pytest.raises(MaskSSDError, match="calibration"):
        Predictor.from_checkpoint(tiny_checkpoint, backend="onnx-int8")
    cal = Calibration(synth_root, "default", 6)
    pred = Predictor.from_checkpoint(tiny_checkpoint, backend="onnx-int8", calibration=cal)
    assert pred.backend == "onnx-int8" and pred.model is None and pred.describe()["backend"] == "onnx-int8"
    cache = int8_cache_path(tiny_checkpoint, calibration_key(calibration_files(cal), 128))
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((120, 160), (300, 200))]
    dets = pred.predict(images)
    ref = Predictor.from_checkpoint(tiny_checkpoint).predict(images)
    for d, r in zip(dets, ref, strict=True):
        assert len(d) > 0 and int(d.labels[d.scores.argmax()]) == int(r.labels[r.scores.argmax()])
    Predictor.from_checkpoint(tiny_checkpoint, backend="onnx-int8", calibration=cal)  # reused
    assert cache.stat().st_mtime_ns == mtime
    other = Calibration(synth_root, "default", 4)  # another calibration set: another cache file
    Predictor.from_checkpoint(tiny_checkpoint, backend="onnx-int8", calibration=other, tta_hflip=True)
    assert int8_cache_path(tiny_checkpoint, calibration_key(calibration_files(other), 128)).is_file()
    time.sleep(0.01)
    tiny_checkpoint.touch()  # a newer checkpoint: rebuilt
    Predictor.from_checkpoint(tiny_checkpoint, backend="onnx-int8", calibration=cal)
    assert cache.stat().st_mtime_ns > mtime


def test_export_cli_int8(
    tiny_checkpoint: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from maskssd.cli import main

    out = tmp_path / "model.int8.onnx"
    base = ["export", "--model", str(tiny_checkpoint), "--format", "onnx", "--out", str(out), "--int8"]
    assert main(base) == 2  # no calibration images
    assert "--calibration" in capsys.readouterr().err
    args = base + ["--calibration", str(synth_root), "--split-name", "default", "--calibration-images", "6"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "int8" in text and "correlation" in text
    meta = onnx_session(out).get_modelmeta().custom_metadata_map
    assert "with_mask" in meta["maskssd.class_names"] and meta["maskssd.quantization"].startswith("int8")
    detect = [
        "detect",
        "--model",
        str(tiny_checkpoint),
        "--source",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(detect + ["--backend", "onnx-int8"]) == 2  # the backend needs --calibration
    assert "carries none" in capsys.readouterr().err

    # a model from before training stored calibration images: written again carrying them, it needs none
    carried = tmp_path / "carried.pt"
    cal_args = ["--calibration", str(synth_root), "--split-name", "default", "--calibration-images", "6"]
    assert (
        main(["export", "--model", str(tiny_checkpoint), "--format", "checkpoint", "--out", str(carried)])
        == 2
    )
    assert (
        main(
            ["export", "--model", str(tiny_checkpoint), "--format", "checkpoint", "--out", str(carried)]
            + cal_args
        )
        == 0
    )
    assert len(load(carried)["calibration"]["images"]) == 6
    out2 = tmp_path / "carried.int8.onnx"
    capsys.readouterr()
    assert main(["export", "--model", str(carried), "--format", "onnx", "--int8", "--out", str(out2)]) == 0
    assert "6 images (carried by the model" in capsys.readouterr().out
    image = sorted((synth_root / "images").iterdir())[0]
    detect = ["detect", "--model", str(carried), "--source", str(image), "--out", str(tmp_path / "o")]
    assert main(detect + ["--backend", "onnx-int8"]) == 0


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_recipe_follows_the_cpu_and_both_recipes_follow_the_float_model(
    synth_root: Path, tmp_path: Path, vnni: bool
) -> None:
    """Without VNNI an x86 CPU's u8s8 kernels saturate: the weights are reduced to 7 bits there. Both recipes
    are built and checked here, whatever this CPU has (the detection is injected)."""
    from maskssd.deploy.quantize import has_vnni, int8_recipe

    assert has_vnni({"avx2", "avx512_vnni"}) and not has_vnni({"avx2", "avx512f"})
    assert int8_recipe(vnni=vnni, machine="x86_64") == {"reduce_range": not vnni}
    assert int8_recipe(vnni=False, machine="aarch64") == {"reduce_range": False}  # no vpmaddubsw there
    model = _image_dependent_tiny()
    files = calibration_files(Calibration(synth_root, "default", 8))
    recipe = int8_recipe(vnni=vnni, machine="x86_64")
    assert calibration_key(files, 96, recipe) != calibration_key(files, 96, {"reduce_range": vnni})
    path = build_int8(model, tmp_path / "m.int8.onnx", files, recipe=recipe)
    meta = onnx_session(path).get_modelmeta().custom_metadata_map
    assert ("7-bit" in meta["maskssd.quantization"]) == (not vnni)
    corr_locs, corr_scores, *_ = compare_int8(model, onnx_session(path), files)
    assert corr_locs > 0.95 and corr_scores > 0.95


def test_carried_calibration_leaves_out_an_unreadable_image(tmp_path: Path) -> None:
    """A run that skipped a bad file while training must still log its model: the calibration images it
    carries leave the unreadable one out, and only none readable at all is an error."""
    from PIL import Image

    from maskssd.data.calibration import decode_calibration, embed_calibration

    rng = np.random.default_rng(0)
    good = []
    for i in range(2):
        good.append(tmp_path / f"g{i}.png")
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(good[-1])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    cal = embed_calibration([good[0], bad, good[1]], 32, n=3, source="3 training images")
    assert [tuple(i.shape) for i in decode_calibration(cal)] == [(3, 32, 32)] * 2
    with pytest.raises(MaskSSDError, match="no calibration image could be read"):
        embed_calibration([bad], 32)
