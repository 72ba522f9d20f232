"""Optuna studies against real Optuna storage (SQLite) and a real MLflow SQL store: nested runs, resume,
concurrent workers, a NaN trial, pruning, a killed worker, reports; and the registry's champion rule."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from maskssd import tracking
from maskssd.cli import main
from maskssd.errors import ConfigError
from maskssd.tracking.studies import load_study_config, make_storage, open_study
from maskssd.tracking.study_config import sample
from tests.conftest import migrated_store, write_tiny_experiment

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

STUDY = """\
[study]
name = "{name}"
experiment = "exp.toml"
objective = "{objective}"
direction = "{direction}"
n_trials = {n_trials}
epochs = {epochs}
eval_every = 1
heartbeat_interval = 1
grace_period = 4
overrides = {{ "train.log_images" = 0, "data.final_split" = "none" }}
trial_only = ["data.final_split"]

[sampler]
name = "{sampler}"
seed = 0
n_startup_trials = 2

[pruner]
name = "{pruner}"
n_startup_trials = 1
n_warmup_steps = 0

{space}
"""

SPACE = """\
[space.lr]
target = "optim.lr"
type = "float"
low = 1e-3
high = 1e-2
log = true

[space.neg_pos_ratio]
target = "loss.neg_pos_ratio"
type = "int"
low = 1
high = 4

[space.schedule]
target = "schedule.name"
type = "categorical"
choices = ["constant", "multistep"]

[space.decay_at]
target = "schedule.decay_lr_at"
type = "int"
low = 1
high = 2
as_list = true
when = { schedule = "multistep" }
"""


@pytest.fixture()
def project(tmp_path, monkeypatch, easy_synth_root):
    """A working dir with a tiny experiment; MLflow and Optuna stores under tmp_path/mlruns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_OPTUNA_STORAGE", raising=False)
    write_tiny_experiment(tmp_path / "exp.toml", easy_synth_root, epochs=2)
    return tmp_path


def write_study(
    path: Path,
    name: str = "s",
    n_trials: int = 3,
    epochs: int = 2,
    sampler: str = "tpe",
    pruner: str = "none",
    space: str = SPACE,
    objective: str = "val_map",
    direction: str = "maximize",
) -> Path:
    path.write_text(
        STUDY.format(
            name=name,
            n_trials=n_trials,
            epochs=epochs,
            sampler=sampler,
            pruner=pruner,
            space=space,
            objective=objective,
            direction=direction,
        )
    )
    return path


def storage_url(root: Path) -> str:
    return f"sqlite:///{root}/mlruns/optuna.db"


def load(root: Path, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(root))


