"""The experiment runner: config -> datasets -> model -> loss -> engine -> final evaluation, reported to a
:class:`~maskssd.training.tracker.Tracker`.

:func:`train_experiment` is the whole of one run minus its tracking store: it logs params and the config at
the start, per-epoch metrics and checkpoints through the engine, and at the end the selected checkpoint's
evaluation, plots and the deployable model. :func:`maskssd.tracking.experiment.run_experiment` wraps it in an
MLflow run (and its status); anything else that implements the protocol can too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskssd.data import (
    DataReport,
    FaceMaskDataset,
    SeededSampler,
    collate,
    load_image,
    load_split,
    split_digest,
)
from maskssd.data.transforms import AugmentSpec, eval_transform, train_transform
from maskssd.errors import MaskSSDError
from maskssd.evaluation.metrics import EvalResult
from maskssd.runtime import LOCAL_DIR
from maskssd.ssd.checkpoint import FORMAT_VERSION, atomic_save, load
from maskssd.ssd.detector import SSDDetector
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.models import build_model
from maskssd.ssd.postprocess import DecodeSpec
from maskssd.training import distributed
from maskssd.training.config import ExperimentConfig
from maskssd.training.engine import (
    Trainer,
    TrainSpec,
    build_optimizer,
    build_scheduler,
    cpu_supports_bf16,
    evaluate,
)
from maskssd.training.final_report import SplitReport, log_report, report_split
from maskssd.training.levers import SizedLosses, configure_train_data, epoch_lengths
from maskssd.training.tracker import DatasetInfo, SplitMetrics, Tracker

__all__ = [
    "EvalHook",
    "FinalEvaluation",
    "RunResult",
    "build_datasets",
    "build_detector",
    "build_loader",
    "build_loss",
    "checkpoint_root",
    "dataset_infos",
    "deploy_checkpoint",
    "resolve_data_root",
    "sigterm_as_interrupt",
    "train_experiment",
]

log = logging.getLogger(__name__)

#: Called with ``(epoch, metrics)`` at every evaluation epoch (Optuna pruning); may raise to stop the run.
EvalHook = Callable[[int, dict[str, float]], None]


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
    val: EvalResult
    final: EvalResult | None
    final_split: str
    reports: dict[str, SplitReport] = field(default_factory=dict)  # intervals, error analysis, by split


# ------------------------------------------------------------------------------------------ building
def resolve_data_root(cfg: ExperimentConfig) -> Path:
    """The dataset folder, generating the synthetic one on first use when the config asks for it."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.synthetic is not None:
        from maskssd.data.synth import ensure_synth

        syn = cfg.data.synthetic
        ensure_synth(
            root,
            syn.images,
            syn.seed,
            cfg.data.split_name,
            class_probs=tuple(syn.class_probs),
            face_size=tuple(syn.face_size),
            faces_per_image=tuple(syn.faces_per_image),
            image_size=tuple(syn.image_size),
            classes=tuple(cfg.class_names),
        )
    if not root.exists():
        raise MaskSSDError(f"data.root {root} does not exist (relative paths are read from {Path.cwd()})")
    return root


def build_datasets(
    cfg: ExperimentConfig, root: Path, input_size: int, report: DataReport | None = None
) -> dict[str, FaceMaskDataset]:
    report = report if report is not None else DataReport()
    aug = AugmentSpec(**{f: getattr(cfg.augment, f) for f in AugmentSpec.__dataclass_fields__})
    out = {}
    for split in ("train", "val", cfg.data.final_split):
        if split == "none" or split in out:
            continue
        anns = load_split(root, split, cfg.data.split_name, cfg.class_names, cfg.data.on_error, report)
        if not anns:
            raise MaskSSDError(f"split {cfg.data.split_name}/{split} of {root} is empty")
        tf = train_transform(input_size, aug) if split == "train" else eval_transform(input_size)
        out[split] = FaceMaskDataset(anns, tf, cfg.class_names, cfg.data.cache_images)
    return out


def build_loader(
    ds: FaceMaskDataset,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    rank: int = 0,
    world: int = 1,
    pin: bool = False,
    sampler: SeededSampler | None = None,
) -> torch.utils.data.DataLoader:
    """Training loaders (``shuffle``) pad shards to equal length like ``DistributedSampler``; evaluation loaders
    shard without padding, so every image is evaluated exactly once across ranks. ``sampler`` replaces the
    default one (repeat-factor sampling, progressive sizes)."""
    sampler = sampler or SeededSampler(len(ds), seed, shuffle, rank, world, pad=shuffle)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=workers > 0,
        drop_last=False,
    )


