"""MLflow tracking: where runs go, and one run's params, metrics, checkpoints, plots and model.

The default store is ``sqlite:///mlruns/mlflow.db`` in the project's root folder (found from the working directory
up: :func:`maskssd.runtime.project_root`) with artifacts under ``mlruns/artifacts``; ``MLFLOW_TRACKING_URI``
(or ``--tracking-uri``) selects any other store or a tracking server. Commands that only read
(``client(create=False)``) never create a store: they say which one they looked for.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow retries an HTTP request 7 times with a backoff factor of 2 (~4 min) before it gives up. A training run
# does not wait on its server (maskssd.tracking.buffered holds what it logs while the server is away), so one
# short retry is enough; both stay yours to set.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from maskssd.errors import MaskSSDError  # noqa: E402
from maskssd.runtime import PROJECT_ENV, local_dir  # noqa: E402
from maskssd.tracking import lineage  # noqa: E402
from maskssd.tracking.lineage import git_info  # noqa: E402, F401 - runs.git_info: the studies' parent runs
from maskssd.training.store import LocalCheckpoints  # noqa: E402
from maskssd.training.tracker import DatasetInfo, SplitMetrics, WritesNothing  # noqa: E402

T = TypeVar("T")
MAX_PARAM_LENGTH = 6000


def default_tracking_uri() -> str:
    return f"sqlite:///{(local_dir() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(uri: str | None = None, create: bool = True) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the project's SQLite store under ``mlruns/``.
    ``create=False`` (a command that only reads): a SQLite store that does not exist is an error naming it."""
    given = uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = given or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not create and not db.is_file():
            how = (
                "as given"
                if given
                else f"the project's store, looked for from {Path.cwd()} up: mlruns/, pyproject.toml or .git mark "
                f"a project's folder, ${PROJECT_ENV} names one"
            )
            raise MaskSSDError(
                f"no MLflow store at {db} ({how}); run maskssd from the project's folder, or pass --tracking-uri "
                "(or set MLFLOW_TRACKING_URI) to the store or server the runs are in"
            )
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


@contextlib.contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first opening of a SQLite store across processes (study workers starting at once would
    otherwise race to create its schema). SQLite files are local, so a file lock beside them is enough."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init-lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_store(uri: str, make: Callable[[], T]) -> T:
    """Open a store whose schema may not exist yet: SQLite under a file lock; a database server retried when
    another process was creating the same schema at the same moment ("already exists", "duplicate key")."""
    if uri.startswith(("postgresql", "postgres:")):
        from maskssd.extras import require

        require("postgres", "a PostgreSQL store")
    with sqlite_init_lock(uri):
        for attempt in range(6):
            try:
                return make()
            except Exception as e:  # noqa: BLE001 - only the schema race is retried
                if attempt == 5 or not any(w in str(e) for w in ("already exists", "duplicate key")):
                    raise
                time.sleep(0.5 + 0.5 * attempt)
    raise AssertionError("unreachable")


def client(uri: str | None = None, create: bool = True) -> MlflowClient:
    """An MLflow client on the resolved store (also made the process-wide tracking and registry URI);
    ``create=False`` for commands that only read: they never create an empty store."""
    uri = resolve_tracking_uri(uri, create)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return open_store(uri, lambda: MlflowClient(uri, registry_uri=uri))


def _local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to it (``mlruns/artifacts``); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


#: Tags of every experiment maskssd creates or uses. MLflow 3's UI opens an experiment without a kind in its
#: GenAI view (traces, judges); this kind opens it on its training runs and models. Its description states the
#: one convention of numbers: MLflow holds fractions, maskssd prints percent.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "maskssd runs: SSD face-mask detectors. Metrics are fractions in [0, 1] (val_map 0.912); maskssd's "
        "terminal tables and docs print the same numbers as percent (91.2). val_* are the selected checkpoint "
        "on validation, test_* the final test evaluation, val/* and train/* the per-epoch curves."
    ),
}


