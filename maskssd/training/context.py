"""One run's context, built once by whoever starts the run (``maskssd train``, a study trial, a test): the
config, where it reports (a :class:`~maskssd.training.tracker.Tracker`; non-main distributed ranks get the
no-op one), where its checkpoints live (a :class:`~maskssd.training.store.CheckpointStore`), the distributed
setting, the device, and what it calls back (evaluation hooks, progress)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskssd.training import distributed
from maskssd.training.config import ExperimentConfig
from maskssd.training.engine import TrainProgress
from maskssd.training.store import CheckpointStore, LocalCheckpoints, ReadOnlyCheckpoints
from maskssd.training.tracker import NullTracker, Tracker

__all__ = ["EvalHook", "RunContext"]

#: Called with ``(epoch, metrics)`` at every evaluation epoch (Optuna pruning); may raise to stop the run.
EvalHook = Callable[[int, dict[str, float]], None]


@dataclass
class RunContext:
    """Everything a run needs besides what it builds from its config."""

    cfg: ExperimentConfig
    tracker: Tracker
    store: CheckpointStore
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    on_eval: list[EvalHook] = field(default_factory=list)
    progress: TrainProgress | None = None
    log_model: bool = True
    resuming: bool = False

    @classmethod
    def build(
        cls,
        cfg: ExperimentConfig,
        tracker: Tracker,
        store: CheckpointStore,
        *,
        dist: distributed.DistInfo | None = None,
        device: torch.device | None = None,
        on_eval: list[EvalHook] | None = None,
        progress: TrainProgress | None = None,
        log_model: bool = True,
        resuming: bool = False,
    ) -> RunContext:
        """The context of this process: on a non-main rank the tracker records nothing, the store writes
        nothing, and there are no hooks and no progress (rank 0 does all of that)."""
        dist = dist or distributed.DistInfo()
        main = dist.is_main
        return cls(
            cfg,
            tracker if main else NullTracker(tracker.run_id),
            store if main else ReadOnlyCheckpoints(store),
            dist,
            device or torch.device("cpu"),
            list(on_eval or []) if main else [],
            progress if main else None,
            log_model,
            resuming,
        )

    @classmethod
    def untracked(cls, cfg: ExperimentConfig, local_dir: str | Path, **kwargs: object) -> RunContext:
        """A run that records nothing, its checkpoints in ``local_dir`` (tests, scripts)."""
        return cls.build(cfg, NullTracker(), LocalCheckpoints(local_dir), **kwargs)  # type: ignore[arg-type]

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @property
    def is_main(self) -> bool:
        return self.dist.is_main
