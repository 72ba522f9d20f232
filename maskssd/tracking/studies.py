"""Optuna studies over MultiBox loss and learning-rate parameters, every trial a nested MLflow run.

A study TOML names a base experiment, a search space over dotted config keys, a sampler, a pruner and a
trial budget. ``maskssd study`` resumes a study when run again and lets several workers share one storage
(SQLite or a journal file on one machine, PostgreSQL across machines). Trials report ``val_map`` at every
evaluation epoch so pruners work; a trial whose loss goes NaN, or that raises, is recorded FAIL with its
reason and the study goes on; a trial left RUNNING by a dead worker is failed by the heartbeat check and
retried. The budget is Optuna's ``MaxTrialsCallback`` over finished and running trials, shared by every worker
(a trial that starts once the other workers have taken the budget runs nothing);
``maskssd study --workers N`` starts N local workers (:mod:`maskssd.tracking.study_workers`).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from maskssd.errors import ConfigError, MaskSSDError
from maskssd.runtime import local_dir
from maskssd.tracking import runs
from maskssd.tracking.registry import logged_model_id
from maskssd.tracking.study_budget import (
    BUDGET_STATES,
    FailureCap,
    failures,
    remaining,
    yielded_trial_log,
)
from maskssd.tracking.study_config import (
    StudyConfig,
    first_value,
    load_study_config,
    recipe_config,
    trial_config,
)
from maskssd.tracking.study_fidelity import Hyperband, SuccessiveHalving
from maskssd.tracking.study_report import StudyReport, summarize
from maskssd.tracking.study_storage import ResilientRDBStorage
from maskssd.tracking.study_trial import fold_rung, make_objective

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def default_storage_url() -> str:
    """``$MASKSSD_OPTUNA_STORAGE``, else ``sqlite:///<project root>/mlruns/optuna.db``."""
    return os.environ.get("MASKSSD_OPTUNA_STORAGE") or f"sqlite:///{(local_dir() / 'optuna.db').as_posix()}"


def make_storage(url: str | None, cfg: StudyConfig) -> optuna.storages.BaseStorage:
    """SQLite (default, under mlruns/), a journal file (``*.log`` / ``journal:PATH``), or any RDB URL (PostgreSQL).

    RDB storages get a heartbeat, so a trial left RUNNING by a dead worker is failed (and retried) by the others,
    and wait out their database restarting (:mod:`maskssd.tracking.study_storage`).
    SQLite runs in write-ahead-log mode, so local workers read while another writes.
    """
    url = url or default_storage_url()
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend

        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
        _sqlite_wal(url.removeprefix("sqlite:///"))
    else:
        engine_kwargs.update({"pool_size": 2, "max_overflow": 2, "pool_recycle": 300})
    s = cfg.study
    try:
        # workers starting at once must not race to create the schema
        return runs.open_store(url, lambda: _rdb_storage(url, engine_kwargs, s))
    except Exception as e:  # unreachable server, bad URL, missing driver
        raise MaskSSDError(f"cannot open Optuna storage {_redact(url)}: {e}") from None


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], s: Any) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # heartbeats: "experimental" in Optuna's API, stable since v2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return ResilientRDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period,
            heartbeat_stale_trial_callback=_StaleTrialCallback(s.max_retry),
        )


def _sqlite_wal(path: str) -> None:
    """Write-ahead logging (persistent in the file): readers do not block the writer, nor it them."""
    import sqlite3
    from contextlib import closing

    with runs.sqlite_init_lock(f"sqlite:///{path}"), closing(sqlite3.connect(path, timeout=120)) as con:
        con.execute("PRAGMA journal_mode=WAL")


class _StaleTrialCallback:
    """A stale trial (its worker died): mark its MLflow run FAILED, then retry it up to ``max_retry`` times."""

    def __init__(self, max_retry: int):
        with (
            warnings.catch_warnings()
        ):  # "experimental" since Optuna 2.8; the successor of RetryFailedTrialCallback
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=max_retry, inherit_intermediate_values=False
            )

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                c = runs.client(study.user_attrs.get("tracking_uri"))
                c.set_tag(run_id, "failure_reason", "worker stopped sending heartbeats (killed?)")
                c.set_terminated(run_id, "FAILED")
            except Exception as e:  # noqa: BLE001 - the retry matters more than the bookkeeping
                log.warning("could not mark MLflow run %s failed: %s", run_id, e)
        self.retry(study, trial)


