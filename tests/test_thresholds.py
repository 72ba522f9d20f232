"""Per-class operating thresholds: F1-maximising cuts on validation (hand-computed cases), stored with the
model (``evaluate --fit-thresholds --out``), and applied by default by the predictor, ``detect`` and ``serve``
unless a score threshold is given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskssd.cli import main
from maskssd.deploy.predictor import Predictor
from maskssd.errors import MaskSSDError
from maskssd.evaluation.records import EvalSet
from maskssd.evaluation.thresholds import fit_f1_thresholds, thresholds_of
from maskssd.evaluation.voc import match
from maskssd.ssd.checkpoint import load, with_thresholds
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD
from maskssd.ssd.postprocess import Detections

CLASSES = ["with_mask", "without_mask", "mask_weared_incorrect"]


def _box(x: float) -> list[float]:
    return [x, 0.0, x + 10.0, 10.0]


def test_f1_threshold_by_hand():
    """with_mask: objects A, B, C and a difficult D; detections .9 on A (TP), .8 on nothing (FP), .7 on B (TP),
    .6 on D (ignored), .3 on nothing (FP), .2 on A again (duplicate, FP). F1 = 2 TP / (kept + 3) after each
    counted detection: .5, .4, .667, .571, .5 -> the cut at .7. without_mask: one object, one detection beside
    it (no true positive: no threshold). mask_weared_incorrect: no objects."""
    det_boxes = [torch.tensor([_box(0), _box(100), _box(20), _box(60), _box(200), _box(0), _box(300)])]
    det_labels = [torch.tensor([1, 1, 1, 1, 1, 1, 2])]
    det_scores = [torch.tensor([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.5])]
    gt_boxes = [torch.tensor([_box(0), _box(20), _box(40), _box(60), _box(400)])]
    gt_labels = [torch.tensor([1, 1, 1, 1, 2])]
    gt_difficult = [torch.tensor([False, False, False, True, False])]
    data = (det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult)
    fits = fit_f1_thresholds(match(EvalSet.from_lists(*data, CLASSES)))
    assert set(fits) == {"with_mask"}
    f = fits["with_mask"]
    assert f.threshold == pytest.approx(0.7) and f.f1 == pytest.approx(2 / 3)
    assert (f.precision, f.recall, f.n_gt, f.n_detections) == (
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
        3,
        3,
    )
    assert thresholds_of(fits) == {"with_mask": f.threshold}


def test_equal_scores_are_kept_or_dropped_together():
    """.9 on the object and .9 beside it: cutting between them (F1 1.0) is not a threshold; both kept (F1 2/3)."""
    evalset = EvalSet.from_lists(
        [torch.tensor([_box(0), _box(100), _box(200)])],
        [torch.tensor([1, 1, 1])],
        [torch.tensor([0.9, 0.9, 0.8])],
        [torch.tensor([_box(0)])],
        [torch.tensor([1])],
        None,
        CLASSES,
    )
    fits = fit_f1_thresholds(match(evalset))
    assert fits["with_mask"].threshold == pytest.approx(0.9) and fits["with_mask"].f1 == pytest.approx(2 / 3)


def test_detections_above_per_class_thresholds():
    d = Detections(torch.zeros(4, 4), torch.tensor([1, 2, 3, 1]), torch.tensor([0.5, 0.5, 0.5, 0.3]))
    kept = d.above(torch.tensor([0.4, 0.6, 0.5]))
    assert kept.labels.tolist() == [1, 3] and kept.scores.tolist() == [0.5, 0.5]
    assert d.above(0.45).labels.tolist() == [1, 2, 3]


@pytest.fixture()
def thresholded(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny model, whose with_mask and mask_weared_incorrect scores are near 1 everywhere, with with_mask's
    threshold above any score and mask_weared_incorrect's at 0."""
    return with_thresholds(
        tiny_checkpoint, {"with_mask": 1.01, "mask_weared_incorrect": 0.0}, tmp_path / "t.pt"
    )


def test_predictor_applies_the_models_thresholds_unless_told_otherwise(thresholded: Path):
    pred = Predictor.from_checkpoint(thresholded)
    assert pred.thresholds == {"with_mask": 1.01, "mask_weared_incorrect": 0.0}
    assert pred.display_threshold().tolist() == pytest.approx([1.01, DISPLAY_THRESHOLD, 0.0])
    dets = pred.predict([np.full((120, 160, 3), 90, np.uint8)])[0]
    names = lambda d: {CLASSES[i - 1] for i in d.labels.tolist()}  # noqa: E731
    assert {"with_mask", "mask_weared_incorrect"} <= names(dets)
    assert names(pred.shown(dets)) == {"mask_weared_incorrect"}
    assert {"with_mask", "mask_weared_incorrect"} <= names(pred.shown(dets, 0.0))
    assert pred.threshold_doc() == {
        "with_mask": 1.01,
        "without_mask": DISPLAY_THRESHOLD,
        "mask_weared_incorrect": 0.0,
    }


def test_with_thresholds_refuses_unknown_classes(tiny_checkpoint: Path, tmp_path: Path):
    with pytest.raises(MaskSSDError, match="no_such_class"):
        with_thresholds(tiny_checkpoint, {"no_such_class": 0.5}, tmp_path / "x.pt")
    assert Predictor.from_checkpoint(tiny_checkpoint).display_threshold() == DISPLAY_THRESHOLD


