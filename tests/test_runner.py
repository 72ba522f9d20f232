"""The experiment runner against a real MLflow SQL store: what a run records, resume equality, NaN handling,
interruption, atomic checkpoints, and ``evaluate --save-detections``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskssd import tracking
from maskssd.cli import main
from maskssd.errors import NonFiniteLossError, TrainingInterrupted
from maskssd.ssd.checkpoint import atomic_save, load
from maskssd.tracking.experiment import run_experiment
from maskssd.training import runner
from maskssd.training.config import load_config
from tests.conftest import migrated_store
from tests.conftest import write_tiny_experiment as write_config

pytestmark = pytest.mark.slow

TIMING = {"train/epoch_seconds", "train/images_per_second"}


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A fresh project dir: mlruns/ (SQLite store, artifacts, checkpoints) under tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_CHECKPOINT_DIR", raising=False)
    return tmp_path


def histories(c, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = c.get_run(run_id).data.metrics.keys()
    return {
        k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys if k not in TIMING
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root):
    """One finished 2-epoch run, shared by the read-only checks below."""
    tmp = tmp_path_factory.mktemp("run")
    old = os.getcwd()
    os.chdir(tmp)
    try:
        cfg = load_config(write_config(tmp / "exp.toml", synth_root, coco=True))
        result = run_experiment(cfg, tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db")
    finally:
        os.chdir(old)
    return tmp, cfg, result, tracking.client(f"sqlite:///{tmp}/mlruns/mlflow.db")


def test_run_records_everything(trained):
    tmp, cfg, result, c = trained
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert (
        p["optim.lr"] == "0.003"
        and p["model.name"] == "tiny"
        and p["loss.class_weights.mask_weared_incorrect"] == "3.0"
    )
    assert (
        t["config_hash"] == cfg.digest() and t["data.split"] == "default" and len(t["data.split_hash"]) == 12
    )
    for key in (  # per-epoch curves
        "train/loss",
        "train/loss_conf",
        "train/loss_loc",
        "val/loss",
        "val/loss_conf",
        "val/loss_loc",
        "train/lr",
        "train/epoch_seconds",
        "train/images_per_second",
        "val/map",
        "val/map_voc12",
    ):
        assert key in m, key
    assert "val/map_coco" not in m  # COCO (slow) in the final report only, unless eval.coco_curves
    for key in ("val_map", "val_map_coco", "test_map", "best_epoch"):  # the selected checkpoint's results
        assert key in m, key
    for cls in cfg.class_names:
        assert f"val/ap_{cls}" in m and f"val_ap_{cls}" in m and f"test_ap_{cls}" in m
    assert [s for s, _ in histories(c, result.run_id)["train/loss"]] == [1, 2]
    arts = {a.path for a in c.list_artifacts(result.run_id)}
    assert {"config.toml", "config.json", "checkpoints", "plots", "images"} <= arts
    ckpts = {a.path for a in c.list_artifacts(result.run_id, "checkpoints")}
    assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= ckpts
    plots = {a.path for a in c.list_artifacts(result.run_id, "plots")}
    assert "plots/pr_curves_val.png" in plots and "plots/confusion_val.png" in plots
    # the final report: one record per split, the confusion matrix of the plot at the operating threshold
    report = c.download_artifacts(result.run_id, "report/val.json", str(tmp))
    doc = json.loads(Path(report).read_text())
    assert doc["map"] == pytest.approx(m["val_map"]) and doc["intervals"]["n"] == cfg.eval.bootstrap
    confusion = doc["errors"]["confusion_at_threshold"]
    assert doc["operating_threshold"] == cfg.eval.operating_threshold == doc["errors"]["threshold"]
    assert confusion["rows_true_columns_predicted"] == result.evaluation.val.confusion.tolist()


def test_logged_model_loads_and_predicts(trained):
    import numpy as np

    from maskssd.deploy.predictor import load_predictor

    tmp, cfg, result, c = trained
    uri = f"runs:/{result.run_id}/model"
    pred = load_predictor(uri, f"sqlite:///{tmp}/mlruns/mlflow.db")
    assert pred.class_names == cfg.class_names and pred.input_size == 96
    dets = pred.predict([np.zeros((120, 160, 3), np.uint8)])
    assert len(dets) == 1 and (len(dets[0]) == 0 or dets[0].boxes[:, 2].max() <= 160)
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(np.random.default_rng(0).integers(0, 255, (2, 64, 80, 3), dtype=np.uint8))
    assert list(out.columns) == ["image_index", "x1", "y1", "x2", "y2", "label", "score"]


def test_logged_model_carries_its_int8_calibration(trained):
    """A trained model carries some of its own training images, resized to its input: int8 then needs no
    dataset (loaded from the registry), and ``--backend auto`` picks int8 where the CPU has VNNI."""
    import numpy as np
    from torchvision.transforms import v2

    from maskssd.data import FaceMaskDataset, load_image
    from maskssd.data.calibration import decode_calibration
    from maskssd.deploy.cpu import has_vnni
    from maskssd.deploy.model_ref import resolve_backend, resolve_checkpoint
    from maskssd.deploy.predictor import load_predictor

    tmp, cfg, result, c = trained
    cal = load(tmp / "mlruns" / "checkpoints" / result.run_id / "model.pt")["calibration"]
    train = FaceMaskDataset.from_root(cfg.data.root, "train", "default").annotations
    images = decode_calibration(cal)
    assert len(images) == min(100, len(train)) and {tuple(i.shape) for i in images} == {(3, 96, 96)}

    def resized(a):
        chw = torch.from_numpy(np.asarray(load_image(a.image_path))).permute(2, 0, 1)
        return v2.functional.resize(chw, [96, 96], antialias=True).float()

    own, other = ((images[0].float() - resized(a)).abs().mean() for a in train[:2])
    assert own < 6 and own < other / 2  # the first training image itself, JPEG-compressed
    assert "training images" in cal["source"]

    uri, store = f"runs:/{result.run_id}/model", f"sqlite:///{tmp}/mlruns/mlflow.db"
    frame = np.asarray(load_image(train[1].image_path))
    int8 = load_predictor(uri, store, backend="onnx-int8")  # no calibration given: the model's own
    # the downloaded model is kept by its content: the next start finds it, and the int8 model beside it
    kept = resolve_checkpoint(uri, store)
    assert kept == resolve_checkpoint(uri, store) and list(kept.parent.glob("*.int8-*.onnx"))
    assert str(kept).startswith(os.environ["MASKSSD_CACHE_DIR"])
    ref = load_predictor(uri, store, backend="onnx").predict([frame])[0]
    got = int8.predict([frame])[0]
    assert int8.backend == "onnx-int8" and abs(len(got) - len(ref)) <= max(2, len(ref) // 4)
    assert load_predictor(uri, store, backend="auto").backend == ("onnx-int8" if has_vnni() else "onnx")
    assert resolve_backend("auto", "cpu", int8_ready=True, vnni=True)[0] == "onnx-int8"
    assert resolve_backend("auto", "cpu", int8_ready=True, vnni=False)[0] == "onnx"
    assert resolve_backend("auto", "cpu", int8_ready=False, vnni=True)[0] == "onnx"
    assert resolve_backend("auto", "cuda:0", int8_ready=True, vnni=True)[0] == "torch"


def test_checkpoint_holds_training_state(trained):
    tmp, cfg, result, c = trained
    ck = load(tmp / "mlruns" / "checkpoints" / result.run_id / "last.pt")
    assert ck["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng", "config", "build_args"} <= set(ck)
    assert ck["config"]["optim"]["lr"] == 0.003


def test_evaluate_save_detections(trained, capsys):
    tmp, cfg, result, c = trained
    ckpt = tmp / "mlruns" / "checkpoints" / result.run_id / "model.pt"
    out = tmp / "dets.json"
    rc = main(
        [
            "evaluate",
            "--model",
            str(ckpt),
            "--data",
            str(cfg.data.root),
            "--split",
            "val",
            "--split-name",
            "default",
            "--save-detections",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["classes"] == list(cfg.class_names)
    assert set(doc["metrics"]) >= {"map", "ap"} and set(doc["metrics"]["ap"]) == set(cfg.class_names)
    assert doc["settings"]["min_score"] == 0.01 and doc["settings"]["max_overlap"] == 0.45
    assert doc["settings"]["top_k"] == 200
    # the model carries calibration images, yet an evaluation's auto never picks int8 (it measures the model)
    assert doc["settings"]["backend"] in ("onnx", "torch")
    assert len(doc["images"]) > 0
    for im in doc["images"]:
        assert {"id", "width", "height", "detections"} <= set(im)
        assert len(im["detections"]) <= 200
        for d in im["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= im["width"] and 0 <= y1 <= y2 <= im["height"]
            assert d["label"] in cfg.class_names and d["score"] > 0.01
    # the JSON's mAP is the run's val mAP of the same checkpoint
    assert abs(doc["metrics"]["map"] - c.get_run(result.run_id).data.metrics["val_map"]) < 1e-6
    assert "mean" in capsys.readouterr().out
    # without --data and --split-name: the data and split list the model was trained on, said on stderr
    again = tmp / "dets-default.json"
    assert main(["evaluate", "--model", str(ckpt), "--save-detections", str(again)]) == 0
    assert json.loads(again.read_text())["metrics"]["map"] == doc["metrics"]["map"]
    said = " ".join(capsys.readouterr().err.split())
    assert f"data: {cfg.data.root} default/val (what the model was trained on)" in said


def test_runs_table(trained, capsys, monkeypatch):
    tmp, cfg, result, c = trained
    assert (
        main(
            [
                "runs",
                "--experiment",
                "t",
                "--tracking-uri",
                f"sqlite:///{tmp}/mlruns/mlflow.db",
                "--sort",
                "val_map",
            ]
        )
        == 0
    )
    assert result.run_id[:8] in capsys.readouterr().out


def test_resume_logs_the_same_metrics(workdir, synth_root, monkeypatch):
    cfg = load_config(write_config(workdir / "exp.toml", synth_root, epochs=3))
    real_load, loads = torch.load, []

    def recording_load(*args, **kwargs):  # every checkpoint read while training and resuming is weights-only
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    a = run_experiment(cfg, log_model=False)

    def stop_after_2(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt  # what Ctrl-C / SIGTERM raise

    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, log_model=False, on_eval=[stop_after_2])
    c = tracking.client()
    b_id = [r.info.run_id for r in tracking.runs_table(c, "t") if r.info.run_id != a.run_id][0]
    assert c.get_run(b_id).info.status == "KILLED"
    b = run_experiment(cfg, resume_run_id=b_id, log_model=False)
    assert b.run_id == b_id and c.get_run(b_id).info.status == "FINISHED"
    assert len(loads) >= 3 and all(w is True for w in loads), loads  # final evaluations, resume, best.pt
    ha, hb = histories(c, a.run_id), histories(c, b_id)
    assert ha.keys() == hb.keys()
    for k in ha:
        assert [s for s, _ in ha[k]] == [s for s, _ in hb[k]], k
        assert [v for _, v in ha[k]] == pytest.approx([v for _, v in hb[k]], rel=1e-9, abs=1e-9), k


def test_nan_loss_fails_run_and_keeps_last_good_checkpoint(workdir, synth_root):
    cfg = load_config(write_config(workdir / "exp.toml", synth_root, epochs=3))
    seen = {}

    def poison(epoch, metrics):  # after a good epoch 1, break the weights: epoch 2's loss is NaN
        seen[epoch] = True
        if epoch == 1:
            model = poison.model
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    from maskssd.training import engine

    original = engine.Trainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        poison.model = self.model

    engine.Trainer.__init__ = spy
    try:
        with pytest.raises(NonFiniteLossError, match="epoch 2"):
            run_experiment(cfg, log_model=False, on_eval=[poison])
    finally:
        engine.Trainer.__init__ = original
    c = tracking.client()
    run = tracking.runs_table(c, "t")[0]
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["failure_reason"]
    last = load(workdir / "mlruns" / "checkpoints" / run.info.run_id / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = atomic_save({"model": {"w": torch.ones(3)}, "build_args": {}}, tmp_path / "last.pt")

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"model": {"w": torch.zeros(3)}, "build_args": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_a_checkpoint_write_waits_for_the_write(tmp_path, monkeypatch, sig):
    """Ctrl-C or SIGTERM arriving inside torch.save: the checkpoint is completed and renamed, then the
    interrupt takes effect (torch's half-written zip would otherwise raise a RuntimeError hiding it)."""
    real_save = torch.save

    def save_interrupted_midway(obj, f, *a, **k):
        f.write(b"")
        signal.raise_signal(sig)  # handled at once by Python unless deferred
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_interrupted_midway)
    with runner.sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        atomic_save({"model": {"w": torch.full((3,), 2.0)}, "build_args": {}}, tmp_path / "last.pt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the deferral put it back
    monkeypatch.undo()
    assert torch.equal(load(tmp_path / "last.pt")["model"]["w"], torch.full((3,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_sigterm_saves_marks_killed_and_prints_resume(workdir, synth_root):
    cfg = write_config(workdir / "exp.toml", synth_root, name="sig", epochs=40)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    migrated_store(workdir / "mlruns" / "mlflow.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "maskssd", "train", str(cfg), "--no-progress"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    ckpt_root = workdir / "mlruns" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpt_root.glob("*/last.pt")):
        time.sleep(0.5)
    assert list(ckpt_root.glob("*/last.pt")), "no checkpoint within 120 s"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    c = tracking.client(f"sqlite:///{workdir}/mlruns/mlflow.db")
    run = tracking.runs_table(c, "sig")[0]
    assert run.info.status == "KILLED"
    assert load(next(ckpt_root.glob("*/last.pt")))["epoch"] >= 1


def test_bad_config_is_one_clear_line(workdir, capsys):
    p = workdir / "bad.toml"
    p.write_text('[data]\nroot = "x"\n\n[optim]\nlr = "fast"\n')
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:5 [optim.lr]" in err and "Traceback" not in err


# ------------------------------------------------------------------ MLflow 3: the run as its UI shows it
def test_run_page_opens_on_the_per_epoch_curves(trained):
    """MLflow's run page groups metrics by the prefix before "/" and shows those sections before the
    unprefixed "Model metrics": every curve is prefixed, every unprefixed metric is one final point."""
    tmp, cfg, result, c = trained
    run = c.get_run(result.run_id)
    history = {k: c.get_metric_history(result.run_id, k) for k in run.data.metrics}
    curves = {k for k, h in history.items() if len(h) > 1}
    assert {"train/loss", "val/map", "val/loss", "train/lr"} <= curves
    assert all("/" in k for k in curves), curves
    final = {k for k in history if "/" not in k}
    assert {"val_map", "test_map", "best_epoch"} <= final
    assert all(len(history[k]) == 1 for k in final), {k: len(history[k]) for k in final}
    best = int(run.data.metrics["best_epoch"])
    curve_at_best = {m.step: m.value for m in history["val/map"]}[best]
    assert history["val_map"][0].step == best
    assert run.data.metrics["val_map"] == pytest.approx(curve_at_best, abs=1e-6)  # the same checkpoint
    assert result.metrics["val_map"] == pytest.approx(run.data.metrics["val_map"])


def test_run_records_its_datasets_and_context(trained):
    from maskssd.data import load_split
    from maskssd.tracking.lineage import git_info

    tmp, cfg, result, c = trained
    run = c.get_run(result.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    digest = run.data.tags["data.split_hash"]
    for split, ds in inputs.items():
        assert ds.digest == digest and ds.name == f"{Path(cfg.data.root).name}/default/{split}"
        assert json.loads(ds.source)["uri"] == str(Path(cfg.data.root).resolve())
        profile = json.loads(ds.profile)
        anns = load_split(cfg.data.root, split, "default", cfg.class_names)
        assert profile["images"] == len(anns)
        assert sum(profile["boxes"].values()) == sum(len(a.labels) for a in anns)
    found = c.search_runs([run.info.experiment_id], filter_string=f"dataset.digest = '{digest}'")
    assert result.run_id in {r.info.run_id for r in found}
    t = run.data.tags
    assert t["mlflow.user"] and t["mlflow.source.type"] == "LOCAL" and t["mlflow.source.name"]
    assert run.info.user_id == t["mlflow.user"]
    code = git_info()
    if code:  # a git checkout: the maskssd code's commit and branch, MLflow's tag names
        assert t["mlflow.source.git.commit"] == code["mlflow.source.git.commit"]
        assert t.get("mlflow.source.git.branch") == code.get("mlflow.source.git.branch")


def test_logged_model_carries_the_final_metrics_and_thresholds(trained):
    import mlflow

    tmp, cfg, result, c = trained
    assert result.model_uri.startswith("models:/m-")
    model_id = result.model_uri.removeprefix("models:/")
    model = c.get_logged_model(model_id)
    assert model.source_run_id == result.run_id
    linked = {(m.key, m.dataset_name) for m in model.metrics}
    root = Path(cfg.data.root).name
    expected = {(k, f"{root}/default/{k.split('_')[0]}") for k in result.metrics if k != "best_epoch"}
    assert linked == expected  # val_* with the val dataset, test_* with test; nothing else (no system/*)
    by_key = {m.key: m.value for m in model.metrics}
    assert by_key["val_map"] == pytest.approx(result.metrics["val_map"])
    ranked = c.search_logged_models(
        experiment_ids=[model.experiment_id],
        order_by=[{"field_name": "metrics.val_map", "ascending": False}],
    )
    assert model_id in [m.model_id for m in ranked]
    deployed = load(tmp / "mlruns" / "checkpoints" / result.run_id / "model.pt")
    path = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="thresholds.json", dst_path=str(tmp), tracking_uri=c.tracking_uri
    )
    fits = json.loads(Path(path).read_text())
    assert deployed.get("thresholds", {}) == {k: v["threshold"] for k, v in fits.items()}
    assert set(fits) <= set(cfg.class_names)


def test_a_full_disk_stops_the_run_keeps_the_last_checkpoint_and_resume_continues(
    workdir, synth_root, capsys
):
    """RLIMIT_FSIZE stands for a full disk: after epoch 1 no file may grow past 1 KiB, so epoch 2's checkpoint
    cannot be written. The run stops saying so, epoch 1's checkpoint is intact and loads, and once the limit is
    lifted ``--resume`` trains epochs 2 and 3 (no epoch lost)."""
    import resource

    from maskssd.errors import CheckpointWriteError

    cfg_path = write_config(workdir / "exp.toml", synth_root, epochs=3)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill_disk(epoch, metrics):
        if epoch == 1:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))

    try:
        with pytest.raises(
            CheckpointWriteError, match=r"epoch 2 .*File too large.*epoch 1 is intact"
        ) as stopped:
            run_experiment(load_config(cfg_path), log_model=False, on_eval=[fill_disk])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    run_id = stopped.value.run_id
    c = tracking.client()
    # the local store is on the same full disk: it could not even record the failure (the run stays RUNNING,
    # like a killed process's); what matters is below
    assert c.get_run(run_id).info.status in ("RUNNING", "FAILED")
    ckpt_dir = workdir / "mlruns" / "checkpoints" / run_id
    assert load(ckpt_dir / "last.pt")["epoch"] == 1  # intact and loadable
    assert not list(ckpt_dir.glob("*.tmp*")) and not list(ckpt_dir.glob(".*"))  # no half-written file left
    assert main(["train", str(cfg_path), "--resume", run_id, "--no-progress"]) == 0
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and load(ckpt_dir / "last.pt")["epoch"] == 3
    assert [s for s, _ in histories(c, run_id)["train/loss"]] == [1, 2, 3]


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_while_the_checkpoint_is_written_keeps_the_epochs_report(
    workdir, synth_root, monkeypatch
):
    """Ctrl-C/SIGTERM during the last.pt write takes effect after the epoch's report: the resume starts after
    that epoch, so a report left unsent would be lost for good."""
    from maskssd.ssd.checkpoint import interrupts_deferred
    from maskssd.training import store

    cfg = load_config(write_config(workdir / "exp.toml", synth_root, epochs=2))
    real_save = store.atomic_save

    def signalled_save(obj, path):
        if Path(path).name == "last.pt" and obj["epoch"] == 1:
            with interrupts_deferred():  # the signal arrives while the file is being written
                signal.raise_signal(signal.SIGINT)
                return real_save(obj, path)
        return real_save(obj, path)

    monkeypatch.setattr(store, "atomic_save", signalled_save)
    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, log_model=False)
    c = tracking.client()
    [run] = tracking.runs_table(c, "t")
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [1]
    monkeypatch.setattr(store, "atomic_save", real_save)
    run_experiment(cfg, resume_run_id=run.info.run_id, log_model=False)
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss")) == [1, 2]
