"""Seeds as an axis, against a real MLflow SQL store: one parent run per config with a child run per seed, the
parent's mean ± std, resuming a parent (only the missing seeds run), and the ``runs`` table's parent cells."""

from __future__ import annotations

import io
import json
import math
import statistics

import pytest

from maskssd import tracking
from maskssd.cli import commands, main
from maskssd.errors import TrainingInterrupted
from maskssd.tracking.seeds import aggregate, children_of, run_seeds
from maskssd.training.config import load_config
from tests.conftest import write_tiny_experiment

pytestmark = pytest.mark.slow


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_CHECKPOINT_DIR", raising=False)
    return tmp_path


def parents(c, experiment: str = "t") -> list:
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], "tags.`maskssd.role` = 'seeds'")


def test_aggregate_is_mean_and_sample_std():
    runs = [{"val_map": 0.6, "test_map": 0.5, "val_loss": 1.0}, {"val_map": 0.7, "test_map": 0.8}]
    agg = aggregate(runs)
    assert agg["n_seeds"] == 2 and "val_loss_mean" not in agg  # per-epoch metrics are not final ones
    assert agg["val_map_mean"] == pytest.approx(0.65)
    assert agg["test_map_std"] == pytest.approx(statistics.stdev([0.5, 0.8]))  # ddof = 1
    one = aggregate(runs[:1])
    assert one["val_map_mean"] == 0.6 and math.isnan(one["val_map_std"])  # one seed: std undefined


