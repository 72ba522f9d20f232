"""Optuna studies over MultiBox loss and learning-rate parameters, every trial a nested MLflow run.

A study TOML names a base experiment, a search space over dotted config keys, a sampler, a pruner and a
trial budget. ``maskssd study`` resumes a study when run again and lets several workers share one storage
(SQLite or a journal file on one machine, PostgreSQL across machines). Trials report ``val_map`` at every
evaluation epoch so pruners work; a trial whose loss goes NaN, or that raises, is recorded FAIL with its
reason and the study goes on; a trial left RUNNING by a dead worker is failed by the heartbeat check and
retried.
"""

from __future__ import annotations

import math
import os
import tomllib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console
from rich.table import Table

from maskssd import tracking
from maskssd.config import ExperimentConfig, _line_of, apply_overrides, toml_error_line, validate
from maskssd.errors import ConfigError, MaskSSDError

console = Console(stderr=True)
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------------------- config
class _S(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ParamSpec(_S):
    """One searched parameter: ``target`` is the dotted experiment key it sets."""

    target: str
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    as_list: bool = False  # wrap the value in a list (e.g. one multistep decay epoch)
    when: dict[str, Any] = Field(default_factory=dict)  # sampled only when these other params have these values

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs choices")
            if any(not isinstance(c, (str, int, float, bool)) for c in self.choices):
                raise ValueError("categorical choices must be strings, numbers or booleans")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a {self.type} parameter needs low < high")
            if self.log and self.low <= 0:
                raise ValueError("a log-scale parameter needs low > 0")
        return self


class SamplerSpec(_S):
    name: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(5, ge=0)
    multivariate: bool = True


class PrunerSpec(_S):
    name: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(2, ge=0)
    n_warmup_steps: int = Field(0, ge=0)  # epochs before pruning may start
    min_resource: int = Field(1, ge=1)  # hyperband
    reduction_factor: int = Field(3, ge=2)  # hyperband


class StudySection(_S):
    name: str
    experiment: str  # base experiment TOML, relative to the study file
    objective: str = "val_map"  # the selected checkpoint's value (logged as best_<objective>)
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = Field(20, ge=1)  # the study's total budget, shared by every worker
    timeout: float = Field(0, ge=0)  # seconds per worker; 0 = none
    epochs: int | None = Field(None, ge=1)  # epochs per trial (default: the experiment's)
    eval_every: int | None = Field(None, ge=1)
    mlflow_experiment: str | None = None  # default: "study-<name>"
    log_models: bool = True  # every finished trial logs its model, so the best can be promoted
    heartbeat_interval: int = Field(30, ge=1)
    grace_period: int = Field(90, ge=2)
    max_retry: int = Field(1, ge=0)  # retries of a trial whose worker died
    overrides: dict[str, Any] = Field(default_factory=dict)  # fixed experiment values for every trial


class StudyConfig(_S):
    study: StudySection
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    space: dict[str, ParamSpec]

    @model_validator(mode="after")
    def _conds(self) -> StudyConfig:
        for name, p in self.space.items():
            for other in p.when:
                if other not in self.space:
                    raise ValueError(f"space.{name}.when names {other!r}, which is not a parameter of the space")
        if self.sampler.name == "grid":
            for name, p in self.space.items():
                if p.type != "categorical" and p.step is None:
                    raise ValueError(f"grid sampling needs choices or a step for space.{name}")
        return self

    @property
    def mlflow_experiment(self) -> str:
        return self.study.mlflow_experiment or f"study-{self.study.name}"


def load_study_config(path: str | Path) -> tuple[StudyConfig, Path]:
    """Read and validate a study TOML (and its base experiment, with every parameter at its low/first value)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("study file not found", path)
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path, None, toml_error_line(e, text)) from None
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(msg, path, ".".join(loc) or None, _line_of(text, loc)) from None
    base = (path.parent / cfg.study.experiment).resolve()
    if not base.is_file():
        raise ConfigError(f"base experiment {base} not found", path, "study.experiment", _line_of(text, ("study", "experiment")))
    # every target must be a real experiment key: validate a trial config made of each parameter's first value
    probe = {k: _first_value(p) for k, p in cfg.space.items()}
    base_cfg = trial_config(cfg, base, probe, path)
    del base_cfg
    return cfg, base


def _first_value(p: ParamSpec) -> Any:
    if p.type == "categorical":
        return p.choices[0]  # type: ignore[index]
    return int(p.low) if p.type == "int" else p.low  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- trials
def sample(trial: optuna.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """Sample the space (conditional parameters only when their ``when`` holds); names -> values."""
    values: dict[str, Any] = {}
    pending = dict(cfg.space)
    while pending:  # parameters whose conditions are decided, in dependency order
        progressed = False
        for name, p in list(pending.items()):
            if any(other in pending for other in p.when):
                continue
            del pending[name]
            progressed = True
            if any(values.get(o, object()) != v for o, v in p.when.items()):
                continue
            if p.type == "categorical":
                values[name] = trial.suggest_categorical(name, p.choices)  # type: ignore[arg-type]
            elif p.type == "int":
                values[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)  # type: ignore[arg-type]
            else:
                values[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)  # type: ignore[arg-type]
        if not progressed:
            raise ConfigError(f"circular 'when' conditions among {sorted(pending)}")
    return values


def trial_config(cfg: StudyConfig, base: Path, values: Mapping[str, Any], study_path: str | Path = "") -> ExperimentConfig:
    """The base experiment with the study's fixed overrides and one trial's sampled values applied."""
    data = tomllib.loads(base.read_text())
    apply_overrides(data, cfg.study.overrides, str(study_path))
    sampled = {cfg.space[k].target: ([v] if cfg.space[k].as_list else v) for k, v in values.items()}
    apply_overrides(data, sampled, str(study_path))
    if cfg.study.epochs:
        apply_overrides(data, {"train.epochs": cfg.study.epochs})
    if cfg.study.eval_every:
        apply_overrides(data, {"train.eval_every": cfg.study.eval_every})
    apply_overrides(data, {"experiment.name": cfg.mlflow_experiment})
    return validate(data, f"{base} (trial values {dict(values)} from {study_path})")


class PrunedTrial(optuna.TrialPruned):
    """Pruned by Optuna: the MLflow run is marked KILLED with the reason."""

    run_status = "KILLED"

    def __init__(self, epoch: int, value: float):
        self.run_reason = f"pruned by Optuna at epoch {epoch} ({value:.4f})"
        super().__init__(self.run_reason)


def default_storage_url() -> str:
    """``sqlite:///<cwd>/mlruns/optuna.db`` (or ``$MASKSSD_OPTUNA_STORAGE``)."""
    return os.environ.get("MASKSSD_OPTUNA_STORAGE") or \
        f"sqlite:///{(Path.cwd() / tracking.LOCAL_DIR / 'optuna.db').as_posix()}"


def make_storage(url: str | None, cfg: StudyConfig) -> optuna.storages.BaseStorage:
    """SQLite (default, under mlruns/), a journal file (``*.log`` / ``journal:PATH``), or any RDB URL (PostgreSQL).

    RDB storages get a heartbeat, so a trial left RUNNING by a dead worker is failed (and retried) by the others.
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
    else:
        engine_kwargs.update({"pool_size": 2, "max_overflow": 2, "pool_recycle": 300})
    s = cfg.study
    try:
        # workers starting at once must not race to create the schema
        return tracking.open_store(url, lambda: optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period, failed_trial_callback=_FailedTrialCallback(s.max_retry)))
    except Exception as e:  # unreachable server, bad URL, missing driver
        raise MaskSSDError(f"cannot open Optuna storage {_redact(url)}: {e}") from None


class _FailedTrialCallback:
    """A stale trial (its worker died): mark its MLflow run FAILED, then retry it up to ``max_retry`` times."""

    def __init__(self, max_retry: int):
        self.retry = optuna.storages.RetryFailedTrialCallback(max_retry=max_retry, inherit_intermediate_values=False)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                c = tracking.client(study.user_attrs.get("tracking_uri"))
                c.set_tag(run_id, "failure_reason", "worker stopped sending heartbeats (killed?)")
                c.set_terminated(run_id, "FAILED")
            except Exception as e:  # noqa: BLE001 - the retry matters more than the bookkeeping
                console.print(f"[yellow]could not mark MLflow run {run_id} failed: {e}")
        self.retry(study, trial)


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False)
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
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials,
                                          multivariate=s.multivariate, group=s.multivariate, constant_liar=True)


def make_pruner(cfg: StudyConfig, epochs: int) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=epochs,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


class _Budget:
    """Stop a worker once the study's finished + running trials reach its total budget (shared by workers)."""

    def __init__(self, n_trials: int):
        self.n = n_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        done = len(study.get_trials(deepcopy=False, states=states))
        failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
        if done >= self.n or failed >= max(self.n, 3):
            study.stop()


def remaining(study: optuna.Study, n_trials: int) -> int:
    """Trials still to start: the budget less finished and running ones (enqueued retries still count as to-do)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return max(n_trials - len(study.get_trials(deepcopy=False, states=states)), 0)


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
    exp_id = tracking.experiment_id(c, cfg.mlflow_experiment)
    storage = _redact(storage_url)
    # one parent per (study name, storage): a study of the same name in another storage gets its own
    query = (f"tags.`optuna.study_name` = '{cfg.study.name}' and tags.`maskssd.role` = 'study' "
             f"and tags.`optuna.storage` = '{storage}'")
    existing = c.search_runs([exp_id], query, order_by=["attributes.start_time ASC"], max_results=5)
    if not existing:
        run = c.create_run(exp_id, run_name=f"study-{cfg.study.name}",
                           tags={"optuna.study_name": cfg.study.name, "maskssd.role": "study",
                                 "optuna.storage": storage, **tracking.git_info(Path(__file__).parent)})
        existing = c.search_runs([exp_id], query, order_by=["attributes.start_time ASC"], max_results=5)
        if existing[0].info.run_id != run.info.run_id:  # another worker created one first: use the earliest
            c.delete_run(run.info.run_id)
    chosen = existing[0].info.run_id
    study.set_user_attr("mlflow_parent_run_id", chosen)
    return chosen


def _redact(url: str) -> str:
    import re

    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)


def make_objective(cfg: StudyConfig, base: Path, study_path: Path, parent_id: str, tracking_uri: str | None):
    """One trial: sample, build the trial's experiment, run it as a nested MLflow run, return the objective."""
    from maskssd.errors import NonFiniteLossError
    from maskssd.runner import run_experiment

    def objective(trial: optuna.Trial) -> float:
        values = sample(trial, cfg)
        try:
            exp = trial_config(cfg, base, values, study_path)
        except ConfigError as e:
            trial.set_user_attr("fail_reason", str(e))
            raise
        reported: dict[str, float] = {}

        def report(epoch: int, metrics: dict[str, float]) -> None:
            value = metrics.get(cfg.study.objective)
            if value is None or not math.isfinite(value):
                return
            trial.report(value, epoch)
            reported[str(epoch)] = value
            if trial.should_prune():
                raise PrunedTrial(epoch, value)

        tags = {"optuna.study_name": cfg.study.name, "optuna.trial_number": str(trial.number),
                "study": cfg.study.name, "trial": str(trial.number), "maskssd.role": "trial",
                **{f"optuna.param.{k}": str(v) for k, v in values.items()}}

        def started(run_id: str) -> None:
            trial.set_user_attr("mlflow_run_id", run_id)

        try:
            result = run_experiment(exp, tracking_uri=tracking_uri, run_name=f"trial-{trial.number:03d}",
                                    parent_run_id=parent_id, tags=tags, on_eval=[report], progress=False,
                                    log_model=cfg.study.log_models, show=False, on_start=started)
        except optuna.TrialPruned:
            _tag_state(tracking_uri, trial, "PRUNED")
            raise
        except NonFiniteLossError as e:
            trial.set_user_attr("fail_reason", f"non-finite loss: {e}")
            _tag_state(tracking_uri, trial, "FAIL")
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:2000])
            _tag_state(tracking_uri, trial, "FAIL")
            raise
        key = f"best_{cfg.study.objective}"
        value = result.metrics.get(key, result.metrics.get(cfg.study.objective))
        if value is None or not math.isfinite(value):
            raise MaskSSDError(f"trial produced no finite {key}")
        for k in ("test_map", "best_val_map", "best_epoch"):
            if k in result.metrics:
                trial.set_user_attr(k, result.metrics[k])
        _tag_state(tracking_uri, trial, "COMPLETE")
        return float(value)

    return objective


