"""The MLflow Model Registry: downloading logged and registered models, and promotion.

A model reference is a checkpoint file, ``runs:/RUN_ID/model`` or ``models:/NAME@ALIAS`` (or
``models:/NAME/VERSION``); :func:`maskssd.deploy.predictor.resolve_checkpoint` resolves all three, calling
:func:`download_model` for the last two. :func:`promote` registers a run's model with lineage tags and moves the
``champion`` alias only when the new version beats the current champion.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from maskssd.errors import MaskSSDError
from maskssd.tracking import runs

DEFAULT_MODEL_NAME = "maskssd-face-mask"
CHAMPION = "champion"


def download_model(ref: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The maskssd checkpoint inside a logged or registered model (``runs:/...``, ``models:/...``), downloaded."""
    runs.client(tracking_uri)
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="maskssd-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst)))
    except Exception as e:  # MlflowException, missing alias, unreachable server ...
        raise MaskSSDError(f"cannot load model {ref}: {e}") from None
    found = sorted(local.rglob("artifacts/*.pt")) or sorted(local.rglob("*.pt"))
    if not found:
        raise MaskSSDError(f"model {ref} holds no maskssd checkpoint (looked in {local})")
    return found[0]


# ------------------------------------------------------------------------------------------ promote
@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    metric: str
    value: float
    champion_before: str | None
    champion_value: float | None
    moved_alias: bool
    reason: str


def _metric(c: mlflow.runs.MlflowClient, run_id: str, metric: str) -> float:
    value = c.get_run(run_id).data.metrics.get(metric)
    return float("nan") if value is None else float(value)


def best_run(
    c: mlflow.runs.MlflowClient,
    experiment: str,
    metric: str,
    maximize: bool = True,
    require_model: bool = True,
) -> str:
    """The finished run of an experiment with the best ``metric`` (that logged a model)."""
    found = runs.runs_table(
        c, experiment, max_results=1000, order_by=[f"metrics.{metric} {'DESC' if maximize else 'ASC'}"]
    )
    for r in found:
        if r.info.status != "FINISHED" or metric not in r.data.metrics:
            continue
        if require_model and not _has_model(c, r.info.run_id):
            continue
        return r.info.run_id
    raise MaskSSDError(f"no finished run with a model and metric {metric!r} in experiment {experiment!r}")


def _has_model(c: mlflow.runs.MlflowClient, run_id: str) -> bool:
    """Whether the run logged a model (MLflow 3 keeps logged models beside, not inside, run artifacts)."""
    exp = c.get_run(run_id).info.experiment_id
    return bool(
        c.search_logged_models(
            experiment_ids=[exp], filter_string=f"source_run_id = '{run_id}'", max_results=1
        )
    )


def promote(
    run_id: str,
    name: str = DEFAULT_MODEL_NAME,
    metric: str = "best_val_map",
    maximize: bool = True,
    force: bool = False,
    tracking_uri: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Promotion:
    """Register ``runs:/RUN_ID/model`` as a new version with lineage tags; move ``champion`` if it is better."""
    c = runs.client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise MaskSSDError(f"no MLflow run {run_id} in {c.tracking_uri}") from None
    if run.info.status != "FINISHED":
        raise MaskSSDError(
            f"run {run_id} is {run.info.status}; only finished runs with a logged model are promoted"
        )
    value = _metric(c, run_id, metric)
    if math.isnan(value):
        raise MaskSSDError(f"run {run_id} has no metric {metric!r}")
    m, t = run.data.metrics, run.data.tags
    tags = {
        "source_run_id": run_id,
        "config_hash": t.get("config_hash", ""),
        "data_split": t.get("data.split", ""),
        "data_split_hash": t.get("data.split_hash", ""),
        "git_commit": t.get("mlflow.source.git.commit", ""),
        "selection_metric": metric,
        "selection_value": f"{value:.6f}",
        **{k: f"{v:.6f}" for k, v in m.items() if k.startswith(("best_val_", "test_")) and "loss" not in k},
        **{k: v for k, v in t.items() if k in ("study", "trial")},
        **(extra_tags or {}),
    }
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(
            name, description="maskssd face-mask detector (SSD); see version tags for lineage"
        )
    mv = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags)
    try:
        champion = c.get_model_version_by_alias(name, CHAMPION)
        champ_version: str | None = champion.version
        champ_value = (
            float(champion.tags.get("selection_value", "nan"))
            if champion.tags.get("selection_metric") == metric
            else _metric(c, champion.run_id, metric)
        )
    except mlflow.exceptions.MlflowException:
        champ_version, champ_value = None, None
    if champ_version is None:
        move, reason = True, "no champion yet"
    elif force:
        move, reason = True, "forced"
    elif champ_value is None or math.isnan(champ_value):
        move, reason = True, f"champion v{champ_version} has no {metric}"
    elif (value > champ_value) if maximize else (value < champ_value):
        move, reason = True, f"{metric} {value:.4f} beats champion v{champ_version} ({champ_value:.4f})"
    else:
        move, reason = (
            False,
            f"{metric} {value:.4f} does not beat champion v{champ_version} ({champ_value:.4f})",
        )
    if move:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
    c.set_model_version_tag(name, mv.version, "promotion", reason)
    return Promotion(name, str(mv.version), run_id, metric, value, champ_version, champ_value, move, reason)
