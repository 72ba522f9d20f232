"""Benchmark: training-pipeline images/s (load + decode + SSD augmentation + collate) on the real data.

The real Face Mask Detection paper train split goes through exactly what training uses
(``FaceMaskDataset`` + ``train_transform`` + ``maskssd.training.build.build_loader``: ``SeededSampler`` and
``collate``) with 0, 1 and 2 workers, image cache off and on, next to a plain baseline in the same run:
PIL open + ``convert("RGB")`` + resize + to tensor in one process, no augmentation.

Each configuration reads ``--batches`` batches after ``--warmup`` warm-up batches (worker start-up and the
first prefetch), ``--repeats`` times (one epoch of a fixed subset each); the table gives the median.
With the cache on, the subset's images are decoded into the cache first (what a second epoch sees; forked
workers inherit it), so "cache on" is the steady state of a multi-epoch run.

On a machine busy with other work, torch's intra-op threads in the main process (workers 0, and the
baseline's tensor ops) can wait on each other for whole time slices: compare with ``--threads 1``.

Run: ``.venv/bin/python -m benchmarks.data_loading [--data DIR] [--size 384] [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from benchmarks._timing import add_record_arg, record_rich, save_record
from maskssd.data import Annotation, FaceMaskDataset, load_split
from maskssd.data.transforms import AugmentSpec, eval_transform, train_transform

REPO = Path(__file__).resolve().parents[1]

DEFAULT_DATA = REPO.parent / "shared" / "data" / "face-mask-detection"


def baseline_batches(anns: list[Annotation], size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The plain loop: PIL open, convert RGB, resize, to a float tensor, stack. One process, no augmentation."""
    from torchvision.transforms.v2 import functional as F

    for start in range(0, len(anns), batch_size):
        imgs = []
        for a in anns[start : start + batch_size]:
            with Image.open(a.image_path) as im:
                img = im.convert("RGB").resize((size, size), Image.BILINEAR)
            imgs.append(F.pil_to_tensor(img).float().div_(255.0))
        yield torch.stack(imgs)


