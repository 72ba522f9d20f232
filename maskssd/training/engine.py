"""The training loop: one epoch, evaluation, checkpoint selection and saving (:class:`Trainer`).

The engine knows nothing of MLflow: it logs metrics through a :class:`~maskssd.training.tracker.RunLogger`,
keeps checkpoints in a :class:`~maskssd.training.store.CheckpointStore`, calls ``on_eval`` hooks (Optuna
pruning) and reports progress to a :class:`TrainProgress` the caller supplies (the CLI's bar; the library
prints nothing). It reads its settings from the config's sections. As nanoGPT does, it reads the loss from the
device once per ``train.log_every`` steps, not at every step. Every epoch's randomness derives from
``(seed, epoch)``, so a resumed run repeats an uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from maskssd.data import Batch
from maskssd.data.sampling import epoch_batches
from maskssd.errors import CheckpointWriteError, NonFiniteLossError, TrainingInterrupted
from maskssd.ssd.checkpoint import FORMAT_VERSION, interrupts_deferred
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.postprocess import DecodeSpec
from maskssd.training import distributed
from maskssd.training.checkpoint import rng_state
from maskssd.training.config import ExperimentConfig
from maskssd.training.ema import ModelEma
from maskssd.training.predict import autocast, evaluate
from maskssd.training.store import CheckpointStore
from maskssd.training.tracker import NullTracker, RunLogger

__all__ = ["TrainProgress", "TrainState", "Trainer", "curve_metrics"]


class TrainProgress(Protocol):
    """What the loop reports as it goes (the CLI draws a bar from it)."""

    def start(self, total_steps: int, first_epoch: int, epochs: int) -> None: ...

    def advance(self, steps: int, epoch: int, loss: float) -> None:
        """``steps`` more optimiser steps done in ``epoch``; ``loss`` is the epoch's running mean."""
        ...

    def stop(self) -> None: ...


@dataclass
class TrainState:
    epoch: int = 0  # last completed epoch (1-based)
    best_value: float | None = None
    best_epoch: int | None = None
    last_saved_epoch: int = 0  # last epoch published to the run's store
    last_written_epoch: int = 0  # last epoch whose checkpoint is written locally


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


def read_losses(window: list[torch.Tensor], epoch: int, first_step: int) -> torch.Tensor:
    """The loss parts ``(total, conf, loc)`` of the steps in ``window`` on the host, float64, one row per step
    (one device sync); refuses a non-finite one, naming its step."""
    rows = torch.stack(window).double().cpu()
    bad = ~torch.isfinite(rows[:, 0])
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        total, conf, loc = rows[k].tolist()
        raise NonFiniteLossError(
            f"loss is {total} at epoch {epoch}, step {first_step + k} (conf {conf:.4g}, loc {loc:.4g}); "
            "try a lower optim.lr, gradient clipping (optim.grad_clip) or warm-up"
        )
    return rows