def ran(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that ran. Workers that finish at the same moment can each start one more trial; the late one
    yields to the budget (FAIL with ``over_budget``, nothing trained), so only those may be left out."""
    from maskssd.tracking.study_budget import OVER_BUDGET

    late = [t for t in study.trials if OVER_BUDGET in t.user_attrs]
    assert all(t.state.name == "FAIL" and t.params == {} for t in late)
    return [t for t in study.trials if OVER_BUDGET not in t.user_attrs]


def child_runs(c, parent_id: str) -> list:
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=100)


# ------------------------------------------------------------------------------------------ config
def test_study_config_errors_name_key_and_file(project):
    bad = write_study(project / "bad.toml", space=SPACE.replace("high = 4", "high = 4\nbogus = 1"))
    with pytest.raises(ConfigError, match=r"bad.toml:\d+ \[space.neg_pos_ratio.bogus\]: unknown key"):
        load_study_config(bad)
    low_high = write_study(project / "lh.toml", space=SPACE.replace("high = 1e-2", "high = 1e-4"))
    with pytest.raises(ConfigError, match="low < high"):
        load_study_config(low_high)
    wrong_target = write_study(project / "t.toml", space=SPACE.replace('"optim.lr"', '"optim.learning_rate"'))
    with pytest.raises(ConfigError, match=r"optim.learning_rate\]: unknown key"):
        load_study_config(wrong_target)
    cond = write_study(project / "c.toml", space=SPACE.replace("when = { schedule", "when = { sched"))
    with pytest.raises(ConfigError, match="not a parameter of the space"):
        load_study_config(cond)


def test_shipped_studies_validate():
    for path in sorted((REPO / "studies").glob("*.toml")):
        cfg, base = load_study_config(path)
        assert base.is_file() and cfg.space


def test_conditional_parameter_only_when_its_condition_holds(project):
    cfg, _ = load_study_config(write_study(project / "s.toml"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = sample(trial, cfg)
        seen.add(values["schedule"])
        assert ("decay_at" in values) == (values["schedule"] == "multistep")
        assert 1e-3 <= values["lr"] <= 1e-2 and values["neg_pos_ratio"] in {1, 2, 3, 4}
        study.tell(trial, 0.0)
    assert seen == {"constant", "multistep"}


# --------------------------------------------------------------------------------- run and resume
def test_study_runs_nested_resumes_and_reports(project):
    # val_loss differs between trials even after two epochs of a tiny model (val_map may still be 0 for all)
    study_toml = write_study(project / "s.toml", n_trials=3, objective="val_loss", direction="minimize")
    assert main(["study", str(study_toml)]) == 0
    study = load(project)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    c = tracking.client()
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = child_runs(c, parent)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2]
    for r in children:
        trial = study.trials[int(r.data.tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == r.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags["optuna.state"] == "COMPLETE"
        assert float(r.data.params["optim.lr"]) == pytest.approx(trial.params["lr"])
        assert [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")] == [1, 2]
        assert r.data.metrics["val_loss"] == pytest.approx(trial.value)
    assert c.get_run(parent).info.status == "FINISHED"
    plots = {a.path for a in c.list_artifacts(parent, "study_plots")}
    assert "study_plots/optimization_history.png" in plots and "study_plots/slice.png" in plots

    # the same command again: budget spent, nothing new; a bigger budget adds exactly the difference
    assert main(["study", str(study_toml), "--no-report"]) == 0
    assert len(load(project).trials) == 3
    assert main(["study", str(study_toml), "--n-trials", "4", "--no-report"]) == 0
    study = load(project)
    assert len(study.trials) == 4 and study.trials[-1].state.name == "COMPLETE"
    assert len(child_runs(c, parent)) == 4  # still one parent run

    assert main(["study-report", "s"]) == 0
    assert "param_importances" in "".join(a.path for a in c.list_artifacts(parent, "study_plots"))


def test_study_config_writes_the_best_trial_at_full_budget(project):
    from maskssd.training.config import load_config

    study_toml = write_study(project / "s.toml")
    cfg, _ = load_study_config(study_toml)
    study = open_study(cfg, make_storage(storage_url(project), cfg), None, 2)
    dist = {
        "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
        "neg_pos_ratio": optuna.distributions.IntDistribution(1, 4),
        "schedule": optuna.distributions.CategoricalDistribution(["constant", "multistep"]),
    }
    for value, lr, npr in [(0.2, 1e-3, 1), (0.7, 4e-3, 4), (0.5, 2e-3, 2)]:
        params = {"lr": lr, "neg_pos_ratio": npr, "schedule": "multistep", "decay_at": 2}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={**dist, "decay_at": optuna.distributions.IntDistribution(1, 2)},
                value=value,
            )
        )
    base = load_config(project / "exp.toml")
    assert main(["study-config", str(study_toml), "-o", "best.toml"]) == 0
    best = load_config(project / "best.toml")
    assert best.optim.lr == 4e-3 and best.loss.neg_pos_ratio == 4 and best.schedule.decay_lr_at == [2]
    assert best.train.log_images == 0  # a recipe override travels
    assert best.data.final_split == base.data.final_split  # a trial-only one does not
    assert best.train.epochs == base.train.epochs and best.experiment.name == "best"  # its own experiment
    assert "Trial 1 of the study" in (project / "best.toml").read_text()
    # written into a subfolder, its data paths are rewritten to still point at the data
    (project / "experiments").mkdir()
    assert main(["study-config", str(study_toml), "-o", "experiments/winner.toml"]) == 0
    moved = load_config(project / "experiments" / "winner.toml")
    assert Path(moved.data.root).resolve() == Path(base.data.root).resolve()
    assert moved.experiment.name == "winner"
    assert main(["study-config", str(study_toml), "--trial", "0", "-o", "t0.toml"]) == 0
    assert load_config(project / "t0.toml").optim.lr == 1e-3
    assert main(["study-config", str(study_toml), "--trial", "7"]) == 2  # no such trial: a clear error


def test_trial_only_must_name_overrides(project):
    text = write_study(project / "s.toml").read_text().replace('["data.final_split"]', '["data.nope"]')
    (project / "s.toml").write_text(text)
    with pytest.raises(ConfigError, match="trial_only"):
        load_study_config(project / "s.toml")


def test_nan_trial_is_recorded_and_the_study_goes_on(project):
    space = '[space.lr]\ntarget = "optim.lr"\ntype = "categorical"\nchoices = [1e30, 3e-3]\n'
    study_toml = write_study(project / "s.toml", n_trials=2, sampler="grid", space=space)
    assert main(["study", str(study_toml), "--no-report"]) == 0
    trials = {t.params["lr"]: t for t in load(project).trials}
    assert trials[1e30].state.name == "FAIL" and "non-finite loss" in trials[1e30].user_attrs["fail_reason"]
    assert trials[3e-3].state.name == "COMPLETE"
    run = tracking.client().get_run(trials[1e30].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["failure_reason"]
    assert run.data.tags["optuna.state"] == "FAIL"


def test_a_bad_trial_is_pruned_in_both_systems(project):
    space = '[space.lr]\ntarget = "optim.lr"\ntype = "categorical"\nchoices = [3e-3, 1e-7]\n'
    study_toml = write_study(
        project / "s.toml",
        n_trials=2,
        epochs=3,
        pruner="median",
        space=space,
        objective="val_loss",
        direction="minimize",
    )
    cfg, _ = load_study_config(study_toml)
    study = open_study(cfg, make_storage(storage_url(project), cfg), epochs=3)
    study.enqueue_trial({"lr": 3e-3})  # a good trial first, then one that barely moves
    study.enqueue_trial({"lr": 1e-7})
    assert main(["study", str(study_toml), "--no-report"]) == 0
    good, bad = load(project).trials
    assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
    assert len(bad.intermediate_values) < 3
    run = tracking.client().get_run(bad.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
    assert "pruned by Optuna" in run.data.tags["stopped"]


def _worker(project: Path, study_toml: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """A ``maskssd study`` worker process; its output piped, or written to ``log`` (for a worker nobody reads
    while it runs: a full pipe would block it)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    migrated_store(project / "mlruns" / "mlflow.db")  # the default store of a worker started in project
    out = log.open("w") if log else subprocess.PIPE
    # one core per worker: two workers x two threads on two cores would oversubscribe them
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "maskssd",
                "study",
                str(study_toml),
                "--no-report",
                "--threads",
                "1",
                *extra,
            ],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.PIPE,
            text=True,
        )
    finally:
        if log:
            out.close()  # the child holds its own copy