def build_detector(cfg: ExperimentConfig) -> SSDDetector:
    torch.manual_seed(cfg.experiment.seed)
    kwargs = cfg.model.build_kwargs()
    if kwargs.get("init_checkpoint"):  # its class heads, where they fit, are mapped onto our classes by name
        kwargs["class_names"] = list(cfg.class_names)
    model = build_model(cfg.model.name, num_classes=len(cfg.class_names) + 1, **kwargs)
    model.build_args.pop("class_names", None)  # rebuilding needs no init checkpoint, hence no class mapping
    init = getattr(model, "init_report", None)
    if init:
        log.info(
            "model.init_checkpoint: %d tensors loaded, %d dropped%s",
            len(init["loaded"]),
            len(init["dropped"]),
            f"; {init['class_order']}" if init.get("class_order") else "",
        )
    return model


def build_loss(
    cfg: ExperimentConfig,
    model: SSDDetector,
    box_counts: Mapping[str, int] | None = None,
    *,
    priors: torch.Tensor | None = None,
) -> MultiBoxLoss:
    """The config's MultiBox loss over the model's default boxes (or ``priors``: another input size's)."""
    ls = cfg.loss
    return MultiBoxLoss(
        model.priors_cxcy if priors is None else priors,
        threshold=ls.threshold,
        neg_pos_ratio=ls.neg_pos_ratio,
        alpha=ls.alpha,
        class_weights=cfg.class_weight_list(box_counts),
        loc_loss=ls.loc_loss,
        focal_gamma=ls.focal_gamma,
        label_smoothing=ls.label_smoothing,
    )