def time_batches(
    make_iter: Callable[[int], Iterator], warmup: int, batches: int, batch_size: int, repeats: int
) -> list[float]:
    """Images/s of ``batches`` batches after ``warmup`` ones, per repeat (``make_iter(repeat)`` -> batches)."""
    rates = []
    for r in range(repeats):
        it = make_iter(r)
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            b = next(it)
            n += len(b)
        rates.append(n / (time.perf_counter() - t0))
        del it
    assert n == batches * batch_size, "the subset is too small for the requested batches"
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"dataset root with splits/SPLIT_NAME/ (default: {DEFAULT_DATA})",
    )
    p.add_argument("--split-name", default="paper")
    p.add_argument("--size", type=int, default=384, help="network input size (default 384)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=10, help="timed batches per repeat (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the main process (default: torch's own)",
    )
    p.add_argument("--quick", action="store_true", help="3 batches, 1 repeat: a smoke run")
    add_record_arg(p)
    args = p.parse_args()
    if args.quick:
        args.batches, args.repeats = 3, 1

    if not (args.data / "splits" / args.split_name / "train.txt").is_file():
        sys.exit(
            f"error: no dataset at {args.data} (expected {args.data}/splits/{args.split_name}/train.txt): "
            "the real face-mask dataset lives in ../shared/data/face-mask-detection beside the repository; "
            "pass --data DIR"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    from maskssd.training.build import build_loader  # heavy import (MLflow): after the argument checks

    anns = load_split(args.data, "train", args.split_name)
    bs = args.batch_size
    n_used = min(len(anns), (args.warmup + args.batches) * bs)
    anns = anns[:n_used]
    spec = AugmentSpec()
    console = Console(width=max(Console().width, 110))
    console.print(
        f"{args.data} {args.split_name}/train: {n_used} images used, input {args.size}, batch {bs}, "
        f"{args.warmup} warm-up + {args.batches} timed batches x {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}",
        highlight=False,
    )

    rows: list[tuple[str, str, str, list[float]]] = []
    base = time_batches(
        lambda r: baseline_batches(anns, args.size, bs), args.warmup, args.batches, bs, args.repeats
    )
    rows.append(("baseline: PIL open + RGB + resize + to tensor", "0", "-", base))

    ds_eval = FaceMaskDataset(anns, eval_transform(args.size))
    eval_loader = build_loader(ds_eval, bs, 0, seed=0, shuffle=True)
    rows.append(
        (
            "eval: load + resize + collate",
            "0",
            "off",
            time_batches(lambda r: iter(eval_loader), args.warmup, args.batches, bs, args.repeats),
        )
    )

    for cache in (False, True):
        for workers in args.workers:
            ds = FaceMaskDataset(anns, train_transform(args.size, spec), cache_images=cache)
            if cache:
                for i in range(len(ds)):
                    ds.raw_sample(
                        i
                    )  # decodes into the cache: what every later epoch finds; forked workers inherit it
            loader = build_loader(ds, bs, workers, seed=0, shuffle=True)

            def epoch(r: int, loader=loader) -> Iterator:
                loader.sampler.set_epoch(r)
                return iter(loader)

            rates = time_batches(epoch, args.warmup, args.batches, bs, args.repeats)
            rows.append(
                ("train: load + SSD augment + collate", str(workers), "on" if cache else "off", rates)
            )
            del loader  # stops persistent workers

    base_rate = statistics.median(base)
    t = Table(title=f"training data pipeline, images/s (input {args.size}, batch {bs}; higher is better)")
    for col, just in (
        ("pipeline", "left"),
        ("workers", "right"),
        ("cache", "center"),
        ("images/s", "right"),
        ("ms / batch", "right"),
        ("vs baseline", "right"),
    ):
        t.add_column(col, justify=just)
    for name, workers, cache, rates in rows:
        med = statistics.median(rates)
        t.add_row(name, workers, cache, f"{med:.1f}", f"{1000 * bs / med:.0f}", f"{med / base_rate:.2f}x")
    console.print(record_rich(t))
    console.print(record_rich(crop_sampler_table(anns, args.repeats)))
    save_record(args.record, "data_loading")


def crop_sampler_table(anns: list[Annotation], repeats: int) -> Table:
    """SSD's IoU crop sampler per image, on these images' boxes: maskssd's batched trials against
    torchvision's ``RandomIoUCrop`` (one trial at a time), the baseline, with the same seed."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import RandomIoUCrop

    from maskssd.data.transforms import sample_iou_crop

    reference = RandomIoUCrop()
    cases = [
        (
            torch.from_numpy(a.boxes.copy()),
            a.width,
            a.height,
            tv_tensors.BoundingBoxes(
                torch.from_numpy(a.boxes.copy()), format="XYXY", canvas_size=(a.height, a.width)
            ),
            tv_tensors.Image(torch.zeros(3, a.height, a.width, dtype=torch.uint8)),
        )
        for a in anns
        if len(a.boxes)
    ]

    def per_image(fn: Callable) -> float:
        times = []
        for r in range(repeats):
            torch.manual_seed(r)
            start = time.perf_counter()
            for case in cases:
                fn(case)
            times.append((time.perf_counter() - start) / len(cases))
        return statistics.median(times)

    base = per_image(lambda c: reference.make_params([c[4], c[3]]))
    ours = per_image(lambda c: sample_iou_crop(c[0], c[1], c[2]))
    t = Table(title=f"IoU crop sampler, ms per image ({len(cases)} images with boxes; lower is better)")
    for col in ("sampler", "ms / image", "speed-up"):
        t.add_column(col, justify="left" if col == "sampler" else "right")
    t.add_row("baseline: torchvision RandomIoUCrop (40 trials one by one)", f"{1000 * base:.2f}", "1.00x")
    t.add_row("maskssd sample_iou_crop (40 trials as one batch)", f"{1000 * ours:.2f}", f"{base / ours:.2f}x")
    return t


if __name__ == "__main__":
    main()