def test_two_workers_share_one_study(project):
    study_toml = write_study(project / "s.toml", n_trials=4)
    workers = [_worker(project, study_toml) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    study = load(project)
    trials = ran(study)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == 4
    c = tracking.client()
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert sorted(r.info.run_id for r in child_runs(c, parent)) == sorted(run_ids)
    exp = c.get_experiment_by_name("study-s")
    parents = c.search_runs([exp.experiment_id], "tags.`maskssd.role` = 'study'")
    assert [p.info.run_id for p in parents] == [parent]  # both workers nested under the same parent


def test_a_killed_workers_trial_is_failed_and_retried(project):
    study_toml = write_study(project / "s.toml", n_trials=1, epochs=30)
    log = project / "worker.log"
    w = _worker(project, study_toml, log=log)
    deadline = time.time() + 180
    running = None
    while time.time() < deadline and running is None:
        time.sleep(0.5)
        assert w.poll() is None, f"the worker exited ({w.returncode}):\n{log.read_text()[-3000:]}"
        try:
            trials = load(project).trials
        except Exception:  # noqa: BLE001 - the storage or the study does not exist yet
            continue
        running = next(
            (t for t in trials if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs), None
        )
    if running is None:
        w.kill()
    assert running is not None, f"the worker never started a trial:\n{log.read_text()[-3000:]}"
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=30)
    time.sleep(5)  # past the grace period: the heartbeat is stale
    # a new worker with a short study finds the stale trial, fails it, retries it
    short = write_study(project / "s.toml", n_trials=1, epochs=2)
    w2 = _worker(project, short)
    out, err = w2.communicate(timeout=300)
    assert w2.returncode == 0, err
    trials = load(project).trials
    assert trials[0].state.name == "FAIL"
    retry = trials[1]
    assert retry.state.name == "COMPLETE" and retry.params == trials[0].params
    assert retry.system_attrs.get("failed_trial") == 0
    run = tracking.client().get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "heartbeat" in run.data.tags["failure_reason"]


