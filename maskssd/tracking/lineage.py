"""A run's lineage in MLflow's own terms: who ran which code from where (MLflow's run-context resolution plus
the git state of the maskssd code), which data it saw (the splits as MLflow dataset inputs, whose digest is
the split hash) and, opt-in, the machine's system metrics while it ran.

These are what the MLflow UI shows as a run's *Created by*, *Source*, *Git commit* and *Datasets*, and what
``search_runs`` filters on (``dataset.digest = '...'``, ``dataset.name = '...'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from maskssd.training.tracker import DatasetInfo

__all__ = ["CONTEXT_TAG", "dataset_input", "git_info", "log_datasets", "run_context", "system_metrics"]

log = logging.getLogger(__name__)

#: MLflow's tag naming a dataset input's role ("train", "val", "test": the split).
CONTEXT_TAG = "mlflow.data.context"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- run context
def run_context(tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow's run-context tags (``mlflow.user``, ``mlflow.source.name``/``type``, git of the entry point)
    under ``tags`` (which win), as ``mlflow.start_run`` would set them; the client API does not."""
    from mlflow.tracking.context.registry import resolve_tags

    return dict(resolve_tags(dict(tags or {})))


def git_info(path: str | Path = _PACKAGE_DIR) -> dict[str, str]:
    """Git commit, branch, remote URL and dirtiness of the checkout holding ``path`` (the maskssd code by
    default), under MLflow's tag names; empty outside a git checkout."""
    from mlflow.utils import mlflow_tags as t
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    where = str(path)
    commit = get_git_commit(where)
    if not commit:
        return {}
    out = {
        t.MLFLOW_GIT_COMMIT: commit,
        t.MLFLOW_GIT_BRANCH: get_git_branch(where) or "",
        t.MLFLOW_GIT_REPO_URL: get_git_repo_url(where) or "",
    }
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where if Path(where).is_dir() else str(Path(where).parent),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        out[t.MLFLOW_GIT_DIRTY] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------------------------------------- datasets
def dataset_input(info: DatasetInfo) -> DatasetInput:
    """A split as an MLflow dataset input: name, digest (the split hash), source (the data root), profile
    (images and boxes per class), context (the split)."""
    dataset = Dataset(
        name=info.name,
        digest=info.digest,
        source_type="local",
        source=json.dumps({"uri": info.source}),
        profile=json.dumps(dict(info.profile)),
    )
    return DatasetInput(dataset=dataset, tags=[InputTag(key=CONTEXT_TAG, value=info.split)])


def unique_race(call: Callable[[], Any], what: str, tries: int = 3) -> Any:
    """``call()``, tried again when the store refuses an insert on a unique constraint: two processes on one
    store (a study's workers) both found a row missing (a split's dataset, a shared run's param) and both
    inserted it. The row exists by then, and MLflow takes the same value again. Any other error is raised."""
    for attempt in range(1, tries + 1):
        try:
            return call()
        except MlflowException as e:
            if attempt == tries or "unique constraint" not in str(e).lower():
                raise
            log.info("%s: written by another process meanwhile; trying again", what)
            time.sleep(0.05 * attempt)
    return None


def log_datasets(client: MlflowClient, run_id: str, datasets: Sequence[DatasetInfo]) -> None:
    """Log the splits as the run's dataset inputs (two runs starting together may both create a split's
    dataset: :func:`unique_race`)."""
    if datasets:
        inputs = [dataset_input(d) for d in datasets]
        unique_race(lambda: client.log_inputs(run_id, datasets=inputs), f"dataset inputs of run {run_id}")


# ------------------------------------------------------------------------------------- system metrics
@contextlib.contextmanager
def system_metrics(
    run_id: str, tracking_uri: str, enabled: bool, resume: bool = False, interval_s: float = 10.0
) -> Iterator[Any]:
    """While inside, sample CPU, memory, disk, network (and GPU) into the run as ``system/*`` metrics (MLflow's
    monitor, every ``interval_s`` seconds or ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``); a no-op unless
    ``enabled``. Needs ``psutil`` (a maskssd dependency)."""
    if not enabled:
        yield None
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=tracking_uri
    )
    monitor.start()
    log.info("system metrics: sampling every %g s into the run (system/*)", monitor.sampling_interval)
    try:
        yield monitor
    finally:
        monitor.finish()
