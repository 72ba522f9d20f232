"""One study trial: sample, build the trial's experiment, train it as a nested MLflow run (or, with
``study.folds``, as a cross-validation parent with a child per fold), report to the pruner, return the objective.

Reports are Optuna steps. A plain trial reports its objective at every evaluation epoch ``1..E``. A fold trial
reports fold 1's epochs at ``1..E``, then after fold ``k`` has finished the mean of its folds' objectives so far
at step ``E + k``: step ``E + 1`` is the **fold rung**, where a trial is pruned before it pays for the other
folds; its value is then the objective out of fold (pooled over every train+val image, :mod:`.folds`).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from maskssd.errors import ConfigError, MaskSSDError, NonFiniteLossError, TrainingInterrupted
from maskssd.tracking import runs
from maskssd.tracking.experiment import run_experiment
from maskssd.tracking.study_budget import check_budget
from maskssd.tracking.study_config import StudyConfig, objective_value, sample, trial_config
from maskssd.training.config import ExperimentConfig

__all__ = ["PrunedTrial", "fold_rung", "make_objective"]


class PrunedTrial(optuna.TrialPruned):
    """Pruned by Optuna: the MLflow run is marked KILLED with the reason."""

    run_status = "KILLED"

    def __init__(self, epoch: int, value: float, what: str = "epoch"):
        self.run_reason = f"pruned by Optuna at {what} {epoch} ({value:.4f})"
        super().__init__(self.run_reason)


def fold_rung(epochs: int) -> int:
    """The step at which a fold trial reports its first fold's value (after its ``epochs`` epoch reports)."""
    return epochs + 1


class _Reporter:
    """Reports a trial's values to Optuna and prunes it (never at its last report: a trial that ran its budget
    completes)."""

    def __init__(self, trial: optuna.Trial, cfg: StudyConfig, epochs: int):
        self.trial, self.cfg, self.epochs = trial, cfg, epochs
        self.folds = cfg.study.folds
        self.last_step = epochs + self.folds if self.folds else epochs
        self.fold_values: list[float] = []

    def _report(self, step: int, value: float, what: str, shown: int) -> None:
        self.trial.report(value, step)
        if step < self.last_step and self.trial.should_prune():
            raise PrunedTrial(shown, value, what)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Every evaluation epoch (of fold 1 only, in a fold trial)."""
        if self.fold_values:  # a later fold: its epochs are not steps
            return
        value = objective_value(self.cfg.study.objective, metrics, "val")
        if value is not None:
            self._report(epoch, value, "epoch", epoch)

    def fold(self, member: tuple[int, int], run: Any) -> None:
        """After each fold's child: the mean of the folds' objectives so far, at step ``epochs + fold``."""
        value = objective_value(self.cfg.study.objective, run.metrics, "val")
        if value is None:
            raise MaskSSDError(f"fold {member[1]} produced no finite {self.cfg.study.objective_name}")
        self.fold_values.append(value)
        mean = math.fsum(self.fold_values) / len(self.fold_values)
        self.trial.set_user_attr(f"fold{member[1]}_value", value)
        self._report(self.epochs + len(self.fold_values), mean, "fold", member[1])


def _run_trial(
    cfg: StudyConfig,
    exp: ExperimentConfig,
    reporter: _Reporter,
    parent_id: str,
    tracking_uri: str | None,
    tags: Mapping[str, str],
    trial: optuna.Trial,
) -> dict[str, float]:
    """Train the trial (one run, or a cross-validation parent and its folds); its final metrics."""

    def started(run_id: str) -> None:
        trial.set_user_attr("mlflow_run_id", run_id)

    name = f"trial-{trial.number:03d}"
    if not cfg.study.folds:
        result = run_experiment(
            exp,
            tracking_uri=tracking_uri,
            run_name=name,
            parent_run_id=parent_id,
            tags=tags,
            on_eval=[reporter.epoch],
            log_model=cfg.study.log_models,
            on_start=started,
        )
        return dict(result.metrics)
    from maskssd.tracking.seeds import run_seeds

    result = run_seeds(
        exp,
        [exp.experiment.seed],
        tracking_uri=tracking_uri,
        run_name=name,
        on_eval=[reporter.epoch],
        log_model=cfg.study.log_models,
        folds=cfg.study.folds,
        parent_run_id=parent_id,
        parent_tags=tags,
        on_child=reporter.fold,
        on_start=started,
    )
    if result.status != "FINISHED":
        raise MaskSSDError(f"a fold of the trial did not finish: {result.status.lower()}")
    return dict(result.aggregate)


def make_objective(
    cfg: StudyConfig,
    base: Path,
    study_path: Path,
    parent_id: str,
    tracking_uri: str | None,
    n_trials: int | None = None,
):
    """One trial: sample, build the trial's experiment, run it nested under the study's parent run, return the
    objective. A trial started after other workers took the budget (``n_trials``, default the study's) runs
    nothing: it is recorded FAIL with the ``over_budget`` attribute and stops this worker."""
    budget = n_trials or cfg.study.n_trials

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        check_budget(trial, budget)
        values = sample(trial, cfg)
        try:
            exp = trial_config(cfg, base, values, study_path)
        except ConfigError as e:
            trial.set_user_attr("fail_reason", str(e))
            raise
        tags = {
            "optuna.study_name": cfg.study.name,
            "optuna.trial_number": str(trial.number),
            "study": cfg.study.name,
            "trial": str(trial.number),
            "maskssd.role": "trial",
            **{f"optuna.param.{k}": str(v) for k, v in values.items()},
        }
        reporter = _Reporter(trial, cfg, exp.train.epochs)
        try:
            metrics = _run_trial(cfg, exp, reporter, parent_id, tracking_uri, tags, trial)
        except optuna.TrialPruned:
            _tag_state(tracking_uri, trial, "PRUNED")
            raise
        except TrainingInterrupted as e:  # Ctrl-C / SIGTERM stop the worker, not only this trial
            trial.set_user_attr("fail_reason", f"interrupted: {e}")
            _tag_state(tracking_uri, trial, "FAIL")
            raise KeyboardInterrupt(str(e)) from None
        except NonFiniteLossError as e:
            trial.set_user_attr("fail_reason", f"non-finite loss: {e}")
            _tag_state(tracking_uri, trial, "FAIL")
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:2000])
            _tag_state(tracking_uri, trial, "FAIL")
            raise
        return _complete(cfg, trial, metrics, tracking_uri)

    return objective


def _complete(
    cfg: StudyConfig, trial: optuna.Trial, metrics: Mapping[str, float], tracking_uri: str | None
) -> float:
    """The trial's value (the selected checkpoint's; out of fold for a fold trial) and its user attributes."""
    value = objective_value(cfg.study.objective, metrics, "oof" if cfg.study.folds else "val")
    if value is None:
        raise MaskSSDError(f"trial produced no finite {cfg.study.objective_name}")
    keys = (
        ("oof_map", "val_map_mean", "test_map_mean")
        if cfg.study.folds
        else ("test_map", "val_map", "best_epoch")
    )
    for k in keys:
        if k in metrics:
            trial.set_user_attr(k, metrics[k])
    _tag_state(tracking_uri, trial, "COMPLETE")
    return float(value)


def _tag_state(tracking_uri: str | None, trial: optuna.Trial, state: str) -> None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        runs.client(tracking_uri).set_tag(run_id, "optuna.state", state)
