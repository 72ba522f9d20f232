"""Default boxes fitted to a split's boxes: the fit, the matcher's recall, model layouts and ``maskssd data anchors``."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from maskssd.data import load_split
from maskssd.ssd.anchors import (
    evaluate_priors,
    fit_anchors,
    fit_aspect_ratios,
    layout_of_model,
    normalized_boxes,
    prior_spec,
    ssdlite_feature_maps,
)
from maskssd.ssd.models import build_model
from maskssd.ssd.priors import box_iou, cxcywh_to_xyxy
from maskssd.training.config import ModelSection
from tests.conftest import write_tiny_experiment

SIZE = 128
MAPS = ssdlite_feature_maps(SIZE, 5)  # the tiny model's layout at 128 px: 16, 8, 4, 2, 1


@pytest.fixture(scope="module")
def synth_boxes(synth_root: Path) -> np.ndarray:
    return normalized_boxes(load_split(synth_root, "train", "default"))


def test_feature_maps_are_the_models():
    assert MAPS == build_model("tiny", input_size=SIZE).prior_spec.feature_maps
    neck4 = build_model("tiny", input_size=100, neck="fpn", neck_channels=8, stride4=True)
    assert ssdlite_feature_maps(100, 6, min_stride=4) == neck4.prior_spec.feature_maps
    assert ssdlite_feature_maps(384, 6) == (48, 24, 12, 6, 3, 2)


def test_normalized_boxes_are_in_the_square_input(synth_root: Path):
    anns = load_split(synth_root, "train", "default")
    boxes = normalized_boxes(anns)
    assert boxes.shape == (sum(a.num_objects for a in anns), 4)
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    a = anns[0]
    np.testing.assert_allclose(boxes[0], a.boxes[0] / [a.width, a.height, a.width, a.height], rtol=1e-6)


def test_fit_returns_increasing_scales_and_k_ratios(synth_boxes: np.ndarray):
    for k in (1, 3):
        fit = fit_anchors(synth_boxes, MAPS, SIZE, num_ratios=k)
        assert len(fit.scales) == len(MAPS) and len(fit.aspect_ratios) == k
        assert all(b > a for a, b in zip(fit.scales, fit.scales[1:])), fit.scales
        assert 0 < fit.scales[0] and fit.scales[-1] <= 0.95
        assert all(r > 0 and r != 1 for r in fit.aspect_ratios)
        assert fit.num_boxes == len(synth_boxes) and len(fit.stats.level_share) == len(MAPS)
        assert math.isclose(sum(fit.stats.level_share), 1.0, rel_tol=1e-6)
        assert fit.stats.recall >= fit.quantile_stats.recall  # the search starts from the quantiles


def test_fitted_priors_beat_bad_priors(synth_boxes: np.ndarray):
    fit = fit_anchors(synth_boxes, MAPS, SIZE, num_ratios=2)
    too_big = evaluate_priors(synth_boxes, prior_spec(MAPS, (0.6, 0.7, 0.8, 0.9, 0.95), (3.0, 4.0)), SIZE)
    too_small = evaluate_priors(
        synth_boxes, prior_spec(MAPS, (0.01, 0.012, 0.014, 0.016, 0.018), (0.2, 5.0)), SIZE
    )
    assert fit.stats.recall >= too_big.recall and fit.stats.recall >= too_small.recall
    assert fit.stats.recall > 0.5 and fit.stats.mean_best_iou > max(
        too_big.mean_best_iou, too_small.mean_best_iou
    )
    # what the fit reports is what its spec gives
    again = evaluate_priors(synth_boxes, fit.spec(), SIZE)
    assert again.recall == pytest.approx(fit.stats.recall) and again.level_share == pytest.approx(
        fit.stats.level_share
    )


def test_recall_is_the_matchers_best_prior_iou(synth_boxes: np.ndarray):
    """Level-by-level evaluation equals the best IoU over the model's whole prior set."""
    model = build_model("tiny", input_size=SIZE, scales=[0.1, 0.2, 0.35, 0.5, 0.8], aspect_ratios=[0.6, 1.5])
    stats = evaluate_priors(synth_boxes, model.prior_spec, SIZE)
    best = box_iou(torch.as_tensor(synth_boxes), cxcywh_to_xyxy(model.priors_cxcy)).amax(1)
    assert stats.recall == pytest.approx(float((best >= 0.5).float().mean()))
    assert stats.mean_best_iou == pytest.approx(float(best.mean()), rel=1e-5)


def test_aspect_ratio_clusters():
    """Boxes in three shape clusters (w/h 0.5, 1, 2): two ratios besides the fixed square find 0.5 and 2."""
    rng = np.random.default_rng(0)
    ratios = np.repeat([0.5, 1.0, 2.0], 100) * np.exp(rng.normal(0, 0.03, 300))
    area = rng.uniform(0.01, 0.04, 300)
    w, h = np.sqrt(area * ratios), np.sqrt(area / ratios)
    boxes = np.stack([0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2], 1).astype(np.float32)
    assert sorted(fit_aspect_ratios(boxes, 2)) == pytest.approx([0.5, 2.0], rel=0.03)


def test_layout_of_a_config_model_builds_no_weights(tmp_path: Path, synth_root: Path):
    from maskssd.training.config import load_config

    path = write_tiny_experiment(tmp_path / "t.toml", synth_root)

    def layout(overrides=()):
        cfg = load_config(path, overrides)
        return layout_of_model(cfg.model.name, cfg.model.build_kwargs(), len(cfg.class_names) + 1, str(path))

    plain = layout()
    assert plain.input_size == 96 and plain.feature_maps == ssdlite_feature_maps(96, 5)
    assert plain.current is not None and len(plain.current.scales) == 5
    s4 = layout(["model.neck=pan", "model.stride4=true", "model.neck_channels=8"])
    assert s4.feature_maps == ssdlite_feature_maps(96, 6, min_stride=4)


def test_anchors_cli_writes_a_config_snippet(
    tmp_path: Path, synth_root: Path, capsys: pytest.CaptureFixture[str]
):
    from maskssd.cli import main

    out = tmp_path / "sub" / "anchors.toml"
    assert (
        main(
            [
                "data",
                "anchors",
                str(synth_root),
                "--split-name",
                "default",
                "--input-size",
                str(SIZE),
                "--levels",
                "5",
                "--ratios",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    snippet = tomllib.loads(out.read_text())
    assert set(snippet) == {"scales", "aspect_ratios"}
    assert len(snippet["scales"]) == 5 and len(snippet["aspect_ratios"]) == 2
    section = ModelSection(name="tiny", input_size=SIZE, **snippet)  # valid [model] values as they are
    model = build_model("tiny", **section.build_kwargs())
    assert model.prior_spec.scales == tuple(snippet["scales"])
    printed = capsys.readouterr().out
    assert "matcher recall" in printed and "scales = [" in printed

    cfg = write_tiny_experiment(tmp_path / "t.toml", synth_root)
    assert main(["data", "anchors", str(synth_root), "--split-name", "default", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "current" in printed and "fitted" in printed
    # a config and --levels contradict each other: a clear error, exit status 2
    assert (
        main(
            [
                "data",
                "anchors",
                str(synth_root),
                "--split-name",
                "default",
                "--config",
                str(cfg),
                "--levels",
                "4",
            ]
        )
        == 2
    )
