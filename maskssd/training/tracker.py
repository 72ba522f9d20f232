"""What the training layer needs from a tracker, as a protocol: the runner and the engine report through it
and never see MLflow (:class:`maskssd.tracking.runs.MlflowRun` implements it; :class:`NullTracker` drops
everything, for runs that record nothing)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from maskssd.errors import MaskSSDError

__all__ = ["NullTracker", "RunLogger", "Tracker"]


class RunLogger(Protocol):
    """Where the engine reports every epoch."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_checkpoint(self, path: Path, kind: str) -> None: ...


class Tracker(RunLogger, Protocol):
    """One tracked run, as the runner sees it: params, tags, metrics, artifacts, and the logged model."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None: ...

    def log_figure(self, path: Path, artifact_path: str = "plots") -> None: ...

    def download(self, artifact_path: str, dst: str | Path) -> Path: ...

    def log_model(self, checkpoint: Path, tags: Mapping[str, str]) -> str | None: ...


class NullTracker:
    """Records nothing: the engine and runner work the same without a tracking store."""

    def __init__(self, run_id: str = "untracked"):
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_checkpoint(self, path: Path, kind: str) -> None:
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

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        raise MaskSSDError(f"untracked run: no artifact {artifact_path!r}")

    def log_model(self, checkpoint: Path, tags: Mapping[str, str]) -> str | None:
        return None