def make_sampler(cfg: StudyConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler; ``seed_offset`` (a local worker's index) keeps workers from drawing the same trials."""
    s = cfg.sampler.model_copy()
    if s.seed is not None:
        s.seed += seed_offset
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False
        )
    if s.name == "grid":
        grid = {}
        for name, p in cfg.space.items():
            if p.type == "categorical":
                grid[name] = list(p.choices or [])
            else:
                n = int(round((p.high - p.low) / p.step)) + 1  # type: ignore[operator]
                grid[name] = [p.low + i * p.step for i in range(n)]  # type: ignore[operator]
                if p.type == "int":
                    grid[name] = [int(v) for v in grid[name]]
        return optuna.samplers.GridSampler(grid, seed=s.seed)
    with warnings.catch_warnings():  # multivariate/group/constant_liar: "experimental" flags, long stable
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: parallel workers do not all sample next to the same running trial
        return optuna.samplers.TPESampler(
            seed=s.seed,
            n_startup_trials=s.n_startup_trials,
            multivariate=s.multivariate,
            group=s.multivariate,
            constant_liar=True,
        )


def make_pruner(cfg: StudyConfig, epochs: int) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.name == "successive_halving":
        return SuccessiveHalving(
            n_full=p.n_startup_trials, min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.name == "hyperband":
        return Hyperband(
            n_full=p.n_startup_trials,
            min_resource=p.min_resource,
            max_resource=epochs,
            reduction_factor=p.reduction_factor,
        )
    return optuna.pruners.NopPruner()


def lowest_rung(cfg: StudyConfig) -> int:
    """The first epoch at which the pruner may stop a trial (the cheap fidelity the report checks)."""
    p = cfg.pruner
    return p.min_resource if p.name in ("successive_halving", "hyperband") else max(p.n_warmup_steps, 1)


def parent_run(c: Any, cfg: StudyConfig, study: optuna.Study, storage_url: str) -> str:
    """The study's single parent MLflow run, shared by every worker (the earliest created wins a race)."""
    rid = study.user_attrs.get("mlflow_parent_run_id")
    if rid:
        try:
            run = c.get_run(rid)
            if run.info.lifecycle_stage == "active":
                if run.info.status != "RUNNING":
                    c.update_run(rid, status="RUNNING")
                return rid
        except Exception:  # noqa: BLE001 - deleted or another store: make a new one
            pass
    exp_id = runs.experiment_id(c, cfg.mlflow_experiment)
    storage = _redact(storage_url)
    # one parent per (study name, storage): a study of the same name in another storage gets its own
    query = (
        f"tags.`optuna.study_name` = '{cfg.study.name}' and tags.`maskssd.role` = 'study' "
        f"and tags.`optuna.storage` = '{storage}'"
    )
    existing = c.search_runs([exp_id], query, order_by=["attributes.start_time ASC"], max_results=5)
    if not existing:
        run = c.create_run(
            exp_id,
            run_name=f"study-{cfg.study.name}",
            tags={
                "optuna.study_name": cfg.study.name,
                "maskssd.role": "study",
                "optuna.storage": storage,
                **runs.git_info(Path(__file__).parent),
            },
        )
        existing = c.search_runs([exp_id], query, order_by=["attributes.start_time ASC"], max_results=5)
        if existing[0].info.run_id != run.info.run_id:  # another worker created one first: use the earliest
            c.delete_run(run.info.run_id)
    chosen = existing[0].info.run_id
    study.set_user_attr("mlflow_parent_run_id", chosen)
    return chosen


def _redact(url: str) -> str:
    import re

    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)


# --------------------------------------------------------------------------------------------- CLI
def open_study(
    cfg: StudyConfig,
    storage: optuna.storages.BaseStorage,
    name: str | None = None,
    epochs: int = 10,
    worker: int = 0,
) -> optuna.Study:
    study = optuna.create_study(
        study_name=name or cfg.study.name,
        storage=storage,
        sampler=make_sampler(cfg, worker),
        pruner=make_pruner(cfg, epochs),
        direction=cfg.study.direction,
        load_if_exists=True,
    )
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([cfg.study.objective_name])  # the objective's name in plots and the dashboard
    return study


@dataclass
class StudyOutcome:
    """Where a study stands after this worker's share: trial counts by state, and its report."""

    name: str
    parent_run_id: str
    states: dict[str, int]
    report: StudyReport | None = None


@dataclass
class OpenedStudy:
    """A study opened for work: its config, the Optuna study, the MLflow client and the parent run."""

    cfg: StudyConfig
    base: Path
    config: Path
    study: optuna.Study
    client: Any
    parent: str
    n_trials: int
    tracking_uri: str | None


def open_for_work(
    config: str | Path,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    tracking_uri: str | None = None,
    worker: int = 0,
) -> OpenedStudy:
    """Create or load the study of a study TOML and its MLflow parent run; fail the trials of dead workers.
    ``worker``: this process's index among local workers (offsets the sampler's seed)."""
    cfg, base = load_study_config(config)
    if study_name:
        cfg.study.name = study_name
    n_trials = n_trials or cfg.study.n_trials
    storage_url = storage or default_storage_url()
    epochs = trial_config(cfg, base, {k: first_value(p) for k, p in cfg.space.items()}, config).train.epochs
    study = open_study(cfg, make_storage(storage_url, cfg), None, epochs, worker)
    c = runs.client(tracking_uri)
    study.set_user_attr("study_file", str(Path(config)))
    study.set_user_attr("objective", cfg.study.objective_name)
    folds = cfg.study.folds
    rung = (
        fold_rung(epochs) if folds else lowest_rung(cfg)
    )  # a fold study: the fold rung is the cheap fidelity
    study.set_user_attr(
        "fidelity", {"rung_epoch": rung, "full_epochs": epochs + folds, "folds": folds, "epochs": epochs}
    )
    if tracking_uri:
        study.set_user_attr("tracking_uri", tracking_uri)
    parent = parent_run(c, cfg, study, storage_url)
    with warnings.catch_warnings():  # experimental in Optuna's API, stable in behaviour since v2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(
            study
        )  # trials of dead workers: FAIL (MLflow run too), then retried
    _log_study_params(runs.MlflowRun(c, parent), study, cfg, base, n_trials, config)
    return OpenedStudy(cfg, base, Path(config), study, c, parent, n_trials, tracking_uri)