def experiment_id(c: MlflowClient, name: str) -> str:
    """The id of experiment ``name`` (created, or restored when deleted), with :data:`EXPERIMENT_TAGS` set."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        root = _local_artifact_root(c.tracking_uri)
        location = f"{root}/{name.replace('/', '_')}" if root else None
        try:
            exp_id = c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:  # created by a concurrent worker in the meantime
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            return exp_id
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    if exp.tags.get("mlflow.experimentKind") is None:  # made by an older maskssd, or by hand: keep its note
        c.set_experiment_tag(
            exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_TAGS["mlflow.experimentKind"]
        )
        if not exp.tags.get("mlflow.note.content"):
            c.set_experiment_tag(
                exp.experiment_id, "mlflow.note.content", EXPERIMENT_TAGS["mlflow.note.content"]
            )
    return exp.experiment_id


class MlflowRun:
    """One MLflow run, seen by the runner and the engine as a :class:`maskssd.training.tracker.Tracker`."""

    def __init__(self, c: MlflowClient, run_id: str):
        self.client, self.run_id = c, run_id

    @classmethod
    def start(
        cls,
        c: MlflowClient,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> MlflowRun:
        tags = lineage.run_context(tags)  # user, source, entry point's git: what mlflow.start_run would set
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=tags)
        return cls(c, run.info.run_id)

    @classmethod
    def resume(cls, c: MlflowClient, run_id: str) -> MlflowRun:
        try:
            c.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise MaskSSDError(f"no MLflow run {run_id} in {c.tracking_uri}") from None
        c.update_run(run_id, status="RUNNING")
        return cls(c, run_id)

    # ------------------------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params in batches; a run shared by processes (a study's parent) may see the same batch written by
        another at the same moment (:func:`~maskssd.tracking.lineage.unique_race`)."""
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            batch = items[i : i + 100]
            lineage.unique_race(
                lambda batch=batch: self.client.log_batch(self.run_id, params=batch),
                f"params of run {self.run_id}",
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(d), artifact_file)

    def log_figure(self, path: Path, artifact_path: str = "plots") -> None:
        self.log_artifact(path, artifact_path)

    def log_datasets(self, datasets: Sequence[DatasetInfo]) -> None:
        lineage.log_datasets(self.client, self.run_id, datasets)

    def log_model(
        self,
        checkpoint: Path,
        tags: Mapping[str, str],
        *,
        evaluations: Sequence[SplitMetrics] = (),
        step: int = 0,
    ) -> str | None:
        return log_model(self, checkpoint, tags, evaluations=evaluations, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        if status not in RunStatus.all_status() and status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(status)
        self.client.set_terminated(self.run_id, status)

    # ----------------------------------------------------------------------------------- reading
    def download(self, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=self.run_id,
                    artifact_path=artifact_path,
                    dst_path=str(dst),
                    tracking_uri=self.client.tracking_uri,
                )
            )
        except (mlflow.exceptions.MlflowException, OSError) as e:
            raise MaskSSDError(f"run {self.run_id} has no artifact {artifact_path!r} ({e})") from None

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]


class ReadOnlyRun(WritesNothing, MlflowRun):
    """A run seen by a non-zero distributed rank: it may read artifacts, it writes nothing."""


class MlflowCheckpoints(LocalCheckpoints):
    """A run's checkpoints: written in a local folder, published as the run's ``checkpoints/<kind>.pt``
    artifacts, found again on resume in the local folder first, else downloaded (another machine)."""

    def __init__(self, run: Any, local_dir: str | Path):  # an MlflowRun, or the BufferedRun over it
        super().__init__(local_dir)
        self.run = run

    def publish(self, kind: str) -> None:
        self.run.log_artifact(self.path(kind), "checkpoints")

    def fetch(self, kind: str) -> Path | None:
        local = super().fetch(kind)
        if local is not None:
            return local
        try:
            return self.run.download(f"checkpoints/{kind}.pt", self.local_dir / "downloaded")
        except MaskSSDError:
            return None