def deploy_checkpoint(
    ckpt: Mapping[str, Any], cfg: ExperimentConfig, thresholds: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """The part of a training checkpoint a deployed model needs: weights, how to rebuild, classes, decoding,
    and the per-class operating thresholds (fitted on validation) where known."""
    out = {
        "format": FORMAT_VERSION,
        "model": ckpt["model"],
        "build_args": ckpt["build_args"],
        "class_names": list(cfg.class_names),
        "decode": asdict(DecodeSpec.from_config(cfg.eval)),
        "epoch": ckpt["epoch"],
        "config": cfg.model_dump(mode="json"),
    }
    if thresholds:
        out["thresholds"] = {str(k): float(v) for k, v in thresholds.items()}
    return out


def dataset_infos(
    cfg: ExperimentConfig, root: Path, datasets: Mapping[str, FaceMaskDataset]
) -> dict[str, DatasetInfo]:
    """Each split a run uses, as lineage: named ``ROOT_NAME/SPLIT_NAME/SPLIT``, its digest the split hash, its
    source the data root, its profile the images and boxes per class."""
    root = root.resolve()
    digest = split_digest(root, cfg.data.split_name)
    return {
        split: DatasetInfo(
            name=f"{root.name}/{cfg.data.split_name}/{split}",
            digest=digest,
            source=str(root),
            split=split,
            profile={"images": len(ds), "boxes": dict(ds.class_box_counts())},
        )
        for split, ds in datasets.items()
    }


def checkpoint_root() -> Path:
    """Where runs keep their local checkpoints (``$MASKSSD_CHECKPOINT_DIR``, else ``mlruns/checkpoints``)."""
    return Path(os.environ.get("MASKSSD_CHECKPOINT_DIR", LOCAL_DIR / "checkpoints"))


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


def _build(
    cfg: ExperimentConfig,
    tracker: Tracker,
    ckpt_dir: Path,
    on_eval: list[EvalHook],
    progress: bool,
    info: distributed.DistInfo,
    device: torch.device,
) -> _Parts:
    root = resolve_data_root(cfg) if info.is_main else Path(cfg.data.root).expanduser()
    distributed.barrier()  # rank 0 may have generated the synthetic data
    model = build_detector(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    report = DataReport()
    datasets = build_datasets(cfg, root, model.input_size, report)
    counts = datasets["train"].class_box_counts()
    loss_fn = build_loss(cfg, model, counts).to(device)
    levers = configure_train_data(cfg, datasets["train"], model.input_size, info.rank, info.world)
    seed, pin = cfg.experiment.seed, device.type == "cuda"
    loader = {
        "rank": info.rank,
        "world": info.world,
        "pin": pin,
        "workers": cfg.data.num_workers,
        "seed": seed,
    }
    train_loader = build_loader(
        datasets["train"], cfg.data.batch_size, shuffle=True, sampler=levers.sampler, **loader
    )
    val_loader = build_loader(datasets["val"], cfg.data.eval_batch_size, shuffle=False, **loader)
    optimizer = build_optimizer(model, cfg.optim)
    iters = epoch_lengths(levers, train_loader, cfg.train.epochs)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.epochs, iters)
    train_model: torch.nn.Module = model
    if info.enabled:
        if cfg.train.sync_bn:
            if device.type == "cpu":
                raise MaskSSDError("train.sync_bn needs GPUs: torch's SyncBatchNorm does not run on CPU")
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    spec = TrainSpec.from_config(cfg, progress)
    if spec.cpu_bf16 and device.type == "cpu" and not cpu_supports_bf16():
        log.warning(
            "train.cpu_bf16: this CPU has no bfloat16 instructions (AVX512-BF16, AMX); float32 instead"
        )
        spec.cpu_bf16 = False
    sized = None
    if levers.sizes is not None:
        sized = SizedLosses(model, lambda priors: build_loss(cfg, model, counts, priors=priors).to(device))
    trainer = Trainer(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        val_loader=val_loader,
        spec=spec,
        class_names=cfg.class_names,
        device=device,
        checkpoint_dir=ckpt_dir,
        extra_state={"config": cfg.model_dump(mode="json"), "run_id": tracker.run_id},
        logger=tracker if info.is_main else None,
        on_eval=on_eval if info.is_main else [],
        train_model=train_model,
        is_main=info.is_main,
        sized_loss=sized,
    )
    return _Parts(model, datasets, loss_fn, trainer, report, root, levers.params)


def _restore(parts: _Parts, tracker: Tracker, ckpt_dir: Path, info: distributed.DistInfo) -> int | None:
    """Continue from the run's last checkpoint (and keep its best); the epoch resumed after, if any."""
    try:
        path = tracker.download("checkpoints/last.pt", ckpt_dir / f"download-rank{info.rank}")
    except MaskSSDError:
        return None
    parts.trainer.restore(load(path))
    if info.is_main:
        try:
            best = tracker.download("checkpoints/best.pt", ckpt_dir / "download-rank0")
            atomic_save(load(best), ckpt_dir / "best.pt")
        except MaskSSDError:
            pass
    return parts.trainer.state.epoch


def _log_start(cfg: ExperimentConfig, parts: _Parts, tracker: Tracker, world: int) -> None:
    params = cfg.flat()
    weights = parts.loss_fn.class_weights
    params.update(
        {
            "data.train_images": len(parts.datasets["train"]),
            "data.val_images": len(parts.datasets["val"]),
            "model.num_priors": int(parts.model.priors_cxcy.shape[0]),
            "loss.effective_class_weights": weights.tolist() if weights is not None else "none",
            "model.parameters": sum(p.numel() for p in parts.model.parameters()),
            "distributed.world_size": world,
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
    tracker.log_datasets(list(dataset_infos(cfg, parts.root, parts.datasets).values()))
    tracker.log_text(cfg.to_toml(), "config.toml")
    tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
    r = parts.report
    tracker.log_dict({"summary": r.summary(), "fixes": r.fixes, "skipped": r.skipped}, "data_report.json")


def train_experiment(
    cfg: ExperimentConfig,
    tracker: Tracker,
    *,
    resuming: bool = False,
    on_eval: list[EvalHook] | None = None,
    progress: bool = True,
    log_model: bool = True,
    info: distributed.DistInfo | None = None,
    device: torch.device | None = None,
) -> RunResult:
    """Train, select, evaluate and log one run. Under torchrun every rank calls it; rank 0 alone logs."""
    info = info or distributed.DistInfo()
    device = device or torch.device("cpu")
    ckpt_dir = checkpoint_root() / tracker.run_id
    parts = _build(cfg, tracker, ckpt_dir, list(on_eval or []), progress, info, device)
    if resuming:
        epoch = _restore(parts, tracker, ckpt_dir, info)
        if epoch is not None and info.is_main:
            log.info("resuming after epoch %d", epoch)
    elif info.is_main:
        _log_start(cfg, parts, tracker, info.world)
    parts.trainer.fit()
    return _finish(cfg, parts, tracker, ckpt_dir, log_model, info, device)


def _finish(
    cfg: ExperimentConfig,
    parts: _Parts,
    tracker: Tracker,
    ckpt_dir: Path,
    log_model: bool,
    info: distributed.DistInfo,
    device: torch.device,
) -> RunResult:
    """Evaluate the selected checkpoint on val and, once, on the final split; log plots, the operating
    thresholds (fitted on val), the model and, linked to it and to their datasets, the final metrics."""
    ckpt = None
    if info.is_main:
        best_path = ckpt_dir / "best.pt"
        ckpt = load(best_path if best_path.is_file() else ckpt_dir / "last.pt")
    ckpt = distributed.broadcast_object(ckpt)
    parts.model.load_state_dict(ckpt["model"])
    kw = {
        "class_names": cfg.class_names,
        "device": device,
        "loss_fn": parts.loss_fn,
        "decode": DecodeSpec.from_config(cfg.eval),
        "coco": cfg.eval.coco,
        "amp": cfg.train.amp,
        "channels_last": cfg.train.channels_last,
        "tta_hflip": cfg.eval.tta_hflip,
    }
    collected: dict[str, list[tuple[str, Any]]] = {"val": []}
    val_metrics, val_result = evaluate(parts.model, parts.trainer.val_loader, collect=collected["val"], **kw)
    test_metrics: dict[str, float] = {}
    test_result = None
    if cfg.data.final_split == "test":  # the only touch of the test split: the selected checkpoint, once
        loader = build_loader(
            parts.datasets["test"],
            cfg.data.eval_batch_size,
            cfg.data.num_workers,
            cfg.experiment.seed,
            rank=info.rank,
            world=info.world,
        )
        collected["test"] = []
        test_metrics, test_result = evaluate(
            parts.model, loader, prefix="test", collect=collected["test"], **kw
        )
    assert val_result is not None
    evaluation = FinalEvaluation(cfg.class_names, val_result, test_result, cfg.data.final_split)
    model_uri = None
    if info.is_main:
        for split, result, metrics in (("val", val_result, val_metrics), ("test", test_result, test_metrics)):
            if result is not None:
                evaluation.reports[split] = report_split(
                    cfg,
                    split=split,
                    prefix=split,
                    result=result,
                    detections=collected[split],
                    annotations=parts.datasets[split].annotations,
                    root=parts.root,
                )
                metrics.update(evaluation.reports[split].metrics)  # intervals, AP by size, recall
        _log_plots(tracker, parts, evaluation, cfg, ckpt_dir)
        model_uri = _log_final(
            cfg, parts, tracker, ckpt, ckpt_dir, (val_metrics, test_metrics), collected["val"], log_model
        )
    distributed.barrier()
    final = {"best_epoch": float(ckpt["epoch"]), **val_metrics, **test_metrics}
    return RunResult(tracker.run_id, "FINISHED", final, int(ckpt["epoch"]), model_uri, evaluation=evaluation)


def _log_final(
    cfg: ExperimentConfig,
    parts: _Parts,
    tracker: Tracker,
    ckpt: Mapping[str, Any],
    ckpt_dir: Path,
    metrics: tuple[dict[str, float], dict[str, float]],
    collected: list[tuple[str, Any]],
    log_model: bool,
) -> str | None:
    """The selected checkpoint's record: best epoch, thresholds, and the model with its val/test metrics."""
    from maskssd.evaluation.thresholds import fit_on_annotations, thresholds_of

    epoch = int(ckpt["epoch"])
    tracker.log_metrics({"best_epoch": float(epoch)}, step=epoch)
    tracker.set_tags(
        {
            "best_checkpoint": "best.pt" if (ckpt_dir / "best.pt").is_file() else "last.pt",
            "best_epoch": str(epoch),
        }
    )
    fits = fit_on_annotations(collected, parts.datasets["val"].annotations, cfg.class_names)
    tracker.log_dict({c: asdict(f) for c, f in fits.items()}, "thresholds.json")
    datasets = dataset_infos(cfg, parts.root, parts.datasets)
    val_metrics, test_metrics = metrics
    evaluations = [SplitMetrics(datasets.get("val"), val_metrics)]
    if test_metrics:
        evaluations.append(SplitMetrics(datasets.get("test"), test_metrics))
    if not log_model:
        tracker.log_metrics({**val_metrics, **test_metrics}, step=epoch)
        return None
    deploy = atomic_save(deploy_checkpoint(ckpt, cfg, thresholds_of(fits)), ckpt_dir / "model.pt")
    tags = {"config_hash": cfg.digest(), "run_id": tracker.run_id}
    return tracker.log_model(deploy, tags, evaluations=evaluations, step=epoch)


def _log_plots(
    tracker: Tracker, parts: _Parts, ev: FinalEvaluation, cfg: ExperimentConfig, ckpt_dir: Path
) -> None:
    from maskssd.evaluation.drawing import draw_detections
    from maskssd.evaluation.plots import plot_confusion_matrix, plot_pr_curves

    out = ckpt_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    tracker.log_figure(plot_pr_curves(ev.val, out / "pr_curves_val.png"))
    tracker.log_figure(plot_confusion_matrix(ev.val.confusion, cfg.class_names, out / "confusion_val.png"))
    if ev.final is not None:
        tracker.log_figure(plot_pr_curves(ev.final, out / f"pr_curves_{ev.final_split}.png"))
    settings = {**asdict(DecodeSpec.from_config(cfg.eval)), "run_id": tracker.run_id}
    for report in ev.reports.values():
        log_report(tracker, report, cfg, ckpt_dir, settings)
    val_ds, model = parts.datasets["val"], parts.model.eval()
    decode = DecodeSpec.from_config(cfg.eval)
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
