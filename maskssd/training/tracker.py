"""What the training layer needs from a tracker, as a protocol: the runner and the engine report through it
and never see MLflow (:class:`maskssd.tracking.runs.MlflowRun` implements it; :class:`NullTracker` drops
everything, for runs that record nothing). Checkpoints are not the tracker's: they go through a
:class:`~maskssd.training.store.CheckpointStore`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["DatasetInfo", "NullTracker", "RunLogger", "SplitMetrics", "Tracker", "WritesNothing"]


@dataclass(frozen=True)
class DatasetInfo:
    """One split a run saw, as lineage: MLflow logs it as a run input and keys the model's metrics by it."""

    name: str  # e.g. "face-mask-detection/paper/val"
    digest: str  # the split lists' hash (maskssd.data.split_digest)
    source: str  # the dataset root
    split: str  # train, val or test (the input's context)
    profile: Mapping[str, Any] = field(default_factory=dict)  # images and boxes per class


@dataclass(frozen=True)
class SplitMetrics:
    """The selected checkpoint's metrics on one split: logged with the model and that split's dataset."""

    dataset: DatasetInfo | None
    metrics: Mapping[str, float]


class RunLogger(Protocol):
    """Where the engine reports every epoch."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...


class Tracker(RunLogger, Protocol):
    """One tracked run, as the runner sees it: params, tags, metrics, artifacts, and the logged model."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None: ...

    def log_figure(self, path: Path, artifact_path: str = "plots") -> None: ...

    def log_datasets(self, datasets: Sequence[DatasetInfo]) -> None:
        """The splits the run trains and evaluates on (lineage: what the run saw)."""
        ...

    def log_model(
        self,
        checkpoint: Path,
        tags: Mapping[str, str],
        *,
        evaluations: Sequence[SplitMetrics] = (),
        step: int = 0,
    ) -> str | None:
        """Log the deployable model and its final metrics (``evaluations``, at ``step``) linked to it and to
        their datasets; returns the model's URI."""
        ...


class WritesNothing:
    """Every write of a :class:`Tracker` as a no-op: the base of :class:`NullTracker`, and of the tracking
    layer's read-only run for non-zero distributed ranks."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def log_figure(self, path: Path, artifact_path: str = "plots") -> None:
        pass

    def log_datasets(self, datasets: Sequence[DatasetInfo]) -> None:
        pass

    def log_model(
        self,
        checkpoint: Path,
        tags: Mapping[str, str],
        *,
        evaluations: Sequence[SplitMetrics] = (),
        step: int = 0,
    ) -> str | None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        pass


class NullTracker(WritesNothing):
    """Records nothing: the engine and runner work the same without a tracking store."""

    def __init__(self, run_id: str = "untracked"):
        self.run_id = run_id
