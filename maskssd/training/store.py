"""Where a run's checkpoints live: written locally every epoch (atomically), published to the run's tracking
store every ``train.save_every`` epochs and at the end, and found again on resume, the local copy first.

The engine and the runner see a :class:`CheckpointStore`; :class:`LocalCheckpoints` is the one for untracked
runs, and the tracking layer's MLflow store (:class:`maskssd.tracking.runs.MlflowCheckpoints`) publishes
each file as a run artifact and downloads it where the local copy is missing (another machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from maskssd.ssd.checkpoint import atomic_save

__all__ = ["CheckpointStore", "LocalCheckpoints", "ReadOnlyCheckpoints"]


class CheckpointStore(Protocol):
    """A run's checkpoints by kind (``last``, ``best``, ``model``)."""

    local_dir: Path

    def save(self, ckpt: dict[str, Any], kind: str, *, publish: bool = True) -> Path:
        """Write ``<local_dir>/<kind>.pt`` atomically; with ``publish``, also keep it with the run."""
        ...

    def publish(self, kind: str) -> None:
        """Keep the local ``<kind>.pt`` with the run (a no-op where there is nowhere else to keep it)."""
        ...

    def fetch(self, kind: str) -> Path | None:
        """The run's ``<kind>.pt`` as a local file (the local copy, else the published one), or None."""
        ...


class LocalCheckpoints:
    """Checkpoints in one local folder, published nowhere else (untracked runs, tests)."""

    def __init__(self, local_dir: str | Path):
        self.local_dir = Path(local_dir)

    def path(self, kind: str) -> Path:
        return self.local_dir / f"{kind}.pt"

    def save(self, ckpt: dict[str, Any], kind: str, *, publish: bool = True) -> Path:
        path = atomic_save(ckpt, self.path(kind))
        if publish:
            self.publish(kind)
        return path

    def publish(self, kind: str) -> None:
        pass

    def fetch(self, kind: str) -> Path | None:
        path = self.path(kind)
        return path if path.is_file() else None


class ReadOnlyCheckpoints:
    """A store seen by a non-zero distributed rank: it finds checkpoints (resume), it writes none (rank 0 does)."""

    def __init__(self, store: CheckpointStore):
        self.store, self.local_dir = store, store.local_dir

    def save(self, ckpt: dict[str, Any], kind: str, *, publish: bool = True) -> Path:
        return self.local_dir / f"{kind}.pt"

    def publish(self, kind: str) -> None:
        pass

    def fetch(self, kind: str) -> Path | None:
        return self.store.fetch(kind)
