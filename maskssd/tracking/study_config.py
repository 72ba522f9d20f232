"""Study configs: the TOML that names a base experiment, a search space over dotted experiment keys, a sampler,
a pruner and a budget; and how one trial's sampled values become an experiment config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maskssd.errors import ConfigError
from maskssd.training.config import (
    ExperimentConfig,
    _line_of,
    apply_overrides,
    config_error,
    read_config,
    read_toml,
    validate,
)

__all__ = [
    "ParamSpec",
    "PrunerSpec",
    "SamplerSpec",
    "StudyConfig",
    "StudySection",
    "first_value",
    "load_study_config",
    "objective_terms",
    "objective_value",
    "recipe_config",
    "sample",
    "trial_config",
]


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
    when: dict[str, Any] = Field(
        default_factory=dict
    )  # sampled only when these other params have these values

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
    """``successive_halving`` (ASHA) and ``hyperband`` are multi-fidelity over epochs: rungs at ``min_resource *
    reduction_factor**k`` epochs; their first ``n_startup_trials`` trials (by number) are never pruned.
    ``median`` and ``percentile`` compare a trial at every report from ``n_warmup_steps`` on with the finished
    trials at the same epoch (the median; the best ``percentile`` %), once ``n_startup_trials`` have finished."""

    name: Literal["median", "percentile", "successive_halving", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(
        2, ge=0
    )  # median: finished trials before pruning; else: never-pruned trials
    n_warmup_steps: int = Field(0, ge=0)  # median, percentile: the first epoch at which pruning may happen
    percentile: float = Field(
        33.3, gt=0, lt=100
    )  # percentile: keep the best this % of finished trials' values
    min_resource: int = Field(1, ge=1)  # successive_halving, hyperband: epochs of the first rung
    reduction_factor: int = Field(3, ge=2)  # successive_halving, hyperband


class StudySection(_S):
    name: str
    experiment: str  # base experiment TOML, relative to the study file
    # the selected checkpoint's value: a final metric ("val_map", "val_ap_mask_weared_incorrect"), or a mix of
    # them with weights ({ map = 0.5, ap_mask_weared_incorrect = 0.5 }); with folds an AP is read out of fold
    # (pooled over every image), anything else (val_loss) as the mean over the folds
    objective: str | dict[str, float] = "val_map"
    # cross-validation trials (>= 2): a trial trains fold 1, reports it (the fold rung: pruned there before it
    # pays for the others), then the other folds; its value is the objective out of fold (maskssd.tracking.folds)
    folds: int = Field(0, ge=0)
    fold_seed: int = 0
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = Field(20, ge=1)  # the study's total budget, shared by every worker
    timeout: float = Field(0, ge=0)  # seconds per worker; 0 = none
    epochs: int | None = Field(None, ge=1)  # epochs per trial (default: the experiment's)
    eval_every: int | None = Field(None, ge=1)  # epochs between reports to the pruner
    input_size: int | None = Field(None, ge=32)  # a cheaper fidelity: the trials' model.input_size
    mlflow_experiment: str | None = None  # default: "study-<name>"
    log_models: bool = True  # every finished trial logs its model, so the best can be promoted
    heartbeat_interval: int = Field(30, ge=1)
    grace_period: int = Field(90, ge=2)
    max_retry: int = Field(1, ge=0)  # retries of a trial whose worker died
    overrides: dict[str, Any] = Field(default_factory=dict)  # fixed experiment values for every trial
    # keys of `overrides` that only make trials cheap (no test split, no images): `maskssd study-config`
    # leaves them out of the full-budget experiment it writes; the other overrides belong to the recipe
    trial_only: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _trial_only_keys(self) -> StudySection:
        unknown = [k for k in self.trial_only if k not in self.overrides]
        if unknown:
            raise ValueError(f"study.trial_only names {unknown}, which are not keys of study.overrides")
        if self.folds == 1:
            raise ValueError("study.folds needs 2 or more folds (0: no cross-validation)")
        if isinstance(self.objective, dict) and not self.objective:
            raise ValueError("an objective mix needs at least one metric")
        return self

    @property
    def objective_name(self) -> str:
        """The objective as one name (for Optuna's metric name and reports)."""
        terms = objective_terms(self.objective)
        if len(terms) == 1 and terms[next(iter(terms))] == 1.0:
            return next(iter(terms))
        return " + ".join(f"{w:g} {k}" for k, w in terms.items())


def _short(key: str) -> str:
    for prefix in ("val_", "oof_", "test_"):
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key


def objective_terms(objective: str | Mapping[str, float]) -> dict[str, float]:
    """``{metric: weight}`` of an objective (one metric: weight 1)."""
    return {objective: 1.0} if isinstance(objective, str) else {k: float(w) for k, w in objective.items()}


def _is_ap(short: str) -> bool:
    return short.startswith(("map", "ap_", "ap50"))


def objective_value(
    objective: str | Mapping[str, float], metrics: Mapping[str, float], prefix: str
) -> float | None:
    """The objective from a run's metrics: each term's metric read under ``prefix`` (``val`` for a run and its
    per-epoch reports, ``oof`` for a cross-validation parent: an AP pooled out of fold, ``map`` = ``val_map`` =
    ``oof_map``; another metric as the mean over the folds, ``val_loss`` -> ``val_loss_mean``), weighted and
    summed; None when a term is missing or not finite."""
    total = 0.0
    for key, weight in objective_terms(objective).items():
        short = _short(key)
        if prefix == "val":
            name = key if key.startswith(("val_", "train_")) else f"val_{short}"
        else:
            name = f"{prefix}_{short}" if _is_ap(short) else f"val_{short}_mean"
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            return None
        total += weight * float(value)
    return total


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
                    raise ValueError(
                        f"space.{name}.when names {other!r}, which is not a parameter of the space"
                    )
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
    data, text = read_toml(path, "study file")
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as e:
        raise config_error(e, path, text) from None
    base = (path.parent / cfg.study.experiment).resolve()
    if not base.is_file():
        raise ConfigError(
            f"base experiment {base} not found",
            path,
            "study.experiment",
            _line_of(text, ("study", "experiment")),
        )
    # every target must be a real experiment key: validate a trial config made of each parameter's first value
    probe = {k: first_value(p) for k, p in cfg.space.items()}
    base_cfg = trial_config(cfg, base, probe, path)
    del base_cfg
    return cfg, base


def first_value(p: ParamSpec) -> Any:
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
                values[name] = trial.suggest_int(
                    name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
                )  # type: ignore[arg-type]
            else:
                values[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)  # type: ignore[arg-type]
        if not progressed:
            raise ConfigError(f"circular 'when' conditions among {sorted(pending)}")
    return values


def trial_config(
    cfg: StudyConfig, base: Path, values: Mapping[str, Any], study_path: str | Path = ""
) -> ExperimentConfig:
    """The base experiment with the study's fixed overrides and one trial's sampled values applied."""
    data = _with_values(cfg, base, values, cfg.study.overrides, study_path)
    if cfg.study.epochs:
        apply_overrides(data, {"train.epochs": cfg.study.epochs})
    if cfg.study.eval_every:
        apply_overrides(data, {"train.eval_every": cfg.study.eval_every})
    if cfg.study.input_size:
        apply_overrides(data, {"model.input_size": cfg.study.input_size})
    if cfg.study.folds:
        apply_overrides(data, {"data.fold_seed": cfg.study.fold_seed})
    apply_overrides(data, {"experiment.name": cfg.mlflow_experiment})
    return validate(data, f"{base} (trial values {dict(values)} from {study_path})")


def recipe_config(
    cfg: StudyConfig, base: Path, values: Mapping[str, Any], study_path: str | Path = ""
) -> dict[str, Any]:
    """A trial's recipe at the base experiment's full budget: its sampled values and the study's overrides
    except the ``trial_only`` ones, without the trials' cheaper fidelity (epochs, input size). Validated."""
    recipe = {k: v for k, v in cfg.study.overrides.items() if k not in cfg.study.trial_only}
    data = _with_values(cfg, base, values, recipe, study_path)
    validate(data, f"{base} (trial values {dict(values)} from {study_path})")
    return data


def _with_values(
    cfg: StudyConfig,
    base: Path,
    values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    study_path: str | Path,
) -> dict[str, Any]:
    data, _ = read_config(base, "base experiment")
    apply_overrides(data, overrides, str(study_path))
    sampled = {cfg.space[k].target: ([v] if cfg.space[k].as_list else v) for k, v in values.items()}
    apply_overrides(data, sampled, str(study_path))
    return data