def work_on(o: OpenedStudy, timeout: float | None = None) -> None:
    """Run trials until the study's shared budget is spent (finished + running trials of every worker, Optuna's
    ``MaxTrialsCallback``), as many trials have failed, or this worker's ``timeout`` has passed."""
    todo = remaining(o.study, o.n_trials)
    log.info(
        "study %s: %d trials so far, budget %d, %d to go; MLflow parent run %s in experiment %s",
        o.cfg.study.name,
        len(o.study.trials),
        o.n_trials,
        todo,
        o.parent,
        o.cfg.mlflow_experiment,
    )
    if todo <= 0:
        return
    timeout = timeout or o.cfg.study.timeout or None
    with yielded_trial_log():
        o.study.optimize(
            make_objective(o.cfg, o.base, o.config, o.parent, o.tracking_uri, o.n_trials),
            n_trials=None if timeout else todo + 2 * o.n_trials,
            timeout=timeout,
            catch=(Exception,),
            callbacks=[
                optuna.study.MaxTrialsCallback(o.n_trials, states=BUDGET_STATES),
                FailureCap(o.n_trials),
            ],
            gc_after_trial=True,
        )


def outcome(o: OpenedStudy, report: bool = True) -> StudyOutcome:
    """Trial counts by state (the parent run FINISHED once the budget is), and the report. Trials that never
    ran because the budget was taken count as ``NOT_RUN``, not ``FAIL``."""
    study, c = o.study, o.client
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}
    states["FAIL"], states["NOT_RUN"] = failures(study)
    finished = states.get("COMPLETE", 0) + states.get("PRUNED", 0)
    if finished >= o.n_trials and not states.get("RUNNING"):
        c.set_terminated(o.parent, "FINISHED")
    return StudyOutcome(
        o.cfg.study.name,
        o.parent,
        {k: v for k, v in states.items() if v},
        summarize(study, c, o.parent) if report else None,
    )