class Trainer:
    """Holds what training mutates; ``fit`` runs epochs ``state.epoch + 1 .. cfg.train.epochs``."""

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        model: nn.Module,
        loss_fn: MultiBoxLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: torch.utils.data.DataLoader,
        val_loader: torch.utils.data.DataLoader,
        device: torch.device,
        store: CheckpointStore,
        extra_state: Mapping[str, Any] | None = None,
        logger: RunLogger | None = None,
        on_eval: list[Callable[[int, dict[str, float]], None]] | None = None,
        train_model: nn.Module | None = None,
        sized_loss: Callable[[int], MultiBoxLoss] | None = None,
        progress: TrainProgress | None = None,
        cpu_bf16: bool | None = None,
    ):
        self.cfg, self.train_cfg = cfg, cfg.train
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        # progressive resizing: the loss for batches of another input size (its priors); None: one size only
        self.sized_loss = sized_loss
        self.train_model = train_model or model  # a DistributedDataParallel wrapper when distributed
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device, self.store = device, store
        self.extra_state = dict(extra_state or {})
        self.logger = logger or NullTracker()
        self.on_eval = on_eval or []
        self.progress = progress
        self.cpu_bf16 = cfg.train.cpu_bf16 if cpu_bf16 is None else cpu_bf16
        self.decode = DecodeSpec.from_config(cfg.eval)
        self.state = TrainState()
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=cfg.train.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        )
        t = cfg.train
        self.ema = ModelEma(model, t.ema_decay, t.ema_warmup_steps) if t.ema_decay > 0 else None

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
            "class_names": list(self.cfg.class_names),
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
        e = ckpt["epoch"]
        self.state = TrainState(e, ckpt.get("best_value"), ckpt.get("best_epoch"), e, e)

    # ------------------------------------------------------------------------------------ epochs
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.train_model.train()
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        torch.manual_seed(self.cfg.experiment.seed * 1009 + epoch)
        every, clip = self.train_cfg.log_every, self.cfg.optim.grad_clip
        sums, n_batches, n_images, t0 = torch.zeros(3, dtype=torch.float64), 0, 0, time.perf_counter()
        window: list[torch.Tensor] = []  # loss parts of the steps not read yet
        for step, batch in enumerate(self.train_loader, start=1):
            batch: Batch = batch.to(self.device, non_blocking=True)
            images = (
                batch.images.contiguous(memory_format=torch.channels_last)
                if self.train_cfg.channels_last
                else batch.images
            )
            with autocast(self.device, self.train_cfg.amp, self.cpu_bf16):
                locs, scores = self.train_model(images)
            out = self._loss_for(images.shape[-1])(locs, scores, batch.boxes, batch.labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.total).backward()
            if clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            self.scheduler.step()
            window.append(torch.stack([out.total, out.conf, out.loc]).detach())
            n_batches, n_images = n_batches + 1, n_images + len(batch)
            if step % every == 0:
                sums = self._read(window, epoch, step, sums, n_batches)
        if window:
            sums = self._read(window, epoch, n_batches, sums, n_batches)
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

    def _read(
        self, window: list[torch.Tensor], epoch: int, step: int, sums: torch.Tensor, n_batches: int
    ) -> torch.Tensor:
        """Add the window's losses to ``sums`` (step by step, as they were taken) and report progress."""
        for row in read_losses(window, epoch, step - len(window) + 1):
            sums = sums + row
        if self.progress is not None:
            self.progress.advance(len(window), epoch, float(sums[0]) / n_batches)
        window.clear()
        return sums

    def _save(self, kind: str, publish: bool) -> None:
        """Write (and publish) a checkpoint; a failed write (a full disk) stops the run, the previous intact."""
        try:
            self.store.save(self.checkpoint(), kind, publish=publish)
        except OSError as e:
            kept = self.state.last_written_epoch
            raise CheckpointWriteError.at(
                kept,
                f"could not write the {kind} checkpoint of epoch {self.state.epoch} in {self.store.local_dir}: "
                f"{e.strerror or e} (a full disk?); "
                + (f"the one of epoch {kept} is intact" if kept else "no epoch was saved")
                + ". Free space and resume",
            ) from None

    def _loss_for(self, size: int) -> MultiBoxLoss:
        if self.sized_loss is None or size == self.model.input_size:
            return self.loss_fn
        return self.sized_loss(size)

    def _improved(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        name = self.train_cfg.best_metric
        if epoch <= self.train_cfg.best_after_epoch or name not in metrics:
            return False
        value = metrics[name]
        better = self.state.best_value is None or (
            value < self.state.best_value if name.endswith("loss") else value > self.state.best_value
        )
        if better:
            self.state.best_value, self.state.best_epoch = value, epoch
        return better

    def _evaluate(self, epoch: int) -> tuple[dict[str, float], bool]:
        """The validation loss every epoch; mAP every ``train.eval_every`` epochs and at the last one."""
        t = self.train_cfg
        do_map = epoch % t.eval_every == 0 or epoch == t.epochs
        metrics, _ = evaluate(
            self.eval_model,
            self.val_loader,
            class_names=self.cfg.class_names,
            device=self.device,
            loss_fn=self.loss_fn,
            decode=self.decode,
            compute_map=do_map,
            coco=do_map and self.cfg.eval.coco_curves,
            amp=t.amp,
            channels_last=t.channels_last,
            tta_hflip=self.cfg.eval.tta_hflip,
        )
        return metrics, do_map

    def fit(self) -> TrainState:
        """Train to ``train.epochs``. Every epoch's checkpoint is written locally; it is published to the run's
        store every ``train.save_every`` epochs, at the end, and on Ctrl-C/SIGTERM (which then raise
        TrainingInterrupted)."""
        t = self.train_cfg
        first = self.state.epoch + 1
        if self.progress is not None:
            total = sum(epoch_batches(self.train_loader, e) for e in range(first, t.epochs + 1))
            self.progress.start(total, first, t.epochs)
        try:
            for epoch in range(first, t.epochs + 1):
                lr = self.optimizer.param_groups[0]["lr"]
                metrics = self.train_one_epoch(epoch)
                val, do_map = self._evaluate(epoch)
                metrics.update(val)
                metrics["lr"] = lr
                self.state.epoch = epoch
                if self._improved(epoch, metrics):  # the state first, then the report: a run stopped while
                    self._save("best", publish=True)  # reporting resumes after this epoch
                publish = epoch % t.save_every == 0 or epoch == t.epochs
                # the checkpoint and the epoch's report together: a resume starts after this epoch, so an
                # interrupt between the two would lose the epoch's metrics for good
                with interrupts_deferred():
                    self._save("last", publish=publish)
                    self.state.last_written_epoch = epoch
                    if publish:
                        self.state.last_saved_epoch = epoch
                    self.logger.log_metrics(curve_metrics(metrics), step=epoch)
                if do_map:
                    for hook in self.on_eval:
                        hook(epoch, metrics)
        except KeyboardInterrupt:
            if self.state.last_saved_epoch < self.state.last_written_epoch:
                self.store.publish("last")
                self.state.last_saved_epoch = self.state.last_written_epoch
            raise TrainingInterrupted(f"interrupted after epoch {self.state.last_saved_epoch}") from None
        finally:
            if self.progress is not None:
                self.progress.stop()
        return self.state
