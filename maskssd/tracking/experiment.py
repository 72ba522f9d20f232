"""One experiment as one MLflow run: start or resume the run, tag its lineage, train it through
:func:`maskssd.training.runner.train_experiment`, and leave the run FINISHED, FAILED or KILLED.

This is what ``maskssd train`` and every study trial call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from maskssd.errors import NonFiniteLossError, RunStopped, TrainingInterrupted
from maskssd.tracking import lineage, runs
from maskssd.tracking.buffered import BufferedRun
from maskssd.training import distributed
from maskssd.training.build import checkpoint_root
from maskssd.training.config import ExperimentConfig, validate
from maskssd.training.context import EvalHook, RunContext
from maskssd.training.engine import TrainProgress
from maskssd.training.predict import resolve_device
from maskssd.training.runner import RunResult, sigterm_as_interrupt, train_experiment

__all__ = ["run_experiment"]

log = logging.getLogger(__name__)


def run_experiment(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    on_eval: list[EvalHook] | None = None,
    progress: TrainProgress | None = None,
    log_model: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> RunResult:
    """Train, evaluate and record one run; exceptions mark the run FAILED/KILLED and propagate.

    Under torchrun (``WORLD_SIZE`` > 1) every rank trains; rank 0 alone owns the MLflow run. A process group
    already set up by the caller (several seeds in one torchrun job) is used and left as it is. ``progress``
    (the CLI's bar) hears how training goes.
    """
    info = distributed.DistInfo.from_env()
    owns_group = info.enabled and not distributed.active()
    device = (
        distributed.setup(info, cfg.experiment.device)
        if info.enabled
        else resolve_device(cfg.experiment.device)
    )
    try:
        run, cfg = _open_run(cfg, info, tracking_uri, run_name, resume_run_id, parent_run_id, tags)
        if on_start is not None and info.is_main:
            on_start(run.run_id)
        local = checkpoint_root() / run.run_id
        tracker = BufferedRun(run, local / "pending-tracking.jsonl")  # training does not wait on the store
        store = runs.MlflowCheckpoints(tracker, local)
        ctx = RunContext.build(
            cfg,
            tracker,
            store,
            dist=info,
            device=device,
            on_eval=on_eval,
            progress=progress,
            log_model=log_model,
            resuming=resume_run_id is not None,
        )
        return _tracked(ctx, run, tracker)
    finally:
        if owns_group:
            distributed.teardown()


def _open_run(
    cfg: ExperimentConfig,
    info: distributed.DistInfo,
    tracking_uri: str | None,
    run_name: str | None,
    resume_run_id: str | None,
    parent_run_id: str | None,
    tags: Mapping[str, str] | None,
) -> tuple[runs.MlflowRun, ExperimentConfig]:
    """The run (new, or the resumed one with its own config); other ranks get a read-only view of it."""
    client = runs.client(tracking_uri)
    run: runs.MlflowRun | None = None
    if info.is_main:
        if resume_run_id:
            run = runs.MlflowRun.resume(client, resume_run_id)
        else:
            run = runs.MlflowRun.start(client, cfg.experiment.name, run_name, tags, parent_run_id)
    run_id = distributed.broadcast_object(run.run_id if run else None)
    if run is None:  # other ranks read the run (config, checkpoints) but never write to it
        run = runs.ReadOnlyRun(client, run_id)
    if resume_run_id:
        with tempfile.TemporaryDirectory() as tmp:
            text = run.download("config.json", tmp).read_text()
        cfg = validate(json.loads(text), f"run {resume_run_id} config.json")
    log.info(  # every rank logs; the CLI shows rank 0's INFO lines only
        "MLflow run %s in experiment %s (%s)%s",
        run.run_id,
        cfg.experiment.name,
        client.tracking_uri,
        f", {info.world} processes" if info.enabled else "",
    )
    return run, cfg


def _source_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The code's lineage: the git state of the maskssd code, under MLflow's tag names (the data's is logged by
    the runner), the config's own tags and its description."""
    tags = {**lineage.git_info(Path(__file__).resolve().parent), **cfg.experiment.tags}
    if cfg.experiment.description:
        tags["mlflow.note.content"] = cfg.experiment.description
    return tags


def _tracked(ctx: RunContext, run: runs.MlflowRun, tracker: BufferedRun) -> RunResult:
    cfg, info = ctx.cfg, ctx.dist
    try:
        if not ctx.resuming:
            tracker.set_tags(_source_tags(cfg))  # a no-op on the read-only run of the other ranks
        monitor = lineage.system_metrics(
            run.run_id,
            run.client.tracking_uri,
            cfg.train.system_metrics and info.is_main,
            resume=ctx.resuming,
        )
        with sigterm_as_interrupt(), monitor:
            result = train_experiment(ctx)
        tracker.close()  # everything held while the store was away, sent
        run.finish("FINISHED")
        return result
    except TrainingInterrupted as e:
        run.set_tags({"stopped": str(e)})
        run.finish("KILLED")
        e.run_id = run.run_id
        raise
    except NonFiniteLossError as e:
        run.set_tags({"failure_reason": f"non-finite loss: {e}"})
        run.finish("FAILED")
        raise
    except RunStopped as e:  # a full disk, a tracking server away too long: what was done is kept
        e.run_id = run.run_id
        tracker.hold_on_disk(until_step=getattr(e, "kept_epoch", None))
        with contextlib.suppress(Exception):  # the store may be what is away
            run.set_tags({"failure_reason": str(e)[:5000]})
            run.finish("FAILED")
        raise
    except BaseException as e:
        status = getattr(e, "run_status", "FAILED")
        reason = getattr(e, "run_reason", f"{type(e).__name__}: {e}")
        run.set_tags({"failure_reason" if status == "FAILED" else "stopped": reason[:5000]})
        run.finish(status)
        raise
