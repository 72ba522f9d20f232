"""The experiment runner: config -> datasets -> model -> loss -> engine, tracked as one MLflow run.

``run_experiment`` is what ``maskssd train`` and every study trial call. It owns the run's lifecycle:
params and config at the start, per-epoch metrics and checkpoints through the engine, final evaluation,
plots and the logged model at the end, and the run's status (FINISHED, FAILED, KILLED) whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from maskssd import distributed, tracking
from maskssd.checkpoint import atomic_save, load
from maskssd.config import ExperimentConfig, validate
from maskssd.data import DataReport, FaceMaskDataset, SeededSampler, VOCLayout, collate, load_split
from maskssd.engine import Trainer, TrainSpec, build_optimizer, build_scheduler, evaluate, resolve_device
from maskssd.errors import MaskSSDError, NonFiniteLossError, TrainingInterrupted
from maskssd.loss import MultiBoxLoss
from maskssd.models import SSDDetector, build_model
from maskssd.postprocess import DecodeSpec
from maskssd.transforms import AugmentSpec, eval_transform, train_transform

console = Console(stderr=True)


@dataclass
class RunResult:
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    model_uri: str | None = None
    reason: str = ""


# ------------------------------------------------------------------------------------------ building
def resolve_data_root(cfg: ExperimentConfig) -> Path:
    """The dataset folder, generating the synthetic one on first use when the config asks for it."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.synthetic is not None:
        from maskssd.synth import ensure_synth

        syn = cfg.data.synthetic
        ensure_synth(root, syn.images, syn.seed, cfg.data.split_name, class_probs=tuple(syn.class_probs),
                     face_size=tuple(syn.face_size), faces_per_image=tuple(syn.faces_per_image),
                     classes=tuple(cfg.class_names))
    if not root.exists():
        raise MaskSSDError(f"data.root {root} does not exist (relative paths are read from {Path.cwd()})")
    return root


def split_digest(root: Path, split_name: str) -> str:
    """A hash of the split lists: which images each split held (lineage)."""
    layout = VOCLayout.detect(root)
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        f = layout.split_file(split_name, split)
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()[:12]


def decode_spec(cfg: ExperimentConfig) -> DecodeSpec:
    e = cfg.eval
    return DecodeSpec(e.min_score, e.max_overlap, e.top_k, e.class_agnostic, e.pre_nms_top_k or None)


def build_datasets(cfg: ExperimentConfig, root: Path, input_size: int,
                   report: DataReport | None = None) -> dict[str, FaceMaskDataset]:
    report = report if report is not None else DataReport()
    aug = AugmentSpec(**cfg.augment.model_dump())
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


def build_loader(ds: FaceMaskDataset, batch_size: int, workers: int, seed: int, shuffle: bool,
                 rank: int = 0, world: int = 1, pin: bool = False) -> torch.utils.data.DataLoader:
    """Training loaders (``shuffle``) pad shards to equal length like ``DistributedSampler``; evaluation loaders
    shard without padding, so every image is evaluated exactly once across ranks."""
    sampler = SeededSampler(len(ds), seed, shuffle, rank, world, pad=shuffle)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin, persistent_workers=workers > 0,
                                       drop_last=False)


def build_detector(cfg: ExperimentConfig) -> SSDDetector:
    torch.manual_seed(cfg.experiment.seed)
    kwargs = cfg.model.build_kwargs()
    if kwargs.get("init_checkpoint"):  # its class heads, where they fit, are mapped onto our classes by name
        kwargs["class_names"] = list(cfg.class_names)
    model = build_model(cfg.model.name, num_classes=len(cfg.class_names) + 1, **kwargs)
    model.build_args.pop("class_names", None)  # rebuilding needs no init checkpoint, hence no class mapping
    return model


def build_loss(cfg: ExperimentConfig, model: SSDDetector, box_counts: Mapping[str, int] | None = None) -> MultiBoxLoss:
    ls = cfg.loss
    return MultiBoxLoss(model.priors_cxcy, ls.threshold, ls.neg_pos_ratio, ls.alpha, cfg.class_weight_list(box_counts),
                        ls.loc_loss, ls.focal_gamma, ls.label_smoothing)


