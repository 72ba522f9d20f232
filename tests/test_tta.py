"""Horizontal-flip test-time augmentation: the mirror permutation of the priors, merging before NMS, and the
option in the predictor, the training engine's evaluation, the config and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from maskssd.deploy.predictor import Predictor
from maskssd.ssd.anchors import prior_spec, ssdlite_feature_maps
from maskssd.ssd.postprocess import DecodeSpec
from maskssd.ssd.priors import PriorSpec
from maskssd.ssd.tta import (
    hflip_forward,
    hflip_predictions,
    merge_hflip,
    mirror_error,
    mirror_permutation,
    tta_priors,
)

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")
LAYOUTS = {
    "ssd300": PriorSpec.ssd300(),
    "ssdlite 384": prior_spec(
        ssdlite_feature_maps(384, 6), (0.04, 0.1, 0.2, 0.35, 0.5, 0.7), (0.4, 0.6, 0.8)
    ),
    "ssdlite 320": prior_spec(
        ssdlite_feature_maps(320, 6), (0.05, 0.2, 0.4, 0.6, 0.8, 0.95), (2, 0.5, 3, 1 / 3)
    ),
    "ssdlite 100 stride4 (odd maps)": prior_spec(
        ssdlite_feature_maps(100, 7, min_stride=4), (0.03, 0.06, 0.1, 0.2, 0.4, 0.6, 0.9), (2.0, 0.5)
    ),
    "tiny 128": PriorSpec.linear(ssdlite_feature_maps(128, 5), 0.1, 0.9),
    "wide boxes (clipped)": PriorSpec((5, 3, 1), (0.6, 0.9, 1.2), ((3.0, 0.2),) * 3),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mirror_permutation_is_exact_and_an_involution(name: str) -> None:
    spec = LAYOUTS[name]
    perm = mirror_permutation(spec)
    priors = spec.priors()
    assert perm.shape == (spec.num_priors,) and sorted(perm.tolist()) == list(range(spec.num_priors))
    assert torch.equal(perm[perm], torch.arange(spec.num_priors))  # mirroring twice is the identity
    assert not torch.equal(perm, torch.arange(spec.num_priors))
    assert mirror_error(priors, perm) < 1e-6  # prior perm[p] is prior p with cx -> 1 - cx, same w, h
    assert mirror_error(priors, torch.arange(spec.num_priors)) > 0.1  # the check is not vacuous


def test_mirror_permutation_of_built_models() -> None:
    from maskssd.ssd.models import build_model

    for name, kw in (("tiny", {}), ("tiny", {"neck": "fpn", "stride4": True, "input_size": 100})):
        model = build_model(name, num_classes=4, **kw)
        assert mirror_error(model.priors_cxcy, mirror_permutation(model.prior_spec)) < 1e-6


def test_flipping_predictions_twice_is_the_identity() -> None:
    spec = LAYOUTS["ssdlite 320"]
    perm = mirror_permutation(spec)
    g = torch.Generator().manual_seed(0)
    locs, scores = (
        torch.randn(2, spec.num_priors, 4, generator=g),
        torch.randn(2, spec.num_priors, 4, generator=g),
    )
    once = hflip_predictions(locs, scores, perm)
    assert not torch.equal(once[0], locs)
    twice = hflip_predictions(*once, perm)
    assert torch.equal(twice[0], locs) and torch.equal(twice[1], scores)
    merged_locs, merged_scores = merge_hflip(locs, scores, locs, scores, perm)
    assert merged_locs.shape == (2, 2 * spec.num_priors, 4) and torch.equal(
        merged_locs[:, : spec.num_priors], locs
    )
    assert torch.equal(merged_scores[:, spec.num_priors :], once[1])
    assert torch.equal(tta_priors(spec.priors())[spec.num_priors :], spec.priors())


class MirrorEquivariantModel(nn.Module):
    """Predictions read from the image at each prior's centre (bilinear samples): the prediction at prior p of the
    mirrored image is the prediction at prior p' of the image, its x offset negated."""

    input_size = 64

    def __init__(self, spec: PriorSpec):
        super().__init__()
        self.prior_spec = spec
        self.register_buffer("priors_cxcy", spec.priors())

    def sample(self, x: torch.Tensor, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
        c = self.priors_cxcy[:, :2] + torch.tensor([dx, dy])
        grid = (2 * c - 1).view(1, 1, -1, 2).expand(x.shape[0], 1, -1, 2)
        return F.grid_sample(x, grid, align_corners=False).squeeze(2).transpose(1, 2)  # (N, P, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centre = self.sample(x)
        d = 0.03
        locs = torch.stack(
            [
                (self.sample(x, d)[..., 0] - self.sample(x, -d)[..., 0]) * 5,  # odd under a mirror
                (self.sample(x, 0, d)[..., 1] - self.sample(x, 0, -d)[..., 1]) * 5,
                centre[..., 2] - 0.5,
                centre[..., 0] - 0.5,
            ],
            -1,
        )
        scores = torch.cat([torch.full_like(centre[..., :1], 1.0), 4 * centre], -1)
        return locs, scores


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_tta_of_a_mirror_equivariant_model_gives_the_same_boxes(class_agnostic: bool) -> None:
    """Each merged prediction then appears twice (once from each image); NMS keeps one of each pair."""
    spec = PriorSpec.linear(ssdlite_feature_maps(64, 4), 0.15, 0.9)
    model = MirrorEquivariantModel(spec).eval()
    decode = DecodeSpec(min_score=0.3, max_overlap=0.45, top_k=200, class_agnostic=class_agnostic)
    plain = Predictor(model, CLASSES, 64, model.priors_cxcy, decode)
    tta = Predictor(model, CLASSES, 64, model.priors_cxcy, decode, tta_hflip=True)
    assert tta.prior_spec is spec
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (48, 80, 3), dtype=np.uint8),
        rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
    ]
    for a, b in zip(plain.predict(images), tta.predict(images), strict=True):
        assert 3 <= len(a) == len(b)
        order_a, order_b = a.scores.argsort(), b.scores.argsort()
        torch.testing.assert_close(a.scores[order_a], b.scores[order_b], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.boxes[order_a], b.boxes[order_b], atol=1e-3, rtol=0)
        assert torch.equal(a.labels[order_a], b.labels[order_b])


