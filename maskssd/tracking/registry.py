"""The MLflow Model Registry: downloading logged and registered models, and promotion.

A model reference is a checkpoint file, ``runs:/RUN_ID/model``, ``models:/MODEL_ID`` (a logged model, as
``maskssd train`` prints it) or ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``);
:func:`maskssd.deploy.model_ref.resolve_checkpoint` resolves them all, calling :func:`download_model` for the
URIs. :func:`promote` registers a run's logged model (by its ``models:/MODEL_ID``) with lineage tags and moves
the ``champion`` alias only when the new version beats the current champion.

A run's final metrics are ``val_*`` (the selected checkpoint on validation) and ``test_*``; runs logged before
the per-epoch curves moved to ``val/*`` have them as ``best_val_*``. :func:`final_metric` reads either.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow

from maskssd.errors import MaskSSDError
from maskssd.files import atomic_path, user_cache
from maskssd.tracking import runs

DEFAULT_MODEL_NAME = "maskssd-face-mask"
CHAMPION = "champion"


def download_model(ref: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The maskssd checkpoint inside a logged or registered model (``runs:/...``, ``models:/...``), or a run's
    checkpoint artifact itself (``runs:/RUN/checkpoints/best.pt``), downloaded.

    Without ``cache_dir`` the file is kept by its content in the user cache (``~/.cache/maskssd/models/``): the
    same model downloaded again lands on the same path, so the ONNX and int8 models built next to it on the
    first start are found again on the next (building int8 takes seconds; ``models:/NAME@champion`` names
    another file once the alias moves, its own content)."""
    runs.client(tracking_uri, create=False)
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="maskssd-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst)))
    except Exception as e:  # MlflowException, missing alias, unreachable server ...
        raise MaskSSDError(f"cannot load model {ref}: {e}") from None
    if local.is_file() and local.suffix == ".pt":  # a checkpoint artifact: runs:/RUN/checkpoints/best.pt
        found = [local]
    else:
        found = sorted(local.rglob("artifacts/*.pt")) or sorted(local.rglob("*.pt"))
    if not found:
        raise MaskSSDError(f"model {ref} holds no maskssd checkpoint (looked in {local})")
    return found[0] if cache_dir else _kept_by_content(found[0], dst)


def _kept_by_content(path: Path, download_dir: Path) -> Path:
    """``path`` copied to ``~/.cache/maskssd/models/<sha256 prefix>/<name>`` (kept if already there) and the
    download folder removed; ``path`` itself where the user cache cannot be written."""
    import hashlib
    import shutil

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    kept = user_cache("models", h.hexdigest()[:16], path.name)
    try:
        if not kept.is_file():
            with atomic_path(kept) as tmp:  # a concurrent start finds the whole file or none
                shutil.copyfile(path, tmp)
    except OSError:
        return path
    shutil.rmtree(download_dir, ignore_errors=True)
    return kept


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


def final_metric(metrics: Mapping[str, float], name: str) -> float | None:
    """A run's final (selected-checkpoint) metric ``name``, whichever naming the run was logged with:
    ``val_map`` and ``best_val_map`` both mean the selected checkpoint's validation mAP (older runs logged it as
    ``best_val_map`` beside a per-epoch ``val_map``)."""
    bare = name.removeprefix("best_")
    for key in (f"best_{bare}", bare) if bare.startswith("val_") else (name, bare):
        if key in metrics:
            return float(metrics[key])
    return None


def _metric(c: mlflow.runs.MlflowClient, run_id: str, metric: str) -> float:
    value = final_metric(c.get_run(run_id).data.metrics, metric)
    return float("nan") if value is None else float(value)


@dataclass
class Selection:
    """What :func:`select_best` compared: the winner among the finished runs with a model and the metric."""

    run_id: str
    experiment: str
    metric: str
    compared: int  # runs with a model and the metric
    configs: dict[str, int]  # config_hash -> runs: several configs mean a choice across recipes
    skipped_no_model: int

    def describe(self) -> str:
        hashes = [f"{h or 'untagged'} x{n}" for h, n in self.configs.items()]
        mixed = (
            f"{len(hashes)} configs ({', '.join(hashes)})" if len(hashes) > 1 else f"one config ({hashes[0]})"
        )
        text = (
            f"best of {self.compared} finished runs with a model in experiment {self.experiment!r} "
            f"by {self.metric}, {mixed}"
        )
        if self.skipped_no_model:
            text += f"; {self.skipped_no_model} runs without a model not considered"
        return text


def select_best(
    c: mlflow.runs.MlflowClient,
    experiment: str,
    metric: str,
    maximize: bool = True,
    require_model: bool = True,
) -> Selection:
    """The finished run of an experiment with the best ``metric`` (that logged a model), and what it was
    compared with; ``metric`` is read with :func:`final_metric`, so runs of either naming compete. Picking the
    best of several seeds of one config on validation flatters it: compare configs with ``maskssd compare``."""
    found = [
        (value, r)
        for r in runs.runs_table(c, experiment, max_results=1000)
        if r.info.status == "FINISHED"
        and (value := final_metric(r.data.metrics, metric)) is not None
        and not math.isnan(value)
    ]
    found.sort(key=lambda vr: vr[0], reverse=maximize)
    with_model = [r for _, r in found if not require_model or _has_model(c, r.info.run_id)]
    if not with_model:
        raise MaskSSDError(f"no finished run with a model and metric {metric!r} in experiment {experiment!r}")
    configs: dict[str, int] = {}
    for r in with_model:
        h = r.data.tags.get("config_hash", "")
        configs[h] = configs.get(h, 0) + 1
    return Selection(
        with_model[0].info.run_id, experiment, metric, len(with_model), configs, len(found) - len(with_model)
    )


def best_run(
    c: mlflow.runs.MlflowClient,
    experiment: str,
    metric: str,
    maximize: bool = True,
    require_model: bool = True,
) -> str:
    """The run id :func:`select_best` chooses."""
    return select_best(c, experiment, metric, maximize, require_model).run_id


def _has_model(c: mlflow.runs.MlflowClient, run_id: str) -> bool:
    """Whether the run logged a model (MLflow 3 keeps logged models beside, not inside, run artifacts)."""
    return logged_model_id(c, run_id) is not None


def logged_model_id(c: mlflow.runs.MlflowClient, run_id: str, name: str = "model") -> str | None:
    """The id of the model ``name`` the run logged (the newest, if it logged several), or None."""
    exp = c.get_run(run_id).info.experiment_id
    found = c.search_logged_models(
        experiment_ids=[exp],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return found[0].model_id if found else None


def promote(
    run_id: str,
    name: str = DEFAULT_MODEL_NAME,
    metric: str = "val_map",
    maximize: bool = True,
    force: bool = False,
    tracking_uri: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Promotion:
    """Register the run's logged model (``models:/MODEL_ID``) as a new version with lineage tags; move
    ``champion`` if it is better."""
    c = runs.client(tracking_uri, create=False)
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
        **{
            k: f"{final_metric(m, k):.6f}"
            for k in m
            if k.startswith(("val_", "best_val_", "test_")) and "loss" not in k
        },
        **{k: v for k, v in t.items() if k in ("study", "trial")},
        **(extra_tags or {}),
    }
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(
            name, description="maskssd face-mask detector (SSD); see version tags for lineage"
        )
    model_id = logged_model_id(c, run_id)
    if model_id is None:
        raise MaskSSDError(f"run {run_id} logged no model to register")
    mv = mlflow.register_model(f"models:/{model_id}", name, tags={**tags, "model_id": model_id})
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
