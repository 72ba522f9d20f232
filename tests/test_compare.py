"""Uncertainty end to end against a real MLflow SQL store: a run logs bootstrap intervals, its detections and its
error analysis; a saved file re-scores to the printed numbers; ``maskssd compare`` runs the paired bootstrap of
two tiny runs; ``maskssd runs`` shows the intervals; ``maskssd evaluate --bootstrap`` prints them."""

from __future__ import annotations

import json
import os

import pytest

from maskssd import tracking
from maskssd.cli import main
from maskssd.data import load_split
from maskssd.evaluation.detections_file import load_detections, score_detections
from maskssd.tracking.experiment import run_experiment
from maskssd.training.config import load_config
from tests.conftest import write_tiny_experiment

pytestmark = pytest.mark.slow


#: Light augmentation and a higher rate: the tiny model finds faces on the easy set within ten epochs (~5 s).
QUICK = [
    "schedule.warmup_epochs=0",
    "augment.iou_crop_p=0.0",
    "augment.zoom_out_p=0.0",
    "augment.photometric_p=0.0",
    "optim.lr=0.01",
    "eval.worst_images=3",
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, easy_synth_root):
    """Two finished tiny runs on the same data: A (10 epochs, val mAP > 0) and B (2 epochs), no logged models:
    ``(tmp dir, tracking URI, B's config, [A's run id, B's], [A's RunResult, B's])``."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    old = os.getcwd()
    os.chdir(tmp)
    try:
        ids, results = [], []
        for epochs, n in ((10, 300), (2, 1000)):
            path = write_tiny_experiment(tmp / f"e{epochs}.toml", easy_synth_root, name="cmp", epochs=epochs)
            cfg = load_config(path, [*QUICK, f"eval.bootstrap={n}"])
            results.append(run_experiment(cfg, tracking_uri=uri, log_model=False))
            ids.append(results[-1].run_id)
    finally:
        os.chdir(old)
    return tmp, uri, cfg, ids, results


def test_run_logs_intervals_detections_and_error_analysis(two_runs):
    tmp, uri, cfg, (a, _), _results = two_runs
    c = tracking.client(uri)
    m = c.get_run(a).data.metrics
    assert m["val_map"] > 0 and m["val_map_ci_high"] > m["val_map_ci_low"]
    for split in ("val", "test"):
        assert m[f"{split}_map_ci_low"] <= m[f"{split}_map_ci_high"]
        for cls in cfg.class_names:
            if f"{split}_ap_{cls}_ci_low" in m:
                assert m[f"{split}_ap_{cls}_ci_low"] <= m[f"{split}_ap_{cls}_ci_high"]
        assert 0.0 <= m[f"{split}_recall_op"] <= 1.0
        assert any(k.startswith(f"{split}_map_size_") for k in m)
    arts = {x.path for d in ("detections", "analysis", "errors") for x in c.list_artifacts(a, d)}
    assert {"detections/val.json", "detections/test.json", "analysis/val.json", "analysis/test.json"} <= arts
    assert 1 <= len([p for p in arts if p.startswith("errors/") and p.endswith(".png")]) <= 3


def test_saved_detections_rescore_to_the_logged_numbers(two_runs, tmp_path):
    tmp, uri, cfg, (a, _), _results = two_runs
    c = tracking.client(uri)
    m = c.get_run(a).data.metrics
    for split, prefix in (("val", "val"), ("test", "test")):
        doc = load_detections(
            tracking.runs.MlflowRun(c, a).download(f"detections/{split}.json", tmp_path / split)
        )
        assert doc["data"]["split"] == split and doc["bootstrap"]["n"] == 300
        anns = load_split(doc["data"]["root"], split, doc["data"]["split_name"], doc["classes"])
        r = score_detections(doc, anns)
        assert abs(r.map - m[f"{prefix}_map"]) < 1e-9
        for cls in cfg.class_names:
            if f"{prefix}_ap_{cls}" in m:
                assert abs(r.ap[cls] - m[f"{prefix}_ap_{cls}"]) < 1e-9
        assert doc["bootstrap"]["map"][1:] == [m[f"{prefix}_map_ci_low"], m[f"{prefix}_map_ci_high"]]


def test_compare_two_runs(two_runs, capsys):
    tmp, uri, cfg, (a, b), _results = two_runs
    ma, mb = (tracking.client(uri).get_run(r).data.metrics for r in (a, b))
    assert main(["compare", a, b, "--split", "val", "--n", "300", "--tracking-uri", uri]) == 0
    text = capsys.readouterr().out
    assert "P(A > B)" in text and "mAP" in text
    assert f"{100 * (ma['val_map'] - mb['val_map']):+.1f} [" in text
    args = ["compare", a, b, "--split", "test", "--n", "300", "--seed", "2", "--json", "--tracking-uri", uri]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    got = doc["metrics"]["map"]
    assert doc["a"] == [a] and doc["b"] == [b] and doc["split"] == "test" and doc["n"] == 300
    assert got["a"] == pytest.approx(ma["test_map"], abs=1e-9) and got["b"] == pytest.approx(
        mb["test_map"], abs=1e-9
    )
    assert got["diff"] == pytest.approx(ma["test_map"] - mb["test_map"], abs=1e-9)
    # ten epochs against two: A is better, and on most resamples of the test images
    assert got["diff"] > 0 and got["low"] <= got["diff"] <= got["high"] and got["a_wins"] > 0.5
    # a run against itself: exactly no difference
    assert main(["compare", a, a, "--n", "100", "--json", "--tracking-uri", uri]) == 0
    same = json.loads(capsys.readouterr().out)["metrics"]["map"]
    assert [same["diff"], same["low"], same["high"], same["ties"]] == [0.0, 0.0, 0.0, 1.0]


def test_compare_refuses_other_images_and_missing_detections(two_runs, tmp_path, capsys):
    tmp, uri, cfg, (a, b), _results = two_runs
    c = tracking.client(uri)
    path = tracking.runs.MlflowRun(c, a).download("detections/val.json", tmp_path)
    doc = json.loads(path.read_text())
    doc["images"] = doc["images"][1:]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(doc))
    assert main(["compare", str(fewer), b, "--tracking-uri", uri]) == 2
    assert "not on the same images" in capsys.readouterr().err
    empty = c.create_run(c.get_run(a).info.experiment_id).info.run_id
    assert main(["compare", a, empty, "--tracking-uri", uri]) == 2
    assert "no saved detections for split 'val'" in capsys.readouterr().err
    assert main(["compare", a, "no-such-run", "--tracking-uri", uri]) == 2
    assert "neither a detections file nor an MLflow run" in capsys.readouterr().err


def test_runs_table_shows_intervals(two_runs, capsys, monkeypatch):
    from maskssd.cli import commands

    monkeypatch.setattr(commands.out, "width", 400)  # every column at full width
    tmp, uri, cfg, (a, _), _results = two_runs
    m = tracking.client(uri).get_run(a).data.metrics
    assert main(["runs", "--experiment", "cmp", "--tracking-uri", uri]) == 0
    text = capsys.readouterr().out
    cell = f"{100 * m['val_map']:.1f} [{100 * m['val_map_ci_low']:.1f}, {100 * m['val_map_ci_high']:.1f}]"
    assert cell in text


def test_evaluate_prints_intervals_and_the_file_rescores_exactly(two_runs, tmp_path, capsys, monkeypatch):
    """``maskssd evaluate`` of run A's selected checkpoint: its numbers, intervals, error tables; the file it
    saves re-scores to the printed numbers."""
    from maskssd.cli import commands
    from maskssd.ssd.checkpoint import atomic_save, load
    from maskssd.training.build import deploy_checkpoint

    monkeypatch.setattr(commands.out, "width", 300)

    tmp, uri, cfg, (a, _), _results = two_runs
    model = atomic_save(
        deploy_checkpoint(load(tmp / "mlruns" / "checkpoints" / a / "best.pt"), cfg), tmp_path / "m.pt"
    )
    out = tmp_path / "dets.json"
    root = cfg.data.root
    args = ["evaluate", "--model", str(model), "--data", root, "--split", "val", "--split-name", "default"]
    assert main([*args, "--bootstrap", "200", "--seed", "1", "--save-detections", str(out)]) == 0
    text = capsys.readouterr().out
    doc = load_detections(out)
    assert doc["metrics"]["map"] == pytest.approx(tracking.client(uri).get_run(a).data.metrics["val_map"])
    assert doc["metrics"]["map"] > 0
    lo, hi = doc["bootstrap"]["map"][1:]
    assert lo < hi and f"{100 * doc['metrics']['map']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in text
    assert "by face size" in text and "confusion matrix" in text and "operating threshold" in text
    r = score_detections(doc, load_split(root, "val", "default", doc["classes"]))
    assert abs(r.map - doc["metrics"]["map"]) < 1e-9 and abs(r.map_voc12 - doc["metrics"]["map_voc12"]) < 1e-9
    assert all(
        abs(r.ap[c] - doc["metrics"]["ap"][c]) < 1e-9 for c in doc["classes"] if doc["metrics"]["n_gt"][c]
    )
    assert r.n_gt == doc["metrics"]["n_gt"]


def test_train_table_shows_intervals(two_runs, capsys, monkeypatch):
    from maskssd.cli import commands

    monkeypatch.setattr(commands.out, "width", 300)
    ev = two_runs[4][0].evaluation  # the RunResult `maskssd train` prints from
    commands.out.print(commands.ap_table(ev))
    text = capsys.readouterr().out
    boot = ev.reports["test"].bootstrap
    assert "test AP [95% CI]" in text
    assert f"{100 * ev.final.map:.1f} [{100 * boot.map.low:.1f}, {100 * boot.map.high:.1f}]" in text


def _fold_doc(fold: int, ids: list[str], digest: str | None = "abc", seed: int | None = 0) -> dict:
    data = {"root": "r", "split_name": "s", "split": "val", "fold": fold, "folds": 3, "folds_hash": digest}
    return {
        "format": 2,
        "classes": ["a", "b"],
        "images": [{"id": i, "width": 4, "height": 4, "detections": []} for i in ids],
        "data": {**data, "seed": seed},
        "path": f"f{fold}.json",
    }


def test_fold_files_join_per_seed_and_refuse_what_does_not_belong_together():
    from maskssd.errors import MaskSSDError
    from maskssd.evaluation.detections_file import merge_folds

    plain = {"classes": ["a", "b"], "images": [], "path": "p.json"}
    joined = merge_folds([_fold_doc(3, ["z"]), plain, _fold_doc(1, ["x", "y"]), _fold_doc(1, ["x"], seed=1)])
    assert joined[0] == plain  # not a fold file: as it was
    by_seed = {d["data"]["seed"]: d for d in joined[1:]}
    assert [im["id"] for im in by_seed[0]["images"]] == ["x", "y", "z"]  # in fold order
    assert by_seed[0]["data"]["folds_present"] == [1, 3] and by_seed[1]["data"]["folds_present"] == [1]
    assert "fold" not in by_seed[0]["data"] and by_seed[0]["data"]["splits"] == ["train", "val"]
    with pytest.raises(MaskSSDError, match="different folds"):
        merge_folds([_fold_doc(1, ["x"]), _fold_doc(2, ["y"], digest="other")])
    with pytest.raises(MaskSSDError, match="older"):
        merge_folds([_fold_doc(1, ["x"], digest=None)])
    with pytest.raises(MaskSSDError, match="fold 2 given twice"):
        merge_folds([_fold_doc(2, ["x"]), _fold_doc(2, ["y"])])


def test_compressed_detections_file_reads_back_and_is_reproducible(tmp_path):
    from maskssd.evaluation.detections_file import write_doc

    doc = _fold_doc(1, ["x", "y"])
    a, b = write_doc(tmp_path / "a.json.gz", doc), write_doc(tmp_path / "b.json.gz", doc)
    assert (
        a.read_bytes()[:2] == b"\x1f\x8b" and a.read_bytes() == b.read_bytes()
    )  # no time in the gzip header
    back = load_detections(a)
    assert back["images"] == doc["images"] and back["data"] == doc["data"] and back["path"] == str(a)
    (tmp_path / "bad.json.gz").write_bytes(a.read_bytes()[:20])  # cut short
    from maskssd.errors import MaskSSDError

    with pytest.raises(MaskSSDError, match="not a readable detections file"):
        load_detections(tmp_path / "bad.json.gz")


def test_a_model_s_float32_numbers_are_written_shortest_and_read_back_exactly(tmp_path):
    """Format 3: each float32 as its shortest decimal (about half the bytes), read back through float32, so
    the very values the model gave; a format-2 file of float32 numbers is written again that way, and one
    holding a number that is not a float32 is left as it was."""
    import numpy as np

    from maskssd.evaluation.detections_file import write_doc

    rng = np.random.default_rng(0)
    vals = rng.random((50, 5), dtype=np.float32) * 500
    doc = _fold_doc(1, ["x"])
    rows = [{"box": [float(v) for v in r[:4]], "label": "a", "score": float(r[4] / 500)} for r in vals]
    doc["images"][0]["detections"] = rows
    back = load_detections(write_doc(tmp_path / "a.json", doc))
    assert back["format"] == 3
    got = [[*d["box"], d["score"]] for d in back["images"][0]["detections"]]
    assert np.array_equal(np.float32(got), np.float32([[*r["box"], r["score"]] for r in rows]))
    assert len((tmp_path / "a.json").read_text()) < 0.8 * len(json.dumps(doc, indent=1))
    rows[0]["score"] = 0.1  # not a float32: the file keeps every digit
    assert load_detections(write_doc(tmp_path / "b.json", doc))["format"] == 2
