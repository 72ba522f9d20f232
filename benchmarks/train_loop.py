"""Benchmark: what the training loop waits on besides the model, same process, cases interleaved.

1. **Host reads of the loss.** :meth:`maskssd.training.engine.Trainer.train_one_epoch` on fixed batches with
   ``train.log_every = 1`` (the loss read from the device after every step, as the loop did before: its NaN
   check built a message with three ``.item()`` calls and summed three more each step) against the default
   ``log_every = 20`` (nanoGPT's log interval: one read per 20 steps). On a CPU a read is a memory copy, so
   the ratio is expected near 1; on a GPU each read is a synchronisation that drains the queue.
2. **COCO AP at every evaluation epoch.** The per-epoch evaluation scores the validation split with
   pycocotools (the slow part) only when ``eval.coco_curves`` asks; it used to at every evaluation epoch.
   ``evaluate_set(coco=True)`` against ``coco=False`` on 128 images x 200 detections (``benchmarks.eval_map``).

Run: ``.venv/bin/python -m benchmarks.train_loop [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from benchmarks._timing import add_record_arg, add_threads_arg, machine, print_table, save_record, set_threads


def _trainer(model_name: str, size: int, batch: int, steps: int, tmp: Path, log_every: int):
    from maskssd.data import Batch
    from maskssd.ssd.loss import MultiBoxLoss
    from maskssd.ssd.models import build_model
    from maskssd.training.config import validate
    from maskssd.training.engine import Trainer
    from maskssd.training.optim import build_optimizer, build_scheduler
    from maskssd.training.store import LocalCheckpoints

    cfg = validate(
        {
            "data": {"root": str(tmp)},
            "model": {"name": model_name, "input_size": size},
            "train": {"epochs": 1},
        },
        "benchmark",
    )
    cfg.train.log_every = log_every
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=4, input_size=size, pretrained=False).train()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        xy = torch.rand(batch, 3, 2, generator=g) * 0.6
        boxes = [torch.cat([c, c + 0.1 + 0.2 * torch.rand(3, 2, generator=g)], 1) for c in xy]
        labels = [torch.randint(1, 4, (3,), generator=g) for _ in range(batch)]
        images = torch.rand(batch, 3, size, size, generator=g)
        sizes = torch.full((batch, 2), float(size))
        difficult = [torch.zeros(3, dtype=torch.bool) for _ in range(batch)]
        batches.append(Batch(images, boxes, labels, difficult, [str(i) for i in range(batch)], sizes))

    class Loader(list):
        sampler = None

    opt = build_optimizer(model, cfg.optim)
    return Trainer(
        cfg=cfg,
        model=model,
        loss_fn=MultiBoxLoss(model.priors_cxcy),
        optimizer=opt,
        scheduler=build_scheduler(opt, cfg.schedule, 1, steps),
        train_loader=Loader(batches),
        val_loader=Loader(),
        device=torch.device("cpu"),
        store=LocalCheckpoints(tmp),
    )


def interleaved(cases: dict[str, object], repeat: int) -> dict[str, float]:
    """Median seconds of each callable, the cases run in turn ``repeat`` times after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeat + 1):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssdlite_effnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per timed epoch")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the tiny model, 20 steps, 3 repeats")
    add_threads_arg(parser, allocator=False)
    add_record_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads, default_allocator=False)
    if args.quick:
        args.model, args.size, args.steps, args.repeat = "tiny", 96, 20, 3

    from benchmarks.eval_map import CLASSES, make_data
    from maskssd.evaluation.metrics import evaluate_set
    from maskssd.evaluation.records import EvalSet

    with TemporaryDirectory() as tmp:
        every_step = _trainer(args.model, args.size, args.batch, args.steps, Path(tmp), 1)
        interval = _trainer(args.model, args.size, args.batch, args.steps, Path(tmp), 20)
        loop = interleaved(
            {"every": lambda: every_step.train_one_epoch(1), "interval": lambda: interval.train_one_epoch(1)},
            args.repeat,
        )
    evalset = EvalSet.from_lists(*make_data(), CLASSES, sizes=[(400, 300)] * 128)
    ev = interleaved(
        {"coco": lambda: evaluate_set(evalset, coco=True), "voc": lambda: evaluate_set(evalset, coco=False)},
        args.repeat,
    )
    base = "loss read after every step (log_every 1, as before)"
    print_table(
        f"One training epoch of the engine: {args.model}, {args.steps} steps of batch {args.batch} x {args.size} px "
        f"({machine()}; median of {args.repeat}, cases interleaved)",
        [
            {"name": base, "seconds": loop["every"]},
            {
                "name": "loss read every 20 steps (log_every 20)",
                "seconds": loop["interval"],
                "baseline": base,
            },
        ],
    )
    coco = "an evaluation epoch's metrics with COCO (before)"
    print_table(
        f"An evaluation epoch's metrics: 128 images x 200 detections ({machine()}; median of {args.repeat})",
        [
            {"name": coco, "seconds": ev["coco"]},
            {
                "name": "without COCO (eval.coco_curves off, the default)",
                "seconds": ev["voc"],
                "baseline": coco,
            },
        ],
    )

    save_record(args.record, "train_loop")


if __name__ == "__main__":
    main()
