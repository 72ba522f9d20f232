"""Inference rewrites (maskssd.deploy.optimize): BatchNorm folded into convolutions and static "same" padding give
the model's outputs, in PyTorch and through ONNX, and the predictor uses them by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from maskssd.deploy.optimize import (
    batchnorm_count,
    fold_batchnorm,
    optimize_for_inference,
    static_same_padding,
)
from maskssd.ssd.models import build_model

MODELS = {
    "tiny": ("tiny", {"input_size": 96}),
    "lite0": ("ssdlite_effnet_lite0", {"input_size": 96, "pretrained": False}),
    "lite0 fpn stride4": (
        "ssdlite_effnet_lite0",
        {"input_size": 100, "pretrained": False, "neck": "fpn", "neck_channels": 32, "stride4": True},
    ),
    "ssd300": ("ssd300_vgg16", {}),
}


def _trained_looking(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (freshly built ones are the identity: folding them
    would prove nothing)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    name, kw = MODELS[request.param]
    return request.param, _trained_looking(build_model(name, num_classes=4, **kw))


def test_folded_model_gives_the_same_outputs(model: tuple[str, nn.Module]) -> None:
    label, m = model
    before = batchnorm_count(m)
    folded = fold_batchnorm(m)
    assert batchnorm_count(m) == before  # a copy: the original keeps its BatchNorms
    assert batchnorm_count(folded) == 0 and not folded.training
    assert (before == 0) == (label == "ssd300")  # VGG16 has no BatchNorm: nothing to fold
    x = torch.rand(1, 3, m.input_size, m.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (ref_locs, ref_scores), (locs, scores) = m(x), folded(x)
    assert (locs - ref_locs).abs().max() < 1e-4 and (scores - ref_scores).abs().max() < 1e-4
    if before:
        assert not torch.equal(scores, ref_scores) or not torch.equal(locs, ref_locs)  # folded, not a no-op


@pytest.mark.parametrize("size", [96, 97])
def test_static_padding_is_exact_and_removes_every_dynamic_pad(size: int) -> None:
    torch.manual_seed(0)
    m = _trained_looking(
        build_model("ssdlite_effnet_lite0", num_classes=4, input_size=size, pretrained=False)
    )
    same = [n for n, x in m.named_modules() if type(x).__name__ == "Conv2dSame"]
    assert len(same) == 5  # the stem and the four stride-2 depthwise convolutions
    static = static_same_padding(m)
    assert not [n for n, x in static.named_modules() if type(x).__name__ == "Conv2dSame"]
    # TensorFlow pads a stride-2 3x3 convolution of an even size by (0, 1): uneven, a ZeroPad2d before the conv
    assert any(isinstance(x, nn.ZeroPad2d) for x in static.modules()) == (size % 2 == 0)
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        (a, b), (c, d) = m(x), static(x)
    assert (a - c).abs().max() < 1e-6 and (b - d).abs().max() < 1e-6


def test_optimized_neck_model_exports_to_onnx_and_verifies(tmp_path: Path) -> None:
    import onnx

    from maskssd.deploy.export import export_onnx, onnx_session, verify_export

    torch.manual_seed(0)
    name, kw = MODELS["lite0 fpn stride4"]
    m = _trained_looking(build_model(name, num_classes=4, **kw))
    path = export_onnx(optimize_for_inference(m), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Ceil" not in ops  # no per-call padding arithmetic left
    assert max(verify_export(m, path, "onnx", batch=2)) < 1e-4  # against the model as built
    assert onnx_session(path).get_outputs()[1].shape[1:] == [m.prior_spec.num_priors, 4]


def test_predictor_folds_by_default_with_the_same_detections(tiny_checkpoint: Path) -> None:
    from maskssd.deploy.predictor import Predictor

    folded = Predictor.from_checkpoint(tiny_checkpoint)
    plain = Predictor.from_checkpoint(tiny_checkpoint, fold_bn=False)
    assert batchnorm_count(folded.model) == 0 < batchnorm_count(plain.model)
    images = [np.random.default_rng(2).integers(0, 255, (200, 260, 3), dtype=np.uint8)]
    a, b = folded.predict(images)[0], plain.predict(images)[0]
    assert len(a) == len(b) > 0 and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)
