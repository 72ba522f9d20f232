"""The experiment runner: config -> datasets -> model -> loss -> engine -> final report, in a
:class:`~maskssd.training.context.RunContext` (what it builds: :mod:`maskssd.training.build`).

:func:`train_experiment` is the whole of one run minus its tracking store: it logs params and the config at
the start, per-epoch metrics and checkpoints through the engine, and at the end the selected checkpoint's
evaluation, plots and the deployable model. :func:`maskssd.tracking.experiment.run_experiment` wraps it in an
MLflow run (and its status); anything else that implements the protocol can too.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskssd.data import DataReport, FaceMaskDataset, load_image, split_digest
from maskssd.data.calibration import embed_calibration
from maskssd.data.folds import fold_digest
from maskssd.errors import MaskSSDError
from maskssd.evaluation.metrics import EvalResult
from maskssd.evaluation.records import EvalSet
from maskssd.evaluation.report import ReportSpec, SplitReport, report_split
from maskssd.ssd.checkpoint import load
from maskssd.ssd.detector import SSDDetector
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.postprocess import DecodeSpec
from maskssd.training import distributed
from maskssd.training.build import (
    build_detector,
    build_loader,
    build_loss,
    dataset_infos,
    datasets_of,
    deploy_checkpoint,
    resolve_data_root,
    split_annotations,
)
from maskssd.training.config import ExperimentConfig
from maskssd.training.context import RunContext
from maskssd.training.engine import Trainer
from maskssd.training.final_report import log_report
from maskssd.training.levers import SizedLosses, configure_train_data, epoch_lengths
from maskssd.training.optim import build_optimizer, build_scheduler
from maskssd.training.predict import cpu_supports_bf16, predict
from maskssd.training.tracker import DatasetInfo, SplitMetrics

__all__ = ["FinalEvaluation", "RunResult", "report_spec", "sigterm_as_interrupt", "train_experiment"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    model_uri: str | None = None
    reason: str = ""
    evaluation: FinalEvaluation | None = None


@dataclass
class FinalEvaluation:
    """The selected checkpoint's evaluation: what the CLI prints and what is logged as ``val_*`` / ``test_*``
    (with the model and its datasets; the per-epoch curves are ``val/*``)."""

    class_names: tuple[str, ...]
    final_split: str
    reports: dict[str, SplitReport] = field(default_factory=dict)  # every metric, intervals, errors, by split

    @property
    def val(self) -> EvalResult:
        return self.reports["val"].result

    @property
    def final(self) -> EvalResult | None:
        report = self.reports.get(self.final_split)
        return report.result if report is not None else None


# --------------------------------------------------------------------------------------- signals
@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, so it saves and marks the run like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------ the run
@dataclass
class _Parts:
    """Everything one run builds from its config."""

    model: SSDDetector
    datasets: dict[str, FaceMaskDataset]
    loss_fn: MultiBoxLoss
    trainer: Trainer
    report: DataReport
    root: Path
    params: dict[str, Any] = field(default_factory=dict)  # what the enabled levers add to the run's params
    folds: list[list[str]] | None = None  # a cross-validation child's folds

    def infos(self, cfg: ExperimentConfig) -> dict[str, DatasetInfo]:
        return dataset_infos(cfg, self.root, self.datasets, self.folds)


def _build(ctx: RunContext) -> _Parts:
    cfg, info, device = ctx.cfg, ctx.dist, ctx.device
    root = resolve_data_root(cfg) if ctx.is_main else Path(cfg.data.root).expanduser()
    distributed.barrier()  # rank 0 may have generated the synthetic data
    model = build_detector(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    report = DataReport()
    data = split_annotations(cfg, root, report)
    datasets = datasets_of(cfg, data.splits, model.input_size)
    counts = datasets["train"].class_box_counts()
    loss_fn = build_loss(cfg, model, counts).to(device)
    levers = configure_train_data(cfg, datasets["train"], model.input_size, info.rank, info.world)
    loader = {
        "rank": info.rank,
        "world": info.world,
        "pin": device.type == "cuda",
        "workers": cfg.data.num_workers,
        "seed": cfg.experiment.seed,
    }
    train_loader = build_loader(
        datasets["train"], cfg.data.batch_size, shuffle=True, sampler=levers.sampler, **loader
    )
    val_loader = build_loader(datasets["val"], cfg.data.eval_batch_size, shuffle=False, **loader)
    optimizer = build_optimizer(model, cfg.optim)
    iters = epoch_lengths(levers, train_loader, cfg.train.epochs)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.epochs, iters)
    cpu_bf16 = cfg.train.cpu_bf16
    if cpu_bf16 and device.type == "cpu" and not cpu_supports_bf16():
        log.warning(
            "train.cpu_bf16: this CPU has no bfloat16 instructions (AVX512-BF16, AMX); float32 instead"
        )
        cpu_bf16 = False
    sized = None
    if levers.sizes is not None:
        sized = SizedLosses(model, lambda priors: build_loss(cfg, model, counts, priors=priors).to(device))
    trainer = Trainer(
        cfg=cfg,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        val_loader=val_loader,
        device=device,
        store=ctx.store,
        extra_state={"config": cfg.model_dump(mode="json"), "run_id": ctx.run_id},
        logger=ctx.tracker,
        on_eval=ctx.on_eval,
        train_model=_distributed_model(cfg, model, info, device),
        sized_loss=sized,
        progress=ctx.progress,
        cpu_bf16=cpu_bf16,
    )
    return _Parts(model, datasets, loss_fn, trainer, report, root, levers.params, data.folds)


def _distributed_model(
    cfg: ExperimentConfig, model: torch.nn.Module, info: distributed.DistInfo, device: torch.device
) -> torch.nn.Module:
    """What the training step runs: the model, or its DistributedDataParallel wrapper (SyncBatchNorm on GPUs)."""
    if not info.enabled:
        return model
    train_model: torch.nn.Module = model
    if cfg.train.sync_bn:
        if device.type == "cpu":
            raise MaskSSDError("train.sync_bn needs GPUs: torch's SyncBatchNorm does not run on CPU")
        train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        train_model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _restore(parts: _Parts, ctx: RunContext) -> int | None:
    """Continue from the run's last checkpoint (and keep its best); the epoch resumed after, if any."""
    last = ctx.store.fetch("last")
    if last is None:
        return None
    parts.trainer.restore(load(last))
    best = ctx.store.fetch("best")
    if best is not None and best != ctx.store.local_dir / "best.pt":  # downloaded: keep a local copy
        ctx.store.save(load(best), "best", publish=False)
    return parts.trainer.state.epoch


def _log_start(ctx: RunContext, parts: _Parts) -> None:
    cfg, tracker = ctx.cfg, ctx.tracker
    params = cfg.flat()
    weights = parts.loss_fn.class_weights
    params.update(
        {
            "data.train_images": len(parts.datasets["train"]),
            "data.val_images": len(parts.datasets["val"]),
            "model.num_priors": int(parts.model.priors_cxcy.shape[0]),
            "loss.effective_class_weights": weights.tolist() if weights is not None else "none",
            "model.parameters": sum(p.numel() for p in parts.model.parameters()),
            "distributed.world_size": ctx.dist.world,
            **parts.params,
        }
    )
    tracker.log_params(params)
    tracker.set_tags(
        {
            "config_hash": cfg.digest(),
            "data.root": str(parts.root.resolve()),
            "data.split": cfg.data.split_name,
            "data.split_hash": split_digest(parts.root, cfg.data.split_name),
            "model": cfg.model.name,
        }
    )
    tracker.log_datasets(list(parts.infos(cfg).values()))
    if parts.folds is not None:
        d = cfg.data
        digest = fold_digest(parts.folds, d.fold_seed)
        tracker.set_tags({"maskssd.fold": str(d.fold), "data.folds_hash": digest})
        doc = {"k": d.folds, "fold": d.fold, "fold_seed": d.fold_seed, "digest": digest, "folds": parts.folds}
        tracker.log_dict(doc, "folds.json")
    tracker.log_text(cfg.to_toml(), "config.toml")
    tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
    r = parts.report
    tracker.log_dict({"summary": r.summary(), "fixes": r.fixes, "skipped": r.skipped}, "data_report.json")


def train_experiment(ctx: RunContext) -> RunResult:
    """Train, select, evaluate and log one run. Under torchrun every rank calls it with its own context; the
    tracker of every rank but 0 records nothing."""
    parts = _build(ctx)
    if ctx.resuming:
        epoch = _restore(parts, ctx)
        if epoch is not None:
            log.info("resuming after epoch %d", epoch)
    else:
        _log_start(ctx, parts)
    parts.trainer.fit()
    return _finish(ctx, parts)


def report_spec(cfg: ExperimentConfig) -> ReportSpec:
    """How a run reports its final evaluation (``[eval]``): intervals, operating threshold, COCO."""
    ev = cfg.eval
    seed = ev.bootstrap_seed if ev.bootstrap_seed is not None else cfg.experiment.seed
    return ReportSpec(ev.bootstrap, seed, ev.bootstrap_ci, ev.operating_threshold, ev.coco)


def _final_sets(ctx: RunContext, parts: _Parts) -> tuple[dict[str, dict[str, float]], dict[str, EvalSet]]:
    """The selected checkpoint's loss and detections on val and, once, on the final split."""
    cfg, info = ctx.cfg, ctx.dist
    loaders = {"val": parts.trainer.val_loader}
    if cfg.data.final_split == "test":  # the only touch of the test split: the selected checkpoint, once
        loaders["test"] = build_loader(
            parts.datasets["test"],
            cfg.data.eval_batch_size,
            cfg.data.num_workers,
            cfg.experiment.seed,
            rank=info.rank,
            world=info.world,
        )
    losses, sets = {}, {}
    for split, loader in loaders.items():
        losses[split], evalset = predict(
            parts.model,
            loader,
            class_names=cfg.class_names,
            device=ctx.device,
            loss_fn=parts.loss_fn,
            decode=DecodeSpec.from_config(cfg.eval),
            amp=cfg.train.amp,
            prefix=split,
            channels_last=cfg.train.channels_last,
            tta_hflip=cfg.eval.tta_hflip,
        )
        assert evalset is not None
        sets[split] = evalset
    return losses, sets


def _finish(ctx: RunContext, parts: _Parts) -> RunResult:
    """Evaluate the selected checkpoint on val and, once, on the final split; report both (intervals, error
    analysis, operating thresholds fitted on val), log plots, the model and, linked to it and to their
    datasets, the final metrics."""
    cfg = ctx.cfg
    distributed.barrier()  # rank 0 has published the last checkpoint
    selected = ctx.store.fetch("best") or ctx.store.fetch("last")
    assert selected is not None, "a finished run has a checkpoint"
    ckpt = load(selected)
    parts.model.load_state_dict(ckpt["model"])
    losses, sets = _final_sets(ctx, parts)
    evaluation = FinalEvaluation(cfg.class_names, cfg.data.final_split)
    final: dict[str, float] = {"best_epoch": float(ckpt["epoch"])}
    model_uri = None
    if ctx.is_main:  # the bootstrap and error analysis run once, not on every rank
        spec = report_spec(cfg)
        for split, evalset in sets.items():
            evaluation.reports[split] = report_split(
                evalset, spec, split=split, fit_thresholds=split == "val"
            )
        metrics = {s: {**losses[s], **r.metrics(s)} for s, r in evaluation.reports.items()}
        _log_plots(ctx, parts, evaluation)
        model_uri = _log_final(ctx, parts, ckpt, metrics, evaluation.reports["val"])
        final.update({k: v for m in metrics.values() for k, v in m.items()})
    distributed.barrier()
    return RunResult(ctx.run_id, "FINISHED", final, int(ckpt["epoch"]), model_uri, evaluation=evaluation)


def _log_final(
    ctx: RunContext,
    parts: _Parts,
    ckpt: Mapping[str, Any],
    metrics: Mapping[str, dict[str, float]],
    val: SplitReport,
) -> str | None:
    """The selected checkpoint's record: best epoch, thresholds, and the model with its val/test metrics."""
    cfg, tracker = ctx.cfg, ctx.tracker
    epoch = int(ckpt["epoch"])
    tracker.log_metrics({"best_epoch": float(epoch)}, step=epoch)
    has_best = (ctx.store.local_dir / "best.pt").is_file()
    tracker.set_tags({"best_checkpoint": "best.pt" if has_best else "last.pt", "best_epoch": str(epoch)})
    fits = val.thresholds or {}
    tracker.log_dict({c: asdict(f) for c, f in fits.items()}, "thresholds.json")
    datasets = parts.infos(cfg)
    evaluations = [SplitMetrics(datasets.get(s), m) for s, m in metrics.items()]
    if not ctx.log_model:
        tracker.log_metrics({k: v for m in metrics.values() for k, v in m.items()}, step=epoch)
        return None
    thresholds = {c: f.threshold for c, f in fits.items()}
    train = [a.image_path for a in parts.datasets["train"].annotations]
    cal = embed_calibration(train, int(parts.model.input_size), source=f"{len(train)} training images")
    deploy = ctx.store.save(deploy_checkpoint(ckpt, cfg, thresholds, cal), "model", publish=False)
    tags = {"config_hash": cfg.digest(), "run_id": ctx.run_id}
    return tracker.log_model(deploy, tags, evaluations=evaluations, step=epoch)


def _log_plots(ctx: RunContext, parts: _Parts, ev: FinalEvaluation) -> None:
    from maskssd.evaluation.drawing import draw_detections
    from maskssd.evaluation.plots import plot_confusion_matrix, plot_pr_curves

    cfg, tracker = ctx.cfg, ctx.tracker
    out = ctx.store.local_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    tracker.log_figure(plot_pr_curves(ev.val, out / "pr_curves_val.png"))
    tracker.log_figure(plot_confusion_matrix(ev.val.confusion, cfg.class_names, out / "confusion_val.png"))
    if ev.final is not None:
        tracker.log_figure(plot_pr_curves(ev.final, out / f"pr_curves_{ev.final_split}.png"))
    decode = DecodeSpec.from_config(cfg.eval)
    settings = {**asdict(decode), "run_id": ctx.run_id}
    folds_hash = fold_digest(parts.folds, cfg.data.fold_seed) if parts.folds is not None else None
    for report in ev.reports.values():
        log_report(
            tracker,
            report,
            cfg,
            ctx.store.local_dir,
            settings,
            parts.datasets[report.split],
            parts.root,
            folds_hash=folds_hash,
        )
    val_ds, model = parts.datasets["val"], parts.model.eval()
    device = next(model.parameters()).device
    for i, ann in enumerate(val_ds.annotations[: min(cfg.train.log_images, len(val_ds))]):
        sample = val_ds[i]
        size = torch.tensor([[float(ann.width), float(ann.height)]], device=device)
        dets = model.detect(sample["image"].as_subclass(torch.Tensor)[None].to(device), decode, size)[
            0
        ].to_cpu()
        path = out / f"val_{ann.image_id}.png"
        draw_detections(load_image(ann.image_path), dets, cfg.class_names).save(path)
        tracker.log_artifact(path, "images")
