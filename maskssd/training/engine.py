"""The training engine: optimiser and schedule builders, one-epoch training, evaluation, and ``Trainer.fit``.

The engine knows nothing of MLflow: it reports through a :class:`~maskssd.training.tracker.RunLogger` (metrics,
checkpoints) and
``on_eval`` hooks (Optuna pruning). Every epoch's randomness derives from ``(seed, epoch)``, so a resumed run
repeats an uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskssd.data import Batch
from maskssd.data.sampling import epoch_batches
from maskssd.errors import NonFiniteLossError, TrainingInterrupted
from maskssd.evaluation.detections_file import annotation_targets
from maskssd.evaluation.metrics import DetectionEvaluator, EvalResult
from maskssd.ssd.checkpoint import FORMAT_VERSION, atomic_save
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.postprocess import DecodeSpec, postprocess
from maskssd.ssd.tta import hflip_forward, mirror_permutation, tta_priors
from maskssd.training import distributed
from maskssd.training.checkpoint import rng_state
from maskssd.training.config import EMA_WARMUP_STEPS, ExperimentConfig, OptimSection, ScheduleSection
from maskssd.training.ema import ModelEma
from maskssd.training.tracker import NullTracker, RunLogger


# ------------------------------------------------------------------------------------- optimisation
def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW with the biases in their own group at ``bias_lr_mult`` x lr (the paper's code: 2)."""
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
    groups = [{"params": others, "lr": cfg.lr}, {"params": biases, "lr": cfg.lr * cfg.bias_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _cosine(floor: float, t: float) -> float:
    """Half a cosine from 1 (t = 0) down to ``floor`` (t = 1)."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def _onecycle(cfg: ScheduleSection, epochs: int, progress: float) -> float:
    """Cosine up from ``warmup_start_ratio`` to 1 over ``pct_start`` of training, then cosine down to
    ``min_lr_ratio`` (torch's OneCycleLR with cosine annealing; the peak is ``optim.lr``)."""
    peak = cfg.pct_start * epochs
    if progress < peak:
        return 1 - _cosine(0.0, progress / peak) * (1 - cfg.warmup_start_ratio)
    return _cosine(cfg.min_lr_ratio, (progress - peak) / max(epochs - peak, 1e-9))


def _cosine_restarts(cfg: ScheduleSection, progress: float) -> float:
    """SGDR (Loshchilov and Hutter, 2017): cosine down to ``min_lr_ratio`` over ``restart_epochs``, then again
    from the top over a period ``restart_mult`` times longer, and so on (after any warm-up)."""
    t, period = max(progress - cfg.warmup_epochs, 0.0), cfg.restart_epochs
    if cfg.restart_mult == 1:
        t = math.fmod(t, period)
    else:
        while t >= period:
            t, period = t - period, period * cfg.restart_mult
    return _cosine(cfg.min_lr_ratio, t / period)


def lr_factor(cfg: ScheduleSection, epochs: int, progress: float) -> float:
    """The learning-rate multiplier at ``progress`` epochs (a float: schedules step per iteration)."""
    if cfg.name == "multistep":
        f = cfg.decay_lr_to ** sum(progress >= e - 1 for e in cfg.decay_lr_at)  # decay_lr_at: 1-based epochs
    elif cfg.name == "cosine":
        t = min(max(progress - cfg.warmup_epochs, 0.0) / max(epochs - cfg.warmup_epochs, 1e-9), 1.0)
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif cfg.name == "onecycle":
        f = _onecycle(cfg, epochs, progress)
    elif cfg.name == "cosine_restarts":
        f = _cosine_restarts(cfg, progress)
    else:
        f = 1.0
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        f *= cfg.warmup_start_ratio + (1 - cfg.warmup_start_ratio) * progress / cfg.warmup_epochs
    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection, epochs: int, iters_per_epoch: int | Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` (its state is one counter, so it resumes exactly).

    ``iters_per_epoch`` is one count, or one per epoch when epochs differ in length (repeat-factor
    sampling): iteration ``it`` is then at epoch ``e + (it - start of e) / length of e``.
    """
    if isinstance(iters_per_epoch, int):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: lr_factor(cfg, epochs, it / max(iters_per_epoch, 1))
        )
    lengths = [max(int(n), 1) for n in iters_per_epoch]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)

    def progress(it: int) -> float:
        e = min(bisect.bisect_right(starts, it) - 1, len(lengths) - 1)
        return e + (it - starts[e]) / lengths[e]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, epochs, progress(it)))


# -------------------------------------------------------------------------------------------- loops
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX): without them CPU autocast to bfloat16
    emulates and is slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(
    device: torch.device, enabled: bool, cpu_bf16: bool = False
) -> contextlib.AbstractContextManager:
    """Mixed precision: ``enabled`` on GPU (bfloat16, else float16); ``cpu_bf16`` on a CPU with bf16 support."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainSpec:
    """What ``fit`` needs beyond the model: the epochs, selection rule and detection settings."""

    epochs: int
    seed: int = 0
    eval_every: int = 1
    save_every: int = 1
    best_metric: str = "val_map"
    best_after_epoch: int = 0
    grad_clip: float = 0.0
    amp: bool = True
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    coco: bool = True
    progress: bool = True
    channels_last: bool = False
    tta_hflip: bool = False
    cpu_bf16: bool = False  # bfloat16 autocast of the training forward on CPU; evaluation stays float32
    ema_decay: float = 0.0  # 0: no weight average
    ema_warmup_steps: float = EMA_WARMUP_STEPS

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, progress: bool = True) -> TrainSpec:
        t = cfg.train
        return cls(
            epochs=t.epochs,
            seed=cfg.experiment.seed,
            eval_every=t.eval_every,
            save_every=t.save_every,
            best_metric=t.best_metric,
            best_after_epoch=t.best_after_epoch,
            grad_clip=cfg.optim.grad_clip,
            amp=t.amp,
            decode=DecodeSpec.from_config(cfg.eval),
            coco=cfg.eval.coco,
            progress=progress,
            channels_last=t.channels_last,
            tta_hflip=cfg.eval.tta_hflip,
            cpu_bf16=t.cpu_bf16,
            ema_decay=t.ema_decay,
            ema_warmup_steps=t.ema_warmup_steps,
        )


@dataclass
class TrainState:
    epoch: int = 0  # last completed epoch (1-based)
    best_value: float | None = None
    best_epoch: int | None = None
    last_saved_epoch: int = 0


def curve_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Per-epoch metrics under their logged names: ``val_map`` -> ``val/map``, ``train_loss`` -> ``train/loss``,
    the rest (``lr``, timings) under ``train/``. MLflow's run page groups metrics by the prefix before ``/``
    and shows those sections before the unprefixed ones, so the per-epoch curves come before the selected
    checkpoint's single-point results (``val_map``, ``test_map``, ``best_epoch``)."""
    out = {}
    for key, value in metrics.items():
        split, sep, rest = key.partition("_")
        out[f"{split}/{rest}" if sep and split in ("train", "val") else f"train/{key}"] = value
    return out


def _finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value):
        raise NonFiniteLossError(what)


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    class_names: tuple[str, ...],
    device: torch.device,
    loss_fn: MultiBoxLoss | None = None,
    decode: DecodeSpec | None = None,
    compute_map: bool = True,
    coco: bool = True,
    amp: bool = False,
    prefix: str = "val",
    collect: list[tuple[str, Any]] | None = None,
    channels_last: bool = False,
    tta_hflip: bool = False,
) -> tuple[dict[str, float], EvalResult | None]:
    """Loss (and its parts) on a split and, with ``compute_map``, every detection metric, in one pass.

    ``tta_hflip``: detections from the images and their mirrors, merged before NMS (:mod:`maskssd.ssd.tta`);
    the loss stays the plain images'.

    ``collect`` (a list) receives ``(image_id, Detections in original pixels)`` for every image. In a
    distributed run each rank evaluates its shard; losses are averaged and per-image results gathered, in
    dataset order, so every metric equals the single-process value.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # total, conf, loc, batches
    records: list[tuple[int, str, Any, torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, float]]] = []
    annotations = getattr(loader.dataset, "annotations", None)
    order = {a.image_id: i for i, a in enumerate(annotations)} if annotations is not None else {}
    priors = model.priors_cxcy
    perm = mirror_permutation(model.prior_spec).to(priors.device) if tta_hflip else None
    if perm is not None:
        priors = tta_priors(priors)
    want_dets = compute_map or collect is not None
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, amp):
                (locs, scores), (det_locs, det_scores) = _eval_forward(
                    model, batch.images, channels_last, perm
                )
            if loss_fn is not None:
                out = loss_fn(locs, scores, batch.boxes, batch.labels)
                sums += torch.tensor(
                    [out.total.item(), out.conf.item(), out.loc.item(), 1.0], dtype=torch.float64
                )
            if not want_dets:
                continue
            dets = postprocess(det_locs, det_scores, priors, decode or DecodeSpec(), batch.sizes)
            for k, (image_id, d) in enumerate(zip(batch.image_ids, dets)):
                w, h = batch.sizes[k].tolist()
                if image_id in order:  # the annotation's pixel boxes: what a saved file re-scores against
                    gt = annotation_targets(annotations[order[image_id]])
                else:
                    scale = torch.tensor([w, h, w, h], device=batch.boxes[k].device)
                    gt = ((batch.boxes[k] * scale).cpu(), batch.labels[k].cpu(), batch.difficult[k].cpu())
                records.append((order.get(image_id, len(records)), image_id, d.to_cpu(), *gt, (w, h)))
    sums = distributed.all_reduce_sum(sums)
    if want_dets and distributed.active():
        records = [r for part in distributed.gather_objects(records) for r in part]
    records.sort(key=lambda r: r[0])
    metrics: dict[str, float] = {}
    if loss_fn is not None:
        mean = (sums[:3] / max(float(sums[3]), 1.0)).tolist()
        metrics = {f"{prefix}_loss": mean[0], f"{prefix}_loss_conf": mean[1], f"{prefix}_loss_loc": mean[2]}
    if collect is not None:
        collect.extend((r[1], r[2]) for r in records)
    result = None
    if compute_map:
        evaluator = DetectionEvaluator(class_names)
        evaluator.update(
            [r[2].boxes for r in records],
            [r[2].labels for r in records],
            [r[2].scores for r in records],
            [r[3] for r in records],
            [r[4] for r in records],
            [r[5] for r in records],
            [r[6] for r in records],
        )
        result = evaluator.compute(coco=coco)
        metrics.update(result.as_metrics(prefix))
    return metrics, result


def _eval_forward(
    model: nn.Module, images: torch.Tensor, channels_last: bool, perm: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The predictions for the loss and those to decode: the same, or (with the mirror permutation ``perm``)
    the latter merged with the mirrored images' predictions."""

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    if perm is None:
        out = forward(images)
        return out, out
    return hflip_forward(forward, images, perm)


class Trainer:
    """Holds what training mutates; ``fit`` runs epochs ``state.epoch + 1 .. spec.epochs``."""

    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: MultiBoxLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: torch.utils.data.DataLoader,
        val_loader: torch.utils.data.DataLoader,
        spec: TrainSpec,
        class_names: tuple[str, ...],
        device: torch.device,
        checkpoint_dir: Path,
        extra_state: Mapping[str, Any] | None = None,
        logger: RunLogger | None = None,
        on_eval: list[Callable[[int, dict[str, float]], None]] | None = None,
        train_model: nn.Module | None = None,
        is_main: bool = True,
        sized_loss: Callable[[int], MultiBoxLoss] | None = None,
    ):
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        # progressive resizing: the loss for batches of another input size (its priors); None: one size only
        self.sized_loss = sized_loss
        self.train_model = train_model or model  # a DistributedDataParallel wrapper when distributed
        self.train_loader, self.val_loader = train_loader, val_loader
        self.spec, self.class_names, self.device = spec, class_names, device
        self.checkpoint_dir = Path(checkpoint_dir)
        self.extra_state = dict(extra_state or {})
        self.logger = logger or NullTracker()
        self.on_eval = on_eval or []
        self.state = TrainState()
        self.is_main = is_main
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=spec.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        )
        self._snapshot: dict[str, Any] | None = None
        self.ema = ModelEma(model, spec.ema_decay, spec.ema_warmup_steps) if spec.ema_decay > 0 else None

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated, selected and saved as ``model``: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict[str, Any]:
        """Everything training mutates, as tensors and plain values (it loads with ``weights_only=True``).

        ``model`` holds the evaluated weights: the EMA's when there is one, the trained (``raw_model``) and the
        average's update count then kept beside it for an exact resume."""
        best = self.state.best_value
        ema = (
            {}
            if self.ema is None
            else {"raw_model": self.model.state_dict(), "ema_updates": self.ema.updates}
        )
        return {
            "format": FORMAT_VERSION,
            "model": self.eval_model.state_dict(),
            **ema,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "best_value": None if best is None else float(best),  # a metric may be a numpy float
            "best_epoch": self.state.best_epoch,
            "rng": rng_state(),
            "build_args": getattr(self.model, "build_args", {}),
            "class_names": list(self.class_names),
            **self.extra_state,
        }

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        if self.ema is not None and "raw_model" in ckpt:
            self.model.load_state_dict(ckpt["raw_model"])
            self.ema.load(ckpt["model"], ckpt["ema_updates"])
        else:
            self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(ckpt["epoch"], ckpt.get("best_value"), ckpt.get("best_epoch"), ckpt["epoch"])

    def _save(self, kind: str, ckpt: dict[str, Any] | None = None) -> Path | None:
        if not self.is_main:
            return None
        path = atomic_save(ckpt or self.checkpoint(), self.checkpoint_dir / f"{kind}.pt")
        self.logger.log_checkpoint(path, kind)
        return path

    # ------------------------------------------------------------------------------------ epochs
    def train_one_epoch(self, epoch: int, progress: Any = None, task: Any = None) -> dict[str, float]:
        self.train_model.train()
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        torch.manual_seed(self.spec.seed * 1009 + epoch)
        sums, n_batches, n_images, t0 = torch.zeros(3, dtype=torch.float64), 0, 0, time.perf_counter()
        for step, batch in enumerate(self.train_loader):
            batch: Batch = batch.to(self.device, non_blocking=True)
            images = (
                batch.images.contiguous(memory_format=torch.channels_last)
                if self.spec.channels_last
                else batch.images
            )
            with autocast(self.device, self.spec.amp, self.spec.cpu_bf16):
                locs, scores = self.train_model(images)
            out = self._loss_for(images.shape[-1])(locs, scores, batch.boxes, batch.labels)
            _finite(
                out.total,
                f"loss is {out.total.item()} at epoch {epoch}, step {step + 1} "
                f"(conf {out.conf.item():.4g}, loc {out.loc.item():.4g}); "
                "try a lower optim.lr, gradient clipping (optim.grad_clip) or warm-up",
            )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.total).backward()
            if self.spec.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            self.scheduler.step()
            sums += torch.tensor([out.total.item(), out.conf.item(), out.loc.item()], dtype=torch.float64)
            n_batches += 1
            n_images += len(batch)
            if progress is not None:
                progress.update(task, advance=1, loss=sums[0].item() / n_batches)
        seconds = time.perf_counter() - t0
        # distributed: average over every rank's batches; images/s of all ranks together
        totals = distributed.all_reduce_sum(
            torch.cat([sums, torch.tensor([n_batches, n_images], dtype=torch.float64)])
        )
        mean = (totals[:3] / max(float(totals[3]), 1.0)).tolist()
        return {
            "train_loss": mean[0],
            "train_loss_conf": mean[1],
            "train_loss_loc": mean[2],
            "epoch_seconds": seconds,
            "images_per_second": float(totals[4]) / max(seconds, 1e-9),
        }

    def _loss_for(self, size: int) -> MultiBoxLoss:
        if self.sized_loss is None or size == self.model.input_size:
            return self.loss_fn
        return self.sized_loss(size)

    def _improved(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        name = self.spec.best_metric
        if epoch <= self.spec.best_after_epoch or name not in metrics:
            return False
        value = metrics[name]
        better = self.state.best_value is None or (
            value < self.state.best_value if name.endswith("loss") else value > self.state.best_value
        )
        if better:
            self.state.best_value, self.state.best_epoch = value, epoch
        return better

    def fit(self) -> TrainState:
        """Train to ``spec.epochs``; Ctrl-C/SIGTERM save the last completed epoch and raise TrainingInterrupted."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        spec = self.spec
        columns = [
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        progress = Progress(*columns, disable=not (spec.progress and self.is_main), transient=False)
        try:
            with progress:
                total = sum(
                    epoch_batches(self.train_loader, e) for e in range(self.state.epoch + 1, spec.epochs + 1)
                )
                task = progress.add_task(
                    "train", total=total, epoch=self.state.epoch + 1, epochs=spec.epochs, loss=0.0
                )
                for epoch in range(self.state.epoch + 1, spec.epochs + 1):
                    progress.update(task, epoch=epoch)
                    lr = self.optimizer.param_groups[0]["lr"]
                    metrics = self.train_one_epoch(epoch, progress, task)
                    do_map = epoch % spec.eval_every == 0 or epoch == spec.epochs
                    val, _ = evaluate(
                        self.eval_model,
                        self.val_loader,
                        class_names=self.class_names,
                        device=self.device,
                        loss_fn=self.loss_fn,
                        decode=spec.decode,
                        compute_map=do_map,
                        coco=spec.coco,
                        amp=spec.amp,
                        channels_last=spec.channels_last,
                        tta_hflip=spec.tta_hflip,
                    )
                    metrics.update(val)
                    metrics["lr"] = lr
                    self.state.epoch = epoch
                    self.logger.log_metrics(curve_metrics(metrics), step=epoch)
                    if self._improved(epoch, metrics):
                        self._save("best")
                    if epoch % spec.save_every == 0 or epoch == spec.epochs:
                        self._save("last")
                        self.state.last_saved_epoch = epoch
                        self._snapshot = None
                    elif self.is_main:
                        self._snapshot = copy.deepcopy(self.checkpoint())
                    if do_map:
                        for hook in self.on_eval:
                            hook(epoch, metrics)
        except KeyboardInterrupt:
            if self.state.last_saved_epoch < self.state.epoch and self._snapshot is not None:
                self._save("last", self._snapshot)
                self.state.last_saved_epoch = self.state.epoch
            raise TrainingInterrupted(f"interrupted after epoch {self.state.last_saved_epoch}") from None
        return self.state