def run_study(
    config: str | Path,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    tracking_uri: str | None = None,
    timeout: float | None = None,
    report: bool = True,
) -> StudyOutcome:
    """Create or resume the study of a study TOML and work on it until its shared budget is spent."""
    o = open_for_work(
        config, n_trials=n_trials, storage=storage, study_name=study_name, tracking_uri=tracking_uri
    )
    work_on(o, timeout)
    return outcome(o, report)


def _log_study_params(
    run: runs.MlflowRun, study: optuna.Study, cfg: StudyConfig, base: Path, n_trials: int, config: str | Path
) -> None:
    if study.user_attrs.get("params_logged"):
        return
    run.log_params(
        {
            "study.n_trials": n_trials,
            "study.objective": cfg.study.objective_name,
            "study.direction": cfg.study.direction,
            "sampler": cfg.sampler.name,
            "pruner": cfg.pruner.name,
            "base_experiment": str(base.name),
            **{f"space.{k}": p.model_dump_json(exclude_defaults=True) for k, p in cfg.space.items()},
        }
    )
    run.log_artifact(config, "study")
    study.set_user_attr("params_logged", True)


def best_trial_run(
    name: str, storage_url: str | None, tracking_uri: str | None
) -> tuple[str, dict[str, str]]:
    """The MLflow run of a study's best trial, and lineage tags for the registry."""
    study = load_study(name, storage_url)
    try:
        best = study.best_trial
    except ValueError:
        raise MaskSSDError(f"study {name!r} has no completed trial yet") from None
    run_id = best.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise MaskSSDError(f"best trial {best.number} of {name!r} has no MLflow run")
    c = runs.client(tracking_uri, create=False)
    if logged_model_id(c, run_id) is None:
        why = (
            "its trials are cross-validated (a model per fold, none trained on the whole training split)"
            if (study.user_attrs.get("fidelity") or {}).get("folds")
            else "the study does not log models (study.log_models = false)"
        )
        src = study.user_attrs.get("study_file", "STUDY.toml")
        raise MaskSSDError(
            f"best trial {best.number} of study {name!r} (run {run_id}) has no model to register: {why}. "
            f"Train its configuration at full budget, then promote that run:\n"
            f"  maskssd study-config {src} -o experiments/{name}_best.toml\n"
            f"  maskssd train experiments/{name}_best.toml\n"
            f"  maskssd promote --run RUN_ID"
        )
    return run_id, {"study": name, "trial": str(best.number), "study_value": f"{best.value:.6f}"}


def trial_recipe(
    config: str | Path, *, trial: int | None = None, storage: str | None = None, study_name: str | None = None
) -> tuple[dict[str, Any], optuna.trial.FrozenTrial]:
    """``maskssd study-config``: a trial's configuration (the best completed one by default) as an experiment
    at the base experiment's full budget, ready to retrain over seeds and to ship in ``experiments/``."""
    cfg, base = load_study_config(config)
    study = load_study(study_name or cfg.study.name, storage)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if trial is None:
        if not done:
            raise MaskSSDError(f"study {study.study_name!r} has no completed trial yet")
        chosen = study.best_trial
    else:
        chosen = next((t for t in done if t.number == trial), None)
        if chosen is None:
            raise MaskSSDError(f"study {study.study_name!r} has no completed trial {trial}")
    unknown = sorted(set(chosen.params) - set(cfg.space))
    if unknown:
        raise ConfigError(
            f"trial {chosen.number} has parameters {unknown} that the study's space lacks", config
        )
    return recipe_config(cfg, base, chosen.params, config), chosen


def load_study(name: str, storage_url: str | None = None) -> optuna.Study:
    """An existing study; a SQLite storage that does not exist is an error (never created by a read)."""
    storage = storage_url or default_storage_url()
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise MaskSSDError(
            f"no Optuna storage at {storage.removeprefix('sqlite:///')}: run maskssd from the project's folder, "
            "or pass --storage (or set MASKSSD_OPTUNA_STORAGE)"
        )
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise MaskSSDError(f"no study named {name!r} in {_redact(storage)}") from None


def report_study(name: str, *, storage: str | None = None, tracking_uri: str | None = None) -> StudyReport:
    """``maskssd study-report``: summarise a study (and log its plots to its parent run)."""
    study = load_study(name, storage)
    return summarize(
        study, runs.client(tracking_uri, create=False), study.user_attrs.get("mlflow_parent_run_id")
    )
