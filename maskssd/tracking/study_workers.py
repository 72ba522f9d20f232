"""Several study workers on one machine: ``maskssd study CONFIG --workers N``.

The launching process opens the study (storage, study, MLflow parent run) once, then starts N worker
processes (``spawn``: a fresh interpreter each, nothing inherited from the parent's threads or open
connections) that each give torch ``cores // N`` threads and work on the study until its shared budget is
spent, like N ``maskssd study`` commands started by hand (but with the sampler's seed offset by the worker's
index, so that seeded workers do not draw the same trials). On 2 cores, two one-thread trainings give more
images per second than one two-thread training (1.29x for two one-thread DDP processes, README), and each
worker keeps its decoded images between its trials (:mod:`maskssd.data.image_cache`). When all have returned,
the launching process writes the report.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from maskssd.errors import MaskSSDError
from maskssd.tracking.studies import StudyOutcome, open_for_work, outcome, work_on

__all__ = ["default_threads", "run_study_workers"]

log = logging.getLogger(__name__)


def default_threads(workers: int) -> int:
    """Torch threads per worker: the cores this process may use, shared evenly (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(workers, 1))


def _worker(index: int, threads: int, config: str, kwargs: dict[str, Any], timeout: float | None) -> None:
    """One worker process: its own threads, allocator setting and log lines, then the study's shared loop."""
    import torch

    from maskssd.runtime import tune_cpu_allocator

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[worker {index}] %(message)s"))
    root = logging.getLogger("maskssd")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    tune_cpu_allocator()
    torch.set_num_threads(threads)
    try:
        work_on(open_for_work(config, worker=index, **kwargs), timeout)
    except KeyboardInterrupt:
        sys.exit(130)


def run_study_workers(
    config: str | Path,
    *,
    workers: int,
    threads: int | None = None,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    tracking_uri: str | None = None,
    timeout: float | None = None,
    report: bool = True,
) -> StudyOutcome:
    """Work on a study with ``workers`` local processes of ``threads`` torch threads each (default: cores //
    workers); they share its storage and budget. Returns the outcome once every worker has stopped."""
    if workers < 1:
        raise MaskSSDError(f"--workers must be at least 1, got {workers}")
    kwargs = {
        "n_trials": n_trials,
        "storage": storage,
        "study_name": study_name,
        "tracking_uri": tracking_uri,
    }
    opened = open_for_work(config, **kwargs)  # storage, study and parent run created once, before the workers
    threads = threads or default_threads(workers)
    log.info("study %s: %d workers x %d torch threads", opened.cfg.study.name, workers, threads)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, threads, str(config), kwargs, timeout),
            name=f"maskssd-study-worker-{i}",
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    _join(procs)
    codes = [p.exitcode for p in procs]
    if any(code in (130, -signal.SIGINT, -signal.SIGTERM) for code in codes):
        raise KeyboardInterrupt
    if any(codes):
        raise MaskSSDError(f"study workers exited with status {codes} (their errors are above)")
    return outcome(opened, report)


def _join(procs: list[Any]) -> None:
    """Wait for the workers. SIGTERM is passed on to them (each saves and fails its running trial, as one
    ``maskssd study`` does); Ctrl-C reaches them anyway (one process group), so they are given time to stop."""

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main else None
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=60)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