def test_tta_with_class_agnostic_nms_keeps_one_box_per_face(tiny_checkpoint: Path) -> None:
    """The merged sets (image + mirror) go through one NMS: class-agnostic NMS still leaves no two boxes of
    any classes overlapping, class-wise NMS none of one class."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(2)]
    for agnostic in (True, False):
        decode = DecodeSpec(min_score=0.2, max_overlap=0.45, class_agnostic=agnostic)
        pred = Predictor.from_checkpoint(tiny_checkpoint, decode=decode, tta_hflip=True)
        assert pred.describe()["tta_hflip"]
        for d in pred.predict(images):
            assert len(d) > 0
            iou = box_iou(d.boxes, d.boxes).fill_diagonal_(0)
            if not agnostic:
                iou = iou * (d.labels[:, None] == d.labels[None, :])
            assert float(iou.max()) <= 0.45 + 1e-6
            assert float(d.boxes[:, 2].max()) <= 320 + 1e-3 and float(d.boxes[:, 3].max()) <= 240 + 1e-3


class _Spy(nn.Module):
    """Records the batches the engine feeds the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []
        self.priors_cxcy, self.prior_spec = model.priors_cxcy, model.prior_spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.clone())
        return self.model(x)


def _image_dependent(model: nn.Module) -> nn.Module:
    """Weights large enough for predictions that depend on the image (random init predicts background)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model.eval()


def test_engine_evaluate_honours_tta_hflip(synth_root: Path) -> None:
    from types import SimpleNamespace

    from maskssd.data import FaceMaskDataset, load_split
    from maskssd.data.transforms import eval_transform
    from maskssd.ssd.models import build_model
    from maskssd.training.build import build_loader
    from maskssd.training.predict import evaluate

    model = _Spy(_image_dependent(build_model("tiny", num_classes=4, input_size=64)))
    anns = load_split(synth_root, "val", "default", CLASSES)[:4]
    loader = build_loader(FaceMaskDataset(anns, eval_transform(64), CLASSES), 2)
    loss_inputs = []

    def loss_fn(locs: torch.Tensor, scores: torch.Tensor, *_: object) -> SimpleNamespace:
        loss_inputs.append(locs.shape)
        zero = torch.zeros(())
        return SimpleNamespace(total=zero, conf=zero, loc=zero)

    kw = {"class_names": CLASSES, "device": torch.device("cpu"), "loss_fn": loss_fn, "coco": False}
    _, plain = evaluate(model, loader, **kw)
    assert all(x.shape[0] == 2 for x in model.seen)
    model.seen.clear()
    loss_inputs.clear()
    metrics, result = evaluate(model, loader, tta_hflip=True, channels_last=True, **kw)
    assert result is not None and plain is not None and 0.0 <= metrics["val_map"] <= 1.0
    assert len(model.seen) == 4  # two calls per batch: the images, then their mirrors
    for plain_x, mirrored_x in zip(model.seen[::2], model.seen[1::2]):
        assert plain_x.shape[0] == 2 and torch.equal(mirrored_x, plain_x.flip(-1))
    p = model.prior_spec.num_priors
    assert loss_inputs == [torch.Size([2, p, 4])] * 2  # the loss sees the plain images' predictions only
    plain_set, tta_set = plain.matched.evalset, result.matched.evalset
    assert tta_set.image_ids == plain_set.image_ids
    assert sum(len(d) for d in plain_set.detections) > 0
    changed = [
        len(a) != len(b) or not torch.allclose(a.scores, b.scores)
        for a, b in zip(plain_set.detections, tta_set.detections)
    ]
    assert all(changed)


def test_config_key_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's per-epoch evaluation reads ``eval.tta_hflip`` from the config it holds."""
    from maskssd.training import engine
    from maskssd.training.config import load_config

    root = Path(__file__).resolve().parents[1]
    seen = []
    monkeypatch.setattr(engine, "evaluate", lambda *a, **kw: (seen.append(kw["tta_hflip"]), ({}, None))[1])
    for flag in ("false", "true"):
        cfg = load_config(root / "experiments" / "quickstart.toml", [f"eval.tta_hflip={flag}"])
        trainer = engine.Trainer.__new__(engine.Trainer)
        trainer.cfg, trainer.train_cfg, trainer.decode = cfg, cfg.train, None
        trainer.model, trainer.ema, trainer.val_loader, trainer.loss_fn = None, None, None, None
        trainer.device = torch.device("cpu")
        trainer._evaluate(1)
    assert seen == [False, True]