def _tag_state(tracking_uri: str | None, trial: optuna.Trial, state: str) -> None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        tracking.client(tracking_uri).set_tag(run_id, "optuna.state", state)


# --------------------------------------------------------------------------------------------- CLI
def open_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage, name: str | None = None,
               epochs: int = 10) -> optuna.Study:
    return optuna.create_study(study_name=name or cfg.study.name, storage=storage, sampler=make_sampler(cfg),
                               pruner=make_pruner(cfg, epochs), direction=cfg.study.direction, load_if_exists=True)


def run_study(a: Any) -> int:
    """``maskssd study``: create or resume the study and work on it until its budget is spent."""
    cfg, base = load_study_config(a.config)
    if a.study_name:
        cfg.study.name = a.study_name
    n_trials = a.n_trials or cfg.study.n_trials
    storage_url = a.storage or default_storage_url()
    storage = make_storage(storage_url, cfg)
    epochs = trial_config(cfg, base, {k: _first_value(p) for k, p in cfg.space.items()}, a.config).train.epochs
    study = open_study(cfg, storage, None, epochs)
    c = tracking.client(a.tracking_uri)
    study.set_user_attr("study_file", str(Path(a.config)))
    study.set_user_attr("objective", cfg.study.objective)
    if a.tracking_uri:
        study.set_user_attr("tracking_uri", a.tracking_uri)
    parent = parent_run(c, cfg, study, storage_url)
    with warnings.catch_warnings():  # experimental in Optuna's API, stable in behaviour since v2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of dead workers: FAIL (MLflow run too), then retried
    todo = remaining(study, n_trials)
    console.print(f"study [cyan]{cfg.study.name}[/]: {len(study.trials)} trials so far, budget {n_trials}, "
                  f"{todo} to go; MLflow parent run {parent} in experiment {cfg.mlflow_experiment}")
    run = tracking.MlflowRun(c, parent)
    if not study.user_attrs.get("params_logged"):
        run.log_params({"study.n_trials": n_trials, "study.objective": cfg.study.objective,
                        "study.direction": cfg.study.direction, "sampler": cfg.sampler.name,
                        "pruner": cfg.pruner.name, "base_experiment": str(base.name),
                        **{f"space.{k}": p.model_dump_json(exclude_defaults=True) for k, p in cfg.space.items()}})
        run.log_artifact(a.config, "study")
        study.set_user_attr("params_logged", True)
    if todo > 0:
        objective = make_objective(cfg, base, Path(a.config), parent, a.tracking_uri)
        timeout = a.timeout or cfg.study.timeout or None
        study.optimize(objective, n_trials=None if timeout else todo + 2 * n_trials, timeout=timeout,
                       catch=(Exception,), callbacks=[_Budget(n_trials)], gc_after_trial=True)
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}
    console.print("trials: " + ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v))
    finished = states.get("COMPLETE", 0) + states.get("PRUNED", 0)
    if finished >= n_trials and not states.get("RUNNING"):
        c.set_terminated(parent, "FINISHED")
    if not a.no_report:
        report(study, c, parent)
    return 0