# ------------------------------------------------------------------------------ multi-fidelity
def test_first_trials_run_the_full_budget_then_successive_halving_prunes():
    from maskssd.tracking.study_fidelity import SuccessiveHalving

    pruner = SuccessiveHalving(n_full=2, min_resource=1, reduction_factor=2)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    verdicts = []
    for value in (0.9, 0.1, 0.2, 0.95):  # trial 1 and 2 are worse than trial 0 at the first rung
        trial = study.ask()
        trial.report(value, 1)
        verdicts.append(trial.should_prune())
        study.tell(trial, value)
    assert verdicts == [False, False, True, False]  # 1 is kept (one of the first two), 2 is not
    assert all("completed_rung_0" in t.system_attrs for t in study.trials)  # rung values of all recorded


def test_a_trial_that_ran_its_budget_completes_and_counts_in_the_fidelity_check(project):
    space = '[space.lr]\ntarget = "optim.lr"\ntype = "categorical"\nchoices = [3e-3, 1e-7]\n'
    study_toml = write_study(
        project / "s.toml",
        n_trials=2,
        pruner="percentile",
        space=space,
        objective="val_loss",
        direction="minimize",
    )
    # the pruner may judge from the last epoch (2) on: only the final report, which must not prune
    study_toml.write_text(study_toml.read_text().replace("n_warmup_steps = 0", "n_warmup_steps = 2"))
    cfg, _ = load_study_config(study_toml)
    study = open_study(cfg, make_storage(storage_url(project), cfg), epochs=2)
    study.enqueue_trial({"lr": 3e-3})
    study.enqueue_trial({"lr": 1e-7})  # worse than the first at epoch 2
    assert main(["study", str(study_toml), "--no-report"]) == 0
    assert [t.state.name for t in load(project).trials] == ["COMPLETE", "COMPLETE"]


def test_fidelity_check_counts_trials_pruned_at_their_last_epoch():
    from maskssd.tracking.study_fidelity import fidelity_check

    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, (early, final) in enumerate([(0.1, 0.5), (0.2, 0.6), (0.3, 0.7)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": i / 10},
                distributions=dist,
                value=final,
                intermediate_values={3: early, 6: final},
            )
        )
    pruned = optuna.trial.create_trial(
        params={"x": 0.9},
        distributions=dist,
        state=optuna.trial.TrialState.PRUNED,
        intermediate_values={3: 0.4, 6: 0.8},
    )
    study.add_trial(pruned)
    check = fidelity_check(study, rung_epoch=3, full_epochs=6)
    assert check.n == 4 and check.spearman == pytest.approx(1.0)


