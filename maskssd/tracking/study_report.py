"""A study's report: the best trials, fANOVA parameter importances, the cheap-fidelity check, and plots and a
summary logged to the study's parent MLflow run (``maskssd study-report``, and the end of ``maskssd study``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from maskssd.tracking import runs
from maskssd.tracking.folds import oof_errors
from maskssd.tracking.study_budget import failures
from maskssd.tracking.study_fidelity import FidelityCheck, fidelity_check

__all__ = ["StudyReport", "summarize"]

log = logging.getLogger(__name__)


@dataclass
class StudyReport:
    """The best trials (``(number, value, test_map, best_epoch, params, run_id)``, best first), importances, and
    the cheap-fidelity check (rank correlation of early and final values)."""

    name: str
    direction: str
    best: list[tuple[int, float, float | None, int | None, dict[str, Any], str]] = field(default_factory=list)
    importances: dict[str, float] = field(default_factory=dict)
    fidelity: FidelityCheck | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # trials by state, wall time, every trial (records)


def summarize(study: optuna.Study, c: Any, parent_run_id: str | None, top: int = 10) -> StudyReport:
    """Best trials and fANOVA importances; plots and a summary logged to the study's parent run."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rep = StudyReport(study.study_name, study.direction.name.lower())
    for tr in sorted(complete, key=lambda x: x.value, reverse=reverse)[:top]:
        epoch = tr.user_attrs.get("best_epoch")
        rep.best.append(
            (
                tr.number,
                tr.value,
                tr.user_attrs.get("test_map"),
                int(epoch) if epoch else None,
                dict(tr.params),
                str(tr.user_attrs.get("mlflow_run_id", "")),
            )
        )
    if len(complete) >= 3:
        try:
            rep.importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
        except (RuntimeError, ValueError) as e:
            log.warning("no parameter importances: %s", e)
    rep.fidelity = fidelity_check(study)
    rep.summary = study_summary(study, rep)
    if rep.best and c is not None:
        rep.summary["best_oof_errors"] = oof_errors(c, rep.best[0][5])
    if parent_run_id:
        _log_plots(study, c, parent_run_id, rep.importances)
        if complete:
            _log_summary(study, runs.MlflowRun(c, parent_run_id), rep, len(complete))
    return rep


def study_summary(study: optuna.Study, rep: StudyReport) -> dict[str, Any]:
    """What a study did, as plain values: trials by state, the wall time from its first trial's start to its
    last trial's end, every trial (number, state, value, params, steps reported, seconds), the best one and
    the cheap-fidelity check."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start is not None]
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    n_failed, n_not_run = failures(study)
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    wall = (max(ends) - min(t.datetime_start for t in trials)).total_seconds() if ends else None
    return {
        "study": study.study_name,
        "direction": rep.direction,
        "objective": study.user_attrs.get("objective"),
        "states": states,
        "n_failed": n_failed,
        "n_not_run": n_not_run,
        "wall_seconds": wall,
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": dict(t.params),
                "steps": sorted(t.intermediate_values),
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete
                else None,
                "run_id": t.user_attrs.get("mlflow_run_id"),
                "worker": t.user_attrs.get("worker"),
            }
            for t in trials
        ],
        "best": {"number": rep.best[0][0], "value": rep.best[0][1], "params": rep.best[0][4]}
        if rep.best
        else None,
        "importances": dict(rep.importances),
        "fidelity": rep.fidelity.as_dict() if rep.fidelity else None,
    }


def _log_summary(study: optuna.Study, run: runs.MlflowRun, rep: StudyReport, n_complete: int) -> None:
    best = study.best_trial
    count = lambda state: len(study.get_trials(deepcopy=False, states=(state,)))  # noqa: E731
    fid = rep.fidelity
    n_failed, n_not_run = failures(study)
    fidelity = (
        {"fidelity_spearman": fid.spearman, "fidelity_n": fid.n, "fidelity_rung_epoch": fid.rung_epoch}
        if fid
        else {}
    )
    run.log_metrics(
        {
            "best_value": best.value,
            "best_trial": best.number,
            "n_complete": n_complete,
            "n_pruned": count(optuna.trial.TrialState.PRUNED),
            "n_failed": n_failed,
            "n_not_run": n_not_run,
            **fidelity,
        },
        step=len(study.trials),
    )
    run.set_tags({"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", "")})
    run.log_dict(
        {
            "importances": dict(rep.importances),
            "best_params": best.params,
            "best_value": best.value,
            "fidelity": fid.as_dict() if fid else None,
            "best_oof_errors": rep.summary.get("best_oof_errors"),
        },
        "study/summary.json",
    )


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _log_plots(study: optuna.Study, c: Any, parent_run_id: str, importances: Mapping[str, float]) -> None:
    import tempfile
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {
        "optimization_history": lambda: ovm.plot_optimization_history(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
        "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study),
        "slice": lambda: ovm.plot_slice(study),
    }
    if importances:
        plots["param_importances"] = lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in plots.items():
            try:
                ax = fn()
            except (ValueError, RuntimeError, TypeError) as e:
                log.warning("skipped plot %s: %s", name, e)
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(10, 6)
            path = Path(tmp) / f"{name}.png"
            fig.savefig(path, dpi=90, bbox_inches="tight")
            plt.close("all")
            c.log_artifact(parent_run_id, str(path), "study_plots")