def test_detect_uses_the_models_thresholds_by_default(thresholded: Path, tmp_path: Path):
    img = tmp_path / "photo.png"
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(img)
    assert (
        main(["detect", "--model", str(thresholded), "--source", str(img), "--out", str(tmp_path / "a")]) == 0
    )
    doc = json.loads((tmp_path / "a" / "detections.json").read_text())
    assert doc["score_threshold"]["with_mask"] == 1.01
    assert {d["label"] for d in doc["images"][0]["detections"]} == {"mask_weared_incorrect"}
    argv = ["detect", "--model", str(thresholded), "--source", str(img), "--out", str(tmp_path / "b")]
    assert main([*argv, "--score-threshold", "0"]) == 0
    doc = json.loads((tmp_path / "b" / "detections.json").read_text())
    assert doc["score_threshold"] == 0.0
    assert {"with_mask", "mask_weared_incorrect"} <= {d["label"] for d in doc["images"][0]["detections"]}


def test_serve_uses_the_models_thresholds_by_default(thresholded: Path):
    pytest.importorskip("fastapi", reason="serving is the [serve] extra")
    pytest.importorskip("httpx", reason="the test client needs httpx ([serve] extra)")
    import io

    from fastapi.testclient import TestClient

    from maskssd.deploy.serving import create_app

    buf = io.BytesIO()
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(buf, format="JPEG")
    with TestClient(create_app(Predictor.from_checkpoint(thresholded), batching=False)) as client:
        shown = client.post("/detect", content=buf.getvalue()).json()["detections"]
        everything = client.post("/detect", content=buf.getvalue(), params={"score_threshold": 0}).json()
        health = client.get("/health").json()
    assert {d["label"] for d in shown} == {"mask_weared_incorrect"}
    assert {"with_mask", "mask_weared_incorrect"} <= {d["label"] for d in everything["detections"]}
    assert health["model"]["thresholds"]["with_mask"] == 1.01


def test_evaluate_fits_thresholds_on_val_and_writes_the_model(tiny_checkpoint, synth_root, tmp_path, capsys):
    out = tmp_path / "fitted.pt"
    base = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(synth_root), "--split-name", "default"]
    assert main([*base, "--fit-thresholds", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout is the JSON document alone
    assert set(doc["classes"]) == set(CLASSES) and doc["split"] == "val" and doc["images"] > 0
    assert 0.0 <= doc["map"] <= 1.0 and doc["thresholds"]["out"] == str(out)
    fits = doc["thresholds"]["fits"]
    assert load(out)["thresholds"] == {c: f["threshold"] for c, f in fits.items()}
    for f in fits.values():
        assert 0 < f["f1"] <= 1 and 0 < f["threshold"] <= 1
    assert Predictor.from_checkpoint(out).thresholds == load(out)["thresholds"]
    # thresholds are fitted on validation only, and --out needs them
    assert main([*base, "--split", "test", "--fit-thresholds"]) == 2
    assert "validation split" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x.pt")]) == 2
    assert "--fit-thresholds" in capsys.readouterr().err


class _SpreadModel(torch.nn.Module):
    """Fixed random logits and offsets for every prior (shifted by each image's mean): thousands of
    candidates above the AP protocol's 0.01, more than the top-k keeps."""

    def __init__(self, priors: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.locs = torch.randn(1, priors, 4, generator=g) * 0.5
        self.logits = torch.randn(1, priors, 4, generator=g) * 2.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = x.mean((1, 2, 3)).view(-1, 1, 1)
        return self.locs + shift, self.logits * (1.0 + shift)


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_detect_decodes_from_the_threshold_and_keeps_what_a_full_decode_shows(
    tiny_checkpoint: Path, cpu_kernels: bool, monkeypatch: pytest.MonkeyPatch
):
    from maskssd.ssd import kernels

    monkeypatch.setattr(kernels, "ENABLED", cpu_kernels)
    pred = Predictor.from_checkpoint(tiny_checkpoint, backend="torch")
    pred.model = _SpreadModel(pred.priors_cxcy.shape[0])
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    full = pred.predict(frames)
    scores = torch.cat([d.scores for d in full])
    ranked = scores.sort().values
    edge = float(ranked[len(ranked) // 2])  # a threshold equal to a score: it is shown
    labels = torch.cat([d.labels for d in full])
    per_class = {c: float(scores[labels == i + 1].median()) for i, c in enumerate(CLASSES)}
    cases = [(float(ranked[len(ranked) // 4]) + 1e-4, {}), (edge, {}), (None, per_class)]
    for threshold, per_class in cases:
        pred.thresholds = per_class
        want = [pred.shown(d, threshold) for d in full]
        assert 0 < sum(len(d) for d in want) < len(scores)  # the threshold splits the detections
        got = pred.detect(frames, threshold)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.scores, w.scores) and torch.equal(g.labels, w.labels)
            assert torch.equal(g.boxes, w.boxes)
    pred.thresholds = {}
    assert min(float(d.scores.min()) for d in pred.detect(frames, edge) if len(d)) == edge