def test_percentile_pruner_waits_for_its_first_epoch_then_keeps_the_best_third():
    from maskssd.tracking.studies import lowest_rung, make_pruner
    from maskssd.tracking.study_config import PrunerSpec, StudyConfig, StudySection

    spec = PrunerSpec(name="percentile", percentile=33.3, n_startup_trials=3, n_warmup_steps=9)
    cfg = StudyConfig(study=StudySection(name="p", experiment="e.toml"), pruner=spec, space={})
    assert lowest_rung(cfg) == 9
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg, 15))
    for v in (0.4, 0.5, 0.6):  # finished trials: values at epochs 3 and 9
        t = study.ask()
        t.report(v / 2, 3)
        t.report(v, 9)
        study.tell(t, v)
    low, high = study.ask(), study.ask()
    for t, v in ((low, 0.45), (high, 0.58)):
        t.report(0.01, 3)  # far behind at epoch 3: not judged before epoch 9
        assert not t.should_prune()
        t.report(v, 9)
    assert low.should_prune() and not high.should_prune()  # 0.58 is in the best third of 0.4/0.5/0.6


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from maskssd.tracking.study_fidelity import spearman

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 12).astype(float)  # ties
    y = x + rng.normal(0, 1.5, 12)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1.0, 2.0], [1.0, 2.0])) and np.isnan(spearman([1.0, 1, 1], [1.0, 2, 3]))


def test_multi_fidelity_study_with_two_workers_and_its_fidelity_check(project, capsys):
    import json

    from scipy.stats import spearmanr

    study_toml = write_study(
        project / "s.toml",
        n_trials=3,
        epochs=2,
        pruner="successive_halving",
        objective="val_loss",
        direction="minimize",
    )
    # the three trials run the full budget (n_startup_trials), so the check has three points
    text = study_toml.read_text().replace("n_startup_trials = 1", "n_startup_trials = 3")
    study_toml.write_text(text.replace("eval_every = 1", "eval_every = 1\nlog_models = false"))
    assert main(["study", str(study_toml), "--workers", "2"]) == 0
    assert "cheap-fidelity check" in capsys.readouterr().out
    study = load(project)
    assert study.metric_names == ["val_loss"]
    trials = ran(study)
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert all("completed_rung_0" in t.system_attrs for t in trials)  # successive halving saw them
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # two processes shared the budget
    assert len({t.params["lr"] for t in trials}) == 3  # seeded workers do not draw the same trials
    assert study.user_attrs["fidelity"] == {"rung_epoch": 1, "full_epochs": 2, "folds": 0, "epochs": 2}

    # the report: Spearman rho of the value at the lowest rung (epoch 1) and the final value, on the parent run
    expected = spearmanr([t.intermediate_values[1] for t in trials], [t.value for t in trials])
    c = tracking.client()
    parent = c.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["fidelity_spearman"] == pytest.approx(expected.statistic, abs=1e-12)
    assert parent.data.metrics["fidelity_n"] == 3 and parent.data.metrics["fidelity_rung_epoch"] == 1
    # a late trial that yielded to the budget (a race of the two workers) is not run, not failed
    assert parent.data.metrics["n_failed"] == 0 and parent.data.metrics["n_not_run"] == len(study.trials) - 3
    summary = tracking.MlflowRun(c, parent.info.run_id).download("study/summary.json", project / "dl")
    doc = json.loads(summary.read_text())
    fidelity = doc["fidelity"]
    assert doc["best_oof_errors"] is None  # no folds: no out-of-fold confusion
    assert fidelity["full_epochs"] == 2 and fidelity["by_epoch"]["1"]["n"] == 3