def log_model(
    run: MlflowRun,
    deploy_checkpoint: Path,
    extra_tags: Mapping[str, str] | None = None,
    *,
    evaluations: Sequence[SplitMetrics] = (),
    step: int = 0,
) -> str:
    """Log the detector as an MLflow pyfunc model named ``model``; returns its URI, ``models:/<model_id>``
    (``runs:/RUN_ID/model`` loads it too), and logs ``evaluations`` linked to the model and their datasets.

    The model is self-contained: its weights (``artifacts/checkpoint.pt``, with the per-class thresholds),
    the maskssd code, a signature (one row per detection out; a ``score_threshold`` param) and an input
    example in the form ``mlflow models serve`` takes (a base64 PNG in column ``image``). Its input has no
    schema on purpose: it takes encoded images and uint8 arrays alike (:mod:`maskssd.deploy.model_input`).
    """
    import torch
    import torchvision

    import maskssd

    code = Path(maskssd.__file__).parent
    active_before = mlflow.get_active_model_id()
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code / "deploy" / "pyfunc.py"),
            artifacts={"checkpoint": str(deploy_checkpoint)},
            code_paths=[str(code)],
            signature=_model_signature(),
            input_example=_input_example(),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                "timm",
                "numpy",
                "numba",
                "pillow",
                "pandas",
                "defusedxml",
                "pydantic",
                "rich",
            ],
            tags=dict(extra_tags or {}),
        )
    run.client.update_run(
        run.run_id, status="RUNNING"
    )  # the fluent context closed it; the caller finishes it
    # validating the input example loaded the model, which made it MLflow's "active model": every metric
    # logged later in this process (system metrics, the next trial's) would be linked to it
    with _quiet("mlflow.tracking.fluent"):  # MLflow says so at INFO: noise at the end of every run
        if active_before is None:
            mlflow.clear_active_model()
        else:
            mlflow.set_active_model(model_id=active_before)
    log_model_metrics(run.client, run.run_id, info.model_id, evaluations, step)
    return info.model_uri


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only warnings and errors from ``logger`` while inside."""
    import logging

    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


def log_model_metrics(
    c: MlflowClient, run_id: str, model_id: str, evaluations: Sequence[SplitMetrics], step: int = 0
) -> None:
    """Metrics of a logged model on its datasets: the run's metrics too, and the model's (Models tab,
    ``search_logged_models(order_by=[{"field_name": "metrics.val_map", ...}])``)."""
    ts = int(time.time() * 1000)
    items = [
        Metric(
            k,
            float(v),
            ts,
            step,
            model_id=model_id,
            dataset_name=e.dataset.name if e.dataset else None,
            dataset_digest=e.dataset.digest if e.dataset else None,
        )
        for e in evaluations
        for k, v in e.metrics.items()
    ]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i : i + 500])


def _model_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema(
            [
                ColSpec("long", "image_index"),
                ColSpec("double", "x1"),
                ColSpec("double", "y1"),
                ColSpec("double", "x2"),
                ColSpec("double", "y2"),
                ColSpec("string", "label"),
                ColSpec("double", "score"),
            ]
        ),
        params=ParamSchema([ParamSpec("score_threshold", "double", None)]),
    )


def _input_example() -> Any:
    """One small PNG, base64, in column ``image``: what a client of ``mlflow models serve`` sends."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def ui_link(run_id: str, tracking_uri: str | None = None) -> str:
    """Where to see a run in the MLflow UI, in its model-training view: the server's page, or for a local store
    the ``mlflow ui`` command and the page it serves."""
    c = client(tracking_uri, create=False)
    exp = c.get_run(run_id).info.experiment_id
    page = f"#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
    if c.tracking_uri.startswith(("http://", "https://")):
        return f"{c.tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {c.tracking_uri}, then http://127.0.0.1:5000/{page}"


def runs_table(
    c: MlflowClient,
    experiment: str | None = None,
    max_results: int = 200,
    order_by: Iterable[str] = ("attributes.start_time DESC",),
) -> list[Any]:
    """Runs of one experiment (or all), newest first."""
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise MaskSSDError(f"no MLflow experiment named {experiment!r} in {c.tracking_uri}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(ids, max_results=max_results, order_by=list(order_by))


def download_detections(ref: str, split: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """A saved-detections file: ``ref`` itself when it is a file, else run ``ref``'s ``detections/<split>.json``
    (the selected checkpoint's detections, saved by every run that finished its final evaluation)."""
    if Path(ref).is_file():
        return Path(ref)
    c = client(tracking_uri, create=False)
    try:
        c.get_run(ref)
    except mlflow.exceptions.MlflowException:
        raise MaskSSDError(
            f"{ref!r} is neither a detections file nor an MLflow run in {c.tracking_uri}"
        ) from None
    names = {Path(a.path).name for a in c.list_artifacts(ref, "detections")}
    if f"{split}.json" not in names:
        have = ", ".join(sorted(n.removesuffix(".json") for n in names)) or "none"
        raise MaskSSDError(
            f"run {ref} has no saved detections for split {split!r} (saved: {have}); runs save them at the end "
            "of training, or use maskssd evaluate --save-detections and pass the file"
        )
    return MlflowRun(c, ref).download(f"detections/{split}.json", Path(dst) / ref)