def deploy_checkpoint(ckpt: Mapping[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    """The part of a training checkpoint a deployed model needs: weights, how to rebuild, classes, decoding."""
    return {"format": 1, "model": ckpt["model"], "build_args": ckpt["build_args"],
            "class_names": list(cfg.class_names), "decode": asdict(decode_spec(cfg)),
            "epoch": ckpt["epoch"], "config": cfg.model_dump(mode="json")}


# --------------------------------------------------------------------------------------- signals
@contextmanager
def sigterm_as_interrupt():
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
def checkpoint_root() -> Path:
    return Path(os.environ.get("MASKSSD_CHECKPOINT_DIR", tracking.LOCAL_DIR / "checkpoints"))


def _run_tags(cfg: ExperimentConfig, root: Path) -> dict[str, str]:
    tags = {"config_hash": cfg.digest(), "data.root": str(root.resolve()), "data.split": cfg.data.split_name,
            "data.split_hash": split_digest(root, cfg.data.split_name), "model": cfg.model.name,
            **tracking.git_info(Path(__file__).resolve().parent), **cfg.experiment.tags}
    if cfg.experiment.description:
        tags["mlflow.note.content"] = cfg.experiment.description
    return tags


def run_experiment(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    on_eval: list[Callable[[int, dict[str, float]], None]] | None = None,
    progress: bool = True,
    log_model: bool = True,
    show: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> RunResult:
    """Train, evaluate and record one run; exceptions mark the run FAILED/KILLED and propagate.

    Under torchrun (``WORLD_SIZE`` > 1) every rank trains; rank 0 alone owns the MLflow run.
    """
    info = distributed.DistInfo.from_env()
    device = distributed.setup(info, cfg.experiment.device) if info.enabled else resolve_device(cfg.experiment.device)
    try:
        return _run(cfg, info, device, tracking_uri, run_name, resume_run_id, parent_run_id, tags, on_eval or [],
                    progress, log_model, show, on_start)
    finally:
        if info.enabled:
            distributed.teardown()


def _run(cfg: ExperimentConfig, info: distributed.DistInfo, device: torch.device, tracking_uri: str | None,
         run_name: str | None, resume_run_id: str | None, parent_run_id: str | None, tags: Mapping[str, str] | None,
         on_eval: list[Callable[[int, dict[str, float]], None]], progress: bool, log_model: bool, show: bool,
         on_start: Callable[[str], None] | None) -> RunResult:
    client = tracking.client(tracking_uri)
    run: tracking.MlflowRun | None = None
    if info.is_main:
        if resume_run_id:
            run = tracking.MlflowRun.resume(client, resume_run_id)
        else:
            run = tracking.MlflowRun.start(client, cfg.experiment.name, run_name, tags, parent_run_id)
    run_id = distributed.broadcast_object(run.run_id if run else None)
    if run is None:  # other ranks read the run (config, checkpoints) but never write to it
        run = tracking.ReadOnlyRun(client, run_id)
    if resume_run_id:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = validate(json.loads(run.download("config.json", tmp).read_text()), f"run {resume_run_id} config.json")
    show = show and info.is_main
    if show:
        console.print(f"[bold]MLflow run[/] {run.run_id} in experiment [cyan]{cfg.experiment.name}[/] "
                      f"({client.tracking_uri})" + (f", {info.world} processes" if info.enabled else ""))
    if on_start is not None and info.is_main:
        on_start(run.run_id)
    ckpt_dir = checkpoint_root() / run.run_id
    try:
        with sigterm_as_interrupt():
            result = _train(cfg, run, ckpt_dir, resume_run_id is not None, on_eval, progress, log_model, show,
                            info, device)
        run.finish("FINISHED")
        return result
    except TrainingInterrupted as e:
        run.set_tags({"stopped": str(e)})
        run.finish("KILLED")
        if info.is_main:
            console.print(f"[yellow]{e}; checkpoint saved.[/] Resume with:\n"
                          f"  maskssd train CONFIG --resume {run.run_id}"
                          + (f" --tracking-uri {tracking_uri}" if tracking_uri else ""))
        raise
    except NonFiniteLossError as e:
        run.set_tags({"failure_reason": f"non-finite loss: {e}"})
        run.finish("FAILED")
        raise
    except BaseException as e:
        status = getattr(e, "run_status", "FAILED")
        reason = getattr(e, "run_reason", f"{type(e).__name__}: {e}")
        run.set_tags({"failure_reason" if status == "FAILED" else "stopped": reason[:5000]})
        run.finish(status)
        raise


def _train(cfg: ExperimentConfig, run: tracking.MlflowRun, ckpt_dir: Path, resuming: bool,
           on_eval: list[Callable[[int, dict[str, float]], None]], progress: bool, log_model: bool,
           show: bool, info: distributed.DistInfo, device: torch.device) -> RunResult:
    root = resolve_data_root(cfg) if info.is_main else Path(cfg.data.root).expanduser()
    distributed.barrier()  # rank 0 may have generated the synthetic data
    model = build_detector(cfg).to(device)
    init = getattr(model, "init_report", None)
    if show and init and not resuming:
        console.print(f"model.init_checkpoint: {len(init['loaded'])} tensors loaded, {len(init['dropped'])} dropped"
                      + (f"; {init['class_order']}" if init.get("class_order") else ""), highlight=False)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    report = DataReport()
    datasets = build_datasets(cfg, root, model.input_size, report)
    loss_fn = build_loss(cfg, model, datasets["train"].class_box_counts()).to(device)
    seed = cfg.experiment.seed
    pin = device.type == "cuda"
    rank, world = info.rank, info.world
    train_loader = build_loader(datasets["train"], cfg.data.batch_size, cfg.data.num_workers, seed, True, rank, world, pin)
    val_loader = build_loader(datasets["val"], cfg.data.eval_batch_size, cfg.data.num_workers, seed, False, rank, world,
                              pin)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.epochs, len(train_loader))
    spec = TrainSpec(cfg.train.epochs, seed, cfg.train.eval_every, cfg.train.save_every, cfg.train.best_metric,
                     cfg.train.best_after_epoch, cfg.optim.grad_clip, cfg.train.amp, decode_spec(cfg), cfg.eval.coco,
                     progress, cfg.train.channels_last)
    train_model: torch.nn.Module = model
    if info.enabled:
        if cfg.train.sync_bn:
            if device.type == "cpu":
                raise MaskSSDError("train.sync_bn needs GPUs: torch's SyncBatchNorm does not run on CPU")
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(model, loss_fn, optimizer, scheduler, train_loader, val_loader, spec, cfg.class_names,
                      device, ckpt_dir, {"config": cfg.model_dump(mode="json"), "run_id": run.run_id},
                      run if info.is_main else None, on_eval if info.is_main else [], train_model, info.is_main)

    if resuming:
        try:
            path = run.download("checkpoints/last.pt", ckpt_dir / f"download-rank{rank}")
        except MaskSSDError:
            path = None
        if path is not None:
            trainer.restore(load(path))
            if info.is_main:
                try:
                    best = run.download("checkpoints/best.pt", ckpt_dir / "download-rank0")
                    atomic_save(load(best), ckpt_dir / "best.pt")
                except MaskSSDError:
                    pass
            if show:
                console.print(f"resuming after epoch {trainer.state.epoch}")
    elif info.is_main:
        params = cfg.flat()
        params.update({"data.train_images": len(datasets["train"]), "data.val_images": len(datasets["val"]),
                       "model.num_priors": int(model.priors_cxcy.shape[0]),
                       "loss.effective_class_weights": loss_fn.class_weights.tolist()
                       if loss_fn.class_weights is not None else "none",
                       "model.parameters": sum(p.numel() for p in model.parameters()),
                       "distributed.world_size": world})
        run.log_params(params)
        run.set_tags(_run_tags(cfg, root))
        run.log_text(cfg.to_toml(), "config.toml")
        run.log_dict(cfg.model_dump(mode="json"), "config.json")
        run.log_dict({"summary": report.summary(), "fixes": report.fixes, "skipped": report.skipped}, "data_report.json")

    trainer.fit()

    # ------------------------------------------------------------------ final evaluation of the best model
    ckpt = None
    if info.is_main:
        best_path = ckpt_dir / "best.pt"
        chosen = best_path if best_path.is_file() else ckpt_dir / "last.pt"
        ckpt = load(chosen)
    ckpt = distributed.broadcast_object(ckpt)
    model.load_state_dict(ckpt["model"])
    final: dict[str, float] = {"best_epoch": float(ckpt["epoch"])}
    val_metrics, val_result = evaluate(model, val_loader, loss_fn, cfg.class_names, device, decode_spec(cfg), True,
                                       cfg.eval.coco, cfg.train.amp, channels_last=cfg.train.channels_last)
    final.update({f"best_{k}": v for k, v in val_metrics.items()})
    test_result = None
    if cfg.data.final_split == "test":  # the only touch of the test split: the selected checkpoint, once
        loader = build_loader(datasets["test"], cfg.data.eval_batch_size, cfg.data.num_workers, seed, False, rank, world)
        test_metrics, test_result = evaluate(model, loader, loss_fn, cfg.class_names, device, decode_spec(cfg),
                                             True, cfg.eval.coco, cfg.train.amp, prefix="test",
                                             channels_last=cfg.train.channels_last)
        final.update(test_metrics)
    model_uri = None
    if info.is_main:
        run.log_metrics(final, step=int(ckpt["epoch"]))
        run.set_tags({"best_checkpoint": "best.pt" if (ckpt_dir / "best.pt").is_file() else "last.pt",
                      "best_epoch": str(ckpt["epoch"])})
        _log_plots(run, model, datasets["val"], val_result, test_result, cfg, device, ckpt_dir)
        if log_model:
            deploy = atomic_save(deploy_checkpoint(ckpt, cfg), ckpt_dir / "model.pt")
            model_uri = tracking.log_model(run, deploy, {"config_hash": cfg.digest(), "run_id": run.run_id})
        if show:
            print_ap_table(cfg.class_names, val_result, test_result, cfg.data.final_split)
    distributed.barrier()
    return RunResult(run.run_id, "FINISHED", final, int(ckpt["epoch"]), model_uri)


def _log_plots(run: tracking.MlflowRun, model: SSDDetector, val_ds: FaceMaskDataset, val_result: Any,
               test_result: Any, cfg: ExperimentConfig, device: torch.device, ckpt_dir: Path) -> None:
    from maskssd.data import load_image
    from maskssd.metrics import plot_confusion_matrix, plot_pr_curves
    from maskssd.predictor import Predictor
    from maskssd.visualize import draw_detections

    out = ckpt_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    run.log_figure(plot_pr_curves(val_result, out / "pr_curves_val.png"))
    run.log_figure(plot_confusion_matrix(val_result.confusion, cfg.class_names, out / "confusion_val.png"))
    if test_result is not None:
        run.log_figure(plot_pr_curves(test_result, out / f"pr_curves_{cfg.data.final_split}.png"))
    n = min(cfg.train.log_images, len(val_ds))
    if n:
        predictor = Predictor(model.eval(), cfg.class_names, model.input_size, model.priors_cxcy, decode_spec(cfg), device)
        for ann in val_ds.annotations[:n]:
            img = load_image(ann.image_path)
            dets = predictor.predict([np.asarray(img)])[0]
            path = out / f"val_{ann.image_id}.png"
            draw_detections(img, dets, cfg.class_names).save(path)
            run.log_artifact(path, "images")


def print_ap_table(class_names: tuple[str, ...], val: Any, test: Any, final_split: str) -> None:
    table = Table(title="Average precision (VOC07 11-point, IoU > 0.5) of the selected checkpoint")
    table.add_column("class")
    table.add_column("val AP", justify="right")
    if test is not None:
        table.add_column(f"{final_split} AP", justify="right")
    for c in class_names:
        row = [c, f"{100 * val.ap[c]:.1f}"]
        if test is not None:
            row.append(f"{100 * test.ap[c]:.1f}")
        table.add_row(*row)
    row = ["[bold]mAP", f"[bold]{100 * val.map:.1f}"] + ([f"[bold]{100 * test.map:.1f}"] if test is not None else [])
    table.add_row(*row)
    if not math.isnan(val.map_coco):
        table.add_row("mAP COCO", f"{100 * val.map_coco:.1f}",
                      *([f"{100 * test.map_coco:.1f}"] if test is not None else []))
    Console().print(table)