def test_seeds_make_one_parent_with_mean_and_std_of_its_children(workdir, synth_root, capsys, monkeypatch):
    monkeypatch.setattr(commands.out, "width", 250)  # the whole runs table, no cell cut short
    cfg = write_tiny_experiment(workdir / "exp.toml", synth_root, epochs=1)
    one_epoch = ["--set", "schedule.warmup_epochs=0"]
    record = workdir / "seeds_record.json"
    argv = ["train", str(cfg), "--seeds", "0,1", "--no-progress", "--record", str(record), *one_epoch]
    assert main(argv) == 0
    rec = json.loads(record.read_text())  # each run's pace, what the docs' min/run is made of
    assert [(ch["epochs"], ch["epoch_seconds_median"] > 0) for ch in rec["children"]] == [(1, True)] * 2
    c = tracking.client()
    [parent] = parents(c)
    assert parent.info.status == "FINISHED" and parent.data.params["seeds"] == "0,1"
    assert "experiment.seed" not in parent.data.params and parent.data.params["optim.lr"] == "0.003"
    kids = children_of(c, parent.info.run_id)
    assert [k.data.tags["maskssd.seed"] for k in kids] == ["0", "1"]
    assert [k.data.params["experiment.seed"] for k in kids] == ["0", "1"]
    assert all(k.info.status == "FINISHED" for k in kids)
    assert parent.data.tags["maskssd.children"] == ",".join(k.info.run_id for k in kids)
    m = parent.data.metrics
    assert m["n_seeds"] == 2
    for key in ("val_map", "test_map", "val_loss", "val_ap_with_mask", "test_ap_with_mask"):
        values = [k.data.metrics[key] for k in kids]
        assert m[f"{key}_mean"] == pytest.approx(statistics.fmean(values), abs=1e-12), key
        assert m[f"{key}_std"] == pytest.approx(statistics.stdev(values), abs=1e-12), key
    assert kids[0].data.metrics["val_loss"] != kids[1].data.metrics["val_loss"]  # seeds differ
    doc = json.loads(
        (tracking.MlflowRun(c, parent.info.run_id).download("seeds.json", workdir / "dl")).read_text()
    )
    assert {str(ch["seed"]): ch["run_id"] for ch in doc["children"]} == {
        "0": kids[0].info.run_id,
        "1": kids[1].info.run_id,
    }
    assert {ch["status"] for ch in doc["children"]} == {"FINISHED"} and doc["folds"] == 0
    capsys.readouterr()

    # maskssd runs: the parent as mean ± std (n), its children hidden; --children lists them under it
    assert main(["runs", "--experiment", "t", "--sort", "val_map"]) == 0
    table = capsys.readouterr().out
    mean, std = 100 * m["val_map_mean"], 100 * m["val_map_std"]
    assert f"{mean:.1f} ± {std:.1f} (2)" in table
    assert parent.info.run_id[:8] in table and kids[0].info.run_id[:8] not in table
    assert main(["runs", "--experiment", "t", "--children", "--sort", "val_map"]) == 0
    table = capsys.readouterr().out.splitlines()
    at = {
        k: next(i for i, line in enumerate(table) if k[:8] in line)
        for k in (parent.info.run_id, *[k.info.run_id for k in kids])
    }
    assert at[parent.info.run_id] < min(at[k.info.run_id] for k in kids)

    # maskssd compare: a parent stands for its finished seeds, pooled (seeds x images)
    pid, k0, k1 = parent.info.run_id, kids[0].info.run_id, kids[1].info.run_id
    assert main(["compare", pid, k0, "--split", "val", "--n", "50", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["a"] == [k0, k1] and doc["b"] == [k0] and (doc["runs_a"], doc["runs_b"]) == (2, 1)
    assert main(["compare", pid, f"{k0},{k1}", "--split", "val", "--n", "50", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    m_same = same["metrics"]["map"]
    assert m_same["diff"] == m_same["low"] == m_same["high"] == 0.0 and m_same["ties"] == 1.0

    # a deleted child, and in its place one whose process died before its first checkpoint (RUNNING, nothing
    # saved): resuming the parent starts that seed again, closes the dead one, keeps the other as it was
    c.delete_run(kids[1].info.run_id)
    keep = ("mlflow.parentRunId", "maskssd.role", "maskssd.seed", "maskssd.fold")
    dead = c.create_run(
        kids[1].info.experiment_id, tags={k: v for k, v in kids[1].data.tags.items() if k in keep}
    ).info.run_id
    assert main(["train", str(cfg), "--resume", parent.info.run_id, "--no-progress", *one_epoch]) == 0
    now = children_of(c, parent.info.run_id)
    assert now[0].info.run_id == kids[0].info.run_id and now[1].info.run_id == dead
    assert now[2].info.run_id not in (kids[1].info.run_id, dead) and now[2].info.status == "FINISHED"
    assert now[1].info.status == "KILLED" and "no checkpoint to resume" in now[1].data.tags["stopped"]
    assert now[0].info.end_time == kids[0].info.end_time
    assert c.get_run(parent.info.run_id).data.metrics["n_seeds"] == 2


def test_resuming_a_parent_finishes_only_the_interrupted_seed(workdir, synth_root):
    cfg = load_config(write_tiny_experiment(workdir / "exp.toml", synth_root, epochs=2))
    calls = []

    def stop_in_second_seed(epoch, metrics):  # seed 0 evaluates at epochs 1, 2; seed 1 is stopped at its 1
        calls.append(epoch)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C / SIGTERM raise

    with pytest.raises(TrainingInterrupted) as stopped:
        run_seeds(cfg, [0, 1], on_eval=[stop_in_second_seed], log_model=False)
    c = tracking.client()
    parent_id = stopped.value.run_id  # what the CLI's resume command names
    assert c.get_run(parent_id).info.status == "KILLED"
    first, second = children_of(c, parent_id)
    assert (first.info.status, second.info.status) == ("FINISHED", "KILLED")
    assert c.get_run(parent_id).data.metrics["n_seeds"] == 1  # the aggregate so far

    r = run_seeds(cfg, resume_parent_id=parent_id, log_model=False)
    assert r.status == "FINISHED" and r.parent_run_id == parent_id
    assert (r.runs[(0, 0)].action, r.runs[(1, 0)].action) == ("kept", "resumed")
    after = children_of(c, parent_id)
    assert [k.info.run_id for k in after] == [first.info.run_id, second.info.run_id]  # no new run
    assert after[0].data.metrics == first.data.metrics and after[0].info.end_time == first.info.end_time
    assert after[1].info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(second.info.run_id, "train/loss")] == [1, 2]
    p = c.get_run(parent_id)
    assert p.info.status == "FINISHED" and p.data.metrics["n_seeds"] == 2
    values = [k.data.metrics["val_loss"] for k in after]
    assert p.data.metrics["val_loss_mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert r.mean_std("val_loss")[2] == 2


def test_the_seeds_table_fits_80_columns_and_says_what_it_left_out():
    from types import SimpleNamespace

    from rich.console import Console

    from maskssd.cli.seeds import seeds_table

    classes = ["mask_weared_incorrect", "with_mask", "without_mask"]
    metrics = {"val_map": 0.875, "test_map": 0.881, **{f"val_ap_{c}": 0.5 for c in classes}}
    runs = {
        (s, k): SimpleNamespace(
            seed=s, fold=k, run_id=f"{s}{k}" * 16, status="FINISHED", action="new", metrics=metrics
        )
        for s in (0, 1)
        for k in (1, 2, 3)
    }
    agg = {f"{k}_mean": v for k, v in metrics.items()} | {f"{k}_std": 0.048 for k in metrics} | {"n_seeds": 6}
    agg |= {"oof_map": 0.7, "oof_map_ci_low": 0.65, "oof_map_ci_high": 0.75}
    agg |= {f"oof_ap_{c}": 0.5 for c in classes} | {f"oof_ap_{c}_ci_low": 0.4 for c in classes}
    agg |= {f"oof_ap_{c}_ci_high": 0.6 for c in classes}
    r = SimpleNamespace(runs=runs, aggregate=agg, seeds=[0, 1], folds=3, parent_run_id="p" * 32)
    for width, dropped in ((80, True), (250, False)):
        table, left_out = seeds_table(r, width)
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(table)
        lines = console.export_text().splitlines()
        assert max(len(line) for line in lines) <= width
        assert all("…" not in line for line in lines if "87.5" in line)  # numbers whole, never cut
        assert any("87.5 ± 4.8" in line and "(6)" not in line for line in lines)  # every child: no count
        assert any("70.0 [65.0, 75.0]" in line for line in lines)  # the pooled out-of-fold row
        assert bool(left_out) == dropped and ("val mAP" not in left_out)