# -------------------------------------------------------------------------------------- registry
def test_promote_moves_champion_only_when_better(project, capsys):
    from maskssd.tracking.registry import promote

    study_toml = write_study(project / "s.toml", n_trials=3, objective="val_loss", direction="minimize")
    assert main(["study", str(study_toml), "--no-report"]) == 0
    trials = sorted(load(project).trials, key=lambda t: -t.value)  # worst (highest loss) first
    worst, mid, best = (t.user_attrs["mlflow_run_id"] for t in trials)
    assert trials[0].value > trials[1].value > trials[2].value
    p1 = promote(mid, metric="best_val_loss", maximize=False)
    assert p1.moved_alias and p1.version == "1" and p1.reason == "no champion yet"
    p2 = promote(worst, metric="best_val_loss", maximize=False)
    assert p2.version == "2" and not p2.moved_alias and "does not beat" in p2.reason
    c = tracking.client()
    assert str(c.get_model_version_by_alias("maskssd-face-mask", "champion").version) == "1"
    p3 = promote(worst, metric="best_val_loss", maximize=False, force=True)
    assert (
        p3.moved_alias and str(c.get_model_version_by_alias("maskssd-face-mask", "champion").version) == "3"
    )
    # the study's best trial beats the forced worst one
    assert main(["promote", "--study", "s", "--metric", "best_val_loss", "--minimize"]) == 0
    champion = c.get_model_version_by_alias("maskssd-face-mask", "champion")
    assert str(champion.version) == "4" and champion.tags["study"] == "s"
    assert champion.tags["source_run_id"] == best and champion.tags["trial"] == str(trials[2].number)
    assert {"config_hash", "data_split", "git_commit", "val_map", "model_id"} <= set(champion.tags)

    img = project / "face.png"
    Image.fromarray(np.full((80, 100, 3), 128, np.uint8)).save(img)
    out_dir = project / "out"
    assert (
        main(
            [
                "detect",
                "--model",
                "models:/maskssd-face-mask@champion",
                "--source",
                str(img),
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    assert (out_dir / "face.png").is_file() and (out_dir / "detections.json").is_file()
    assert (
        main(
            [
                "evaluate",
                "--model",
                "models:/maskssd-face-mask@champion",
                "--data",
                str(project / ".." / "x"),
                "--split",
                "val",
            ]
        )
        == 2
    )  # a missing dataset: one clear error


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_started_after_other_workers_took_the_budget_runs_nothing(project):
    from maskssd.tracking.studies import open_for_work, outcome
    from maskssd.tracking.study_budget import OVER_BUDGET, FailureCap, yielded_trial_log
    from maskssd.tracking.study_trial import make_objective

    o = open_for_work(write_study(project / "s.toml", n_trials=1))
    o.study.ask()  # another worker's trial, running: the whole budget
    # this worker passed its budget check at the same moment; its trial must train nothing
    objective = make_objective(o.cfg, o.base, o.config, o.parent, o.tracking_uri, o.n_trials)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    optuna_log = logging.getLogger("optuna.study._optimize")
    optuna_log.addHandler(handler)
    try:
        with yielded_trial_log():
            for _ in range(3):
                o.study.optimize(objective, n_trials=1, catch=(Exception,))
    finally:
        optuna_log.removeHandler(handler)
    # the budget working is not an error: one INFO line per yielded trial, no traceback, no second warning
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", f"trial {n}: the study's budget of 1 trials is taken: not run, this worker stops")
        for n in (1, 2, 3)
    ]
    assert not any(r.exc_info for r in records)
    late = o.study.trials[1:]
    assert [t.state.name for t in late] == ["FAIL"] * 3
    assert all(t.user_attrs[OVER_BUDGET] and t.params == {} for t in late)
    assert "other workers" in late[0].user_attrs["fail_reason"]
    assert child_runs(tracking.client(), o.parent) == []  # no MLflow run, no training
    FailureCap(1)(o.study, late[-1])  # 3 failures would stop the worker (Study.stop raises outside optimize)
    states = outcome(o, report=False).states
    assert states["NOT_RUN"] == 3 and "FAIL" not in states and states["RUNNING"] == 1


# ------------------------------------------------------------------------------------------- folds
def test_fold_study_prunes_on_fold_one_and_checks_the_fold_rung(project, capsys):
    """study.folds = 2: each trial a cross-validation parent (nested under the study's parent); a bad trial is
    pruned at the fold rung, before it trains fold 2. The objective here is the loss (for an AP the trial's
    value is out of fold, see tests/test_folds.py; a loss is the mean over the folds), which tells a tiny
    model's trials apart within one epoch."""
    import json

    space = '[space.lr]\ntarget = "optim.lr"\ntype = "categorical"\nchoices = [3e-3, 6e-3, 1e-7]\n'
    study_toml = write_study(
        project / "s.toml", n_trials=3, epochs=1, pruner="median", space=space, objective="val_loss",
        direction="minimize",
    )  # fmt: skip
    text = study_toml.read_text().replace("eval_every = 1", "eval_every = 1\nlog_models = false\nfolds = 2")
    text = text.replace(
        '"data.final_split" = "none"', '"data.final_split" = "none", "schedule.warmup_epochs" = 0'
    )
    study_toml.write_text(
        text.replace("n_startup_trials = 1\nn_warmup_steps = 0", "n_startup_trials = 2\nn_warmup_steps = 2")
    )
    cfg, _ = load_study_config(study_toml)
    study = open_study(cfg, make_storage(storage_url(project), cfg), epochs=1)
    for lr in (3e-3, 6e-3, 1e-7):  # two good trials run every fold, then a bad one
        study.enqueue_trial({"lr": lr})
    assert main(["study", str(study_toml)]) == 0
    out = capsys.readouterr().out
    assert "fold 1 (the fold rung)" in out and "cheap-fidelity check, by step" in out
    study = load(project)
    assert study.user_attrs["fidelity"] == {"rung_epoch": 2, "full_epochs": 3, "folds": 2, "epochs": 1}
    good, bad = study.trials[:2], study.trials[2]
    assert all(t.state.name == "COMPLETE" and sorted(t.intermediate_values) == [1, 2, 3] for t in good)
    assert bad.state.name == "PRUNED" and max(bad.intermediate_values) == 2  # pruned at the fold rung
    c = tracking.client()
    for t in good:  # a trial's value: its folds' mean loss; its folds are children of its run
        run = c.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["maskssd.role"] == "cv" and t.value == pytest.approx(
            run.data.metrics["val_loss_mean"]
        )
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]
        assert "oof_map" in run.data.metrics
    query = f"tags.`mlflow.parentRunId` = '{bad.user_attrs['mlflow_run_id']}'"
    kids = c.search_runs([run.info.experiment_id], query)
    assert [k.data.tags["maskssd.fold"] for k in kids] == ["1"]  # fold 2 never ran
    assert c.get_run(bad.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    parent = study.user_attrs["mlflow_parent_run_id"]
    summary = tracking.MlflowRun(c, parent).download("study/summary.json", project / "dl")
    doc = json.loads(summary.read_text())
    fidelity = doc["fidelity"]
    errors = doc["best_oof_errors"]  # what the best trial's models called each box, out of fold
    assert errors["run_id"] == study.best_trial.user_attrs["mlflow_run_id"] and errors["folds"] == 2
    confusion = errors["rows_true_columns_predicted"]
    assert errors["labels"][0] == "background" and len(confusion) == len(errors["labels"])
    n_gt = sum(sum(row) for row in confusion[1:])  # every box of every train+val image, once
    assert n_gt > 0 and all(len(row) == len(errors["labels"]) for row in confusion)
    assert (
        fidelity["rung_epoch"] == 2
        and fidelity["steps"]["2"] == "fold 1"
        and fidelity["by_epoch"]["2"]["n"] == 2
    )


def test_objectives_read_out_of_fold_and_mix():
    from maskssd.tracking.study_config import objective_value

    metrics = {"val_map": 0.5, "oof_map": 0.6, "oof_ap_a": 0.2, "val_loss_mean": 2.0, "val_ap_a": 0.1}
    assert objective_value("val_map", metrics, "val") == 0.5 and objective_value("map", metrics, "oof") == 0.6
    assert objective_value({"map": 0.5, "ap_a": 0.5}, metrics, "oof") == pytest.approx(0.4)
    assert objective_value("val_loss", metrics, "oof") == 2.0  # not an AP: the folds' mean
    assert objective_value("ap_b", metrics, "oof") is None


def test_promote_study_without_models_says_how_to_make_one(project, capsys):
    study_toml = write_study(project / "s.toml", n_trials=1, epochs=2)
    study_toml.write_text(
        study_toml.read_text().replace("eval_every = 1\n", "eval_every = 1\nlog_models = false\n")
    )
    assert main(["study", str(study_toml), "--no-report"]) == 0
    capsys.readouterr()
    assert main(["promote", "--study", "s"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "has no model to register" in said and "study.log_models = false" in said
    assert f"maskssd study-config {study_toml}" in said and "maskssd promote --run RUN_ID" in said