def test_hflip_forward_runs_the_images_and_their_mirrors() -> None:
    spec = PriorSpec.linear(ssdlite_feature_maps(64, 4), 0.15, 0.9)
    model = MirrorEquivariantModel(spec)
    x = torch.rand(3, 3, 64, 64)
    (locs, scores), (mlocs, mscores) = hflip_forward(model, x, mirror_permutation(spec))
    ref_locs, ref_scores = model(x)
    torch.testing.assert_close(locs, ref_locs)
    # equivariant model: the mirrored half mapped back equals the plain half
    torch.testing.assert_close(mlocs[:, spec.num_priors :], ref_locs, atol=1e-4, rtol=0)
    torch.testing.assert_close(mscores[:, spec.num_priors :], ref_scores, atol=1e-5, rtol=0)


def test_evaluate_cli_with_tta_and_class_agnostic(
    tiny_checkpoint: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from maskssd.cli import main

    dets = tmp_path / "dets.json"
    args = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(synth_root), "--split-name", "default"]
    args += ["--tta-hflip", "--class-agnostic", "--save-detections", str(dets)]
    assert main(args) == 0
    assert "mean" in capsys.readouterr().out
    saved = json.loads(dets.read_text())
    assert saved["settings"]["tta_hflip"] is True and saved["settings"]["class_agnostic"] is True