def best_trial_run(name: str, storage_url: str | None, tracking_uri: str | None) -> tuple[str, dict[str, str]]:
    """The MLflow run of a study's best trial, and lineage tags for the registry."""
    storage = storage_url or default_storage_url()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise MaskSSDError(f"no study named {name!r} in {storage}") from None
    try:
        best = study.best_trial
    except ValueError:
        raise MaskSSDError(f"study {name!r} has no completed trial yet") from None
    run_id = best.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise MaskSSDError(f"best trial {best.number} of {name!r} has no MLflow run")
    return run_id, {"study": name, "trial": str(best.number), "study_value": f"{best.value:.6f}"}


def report_study(a: Any) -> int:
    storage = a.storage or default_storage_url()
    try:
        study = optuna.load_study(study_name=a.name, storage=storage)
    except KeyError:
        raise MaskSSDError(f"no study named {a.name!r} in {storage}") from None
    c = tracking.client(a.tracking_uri)
    report(study, c, study.user_attrs.get("mlflow_parent_run_id"))
    return 0


def report(study: optuna.Study, c: Any, parent_run_id: str | None, top: int = 10) -> dict[str, float]:
    """Best trials table, fANOVA importances, and plots logged to the study's parent run."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    t = Table(title=f"study {study.study_name}: best trials ({study.direction.name.lower()})")
    for col in ("trial", "value", "test_map", "epoch", "params", "MLflow run"):
        t.add_column(col)
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    for tr in sorted(complete, key=lambda x: x.value, reverse=reverse)[:top]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in tr.params.items())
        tm = tr.user_attrs.get("test_map")
        t.add_row(str(tr.number), f"{tr.value:.4f}", "" if tm is None else f"{tm:.4f}",
                  str(int(tr.user_attrs.get("best_epoch", 0)) or ""), params, str(tr.user_attrs.get("mlflow_run_id", ""))[:8])
    Console().print(t)
    importances: dict[str, float] = {}
    if len(complete) >= 3:
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as e:
            console.print(f"[yellow]no parameter importances: {e}")
    if importances:
        ti = Table(title="parameter importances (fANOVA)")
        ti.add_column("parameter")
        ti.add_column("importance", justify="right")
        for k, v in importances.items():
            ti.add_row(k, f"{v:.3f}")
        Console().print(ti)
    if parent_run_id:
        _log_plots(study, c, parent_run_id, importances)
        if complete:
            best = study.best_trial
            run = tracking.MlflowRun(c, parent_run_id)
            run.log_metrics({"best_value": best.value, "best_trial": best.number,
                             "n_complete": len(complete),
                             "n_pruned": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))),
                             "n_failed": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))},
                            step=len(study.trials))
            run.set_tags({"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", "")})
            run.log_dict({"importances": importances, "best_params": best.params, "best_value": best.value}, "study/summary.json")
    return importances


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _log_plots(study: optuna.Study, c: Any, parent_run_id: str, importances: Mapping[str, float]) -> None:
    import tempfile
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
             "intermediate_values": lambda: ovm.plot_intermediate_values(study),
             "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study),
             "slice": lambda: ovm.plot_slice(study)}
    if importances:
        plots["param_importances"] = lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in plots.items():
            try:
                ax = fn()
            except (ValueError, RuntimeError, TypeError) as e:
                console.print(f"[yellow]skipped plot {name}: {e}")
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(10, 6)
            path = Path(tmp) / f"{name}.png"
            fig.savefig(path, dpi=90, bbox_inches="tight")
            plt.close("all")
            c.log_artifact(parent_run_id, str(path), "study_plots")
