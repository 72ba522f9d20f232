"""Benchmark: bootstrap intervals of VOC AP, vectorised over resamples (maskssd.evaluation.bootstrap) vs a plain
loop that re-runs the evaluator on each resampled list of images.

The data of ``benchmarks.eval_map``: 128 images (the size of the paper's test split) x 200 detections, 3
classes. 1000 resamples. The loop is the obvious implementation: draw the images, build the resampled lists,
call ``average_precision`` (VOC07; the all-point AP would be a second call) or ``evaluate_set`` per
resample; it runs on the first ``--loop`` resamples and its median per-resample time is scaled to 1000 (said
in the table). Both give the same APs on those resamples (checked: max difference printed). Run:
``.venv/bin/python -m benchmarks.bootstrap [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._timing import (
    add_record_arg,
    add_threads_arg,
    machine,
    median_time,
    print_table,
    save_record,
    set_threads,
)
from benchmarks.eval_map import CLASSES, make_data
from maskssd.evaluation.bootstrap import bootstrap, mark, resample_weights, resampled_ap
from maskssd.evaluation.metrics import evaluate_set
from maskssd.evaluation.records import EvalSet
from maskssd.evaluation.voc import average_precision, match


def resampled_lists(data: tuple[list[torch.Tensor], ...], w: torch.Tensor) -> list[list[torch.Tensor]]:
    """The per-image lists of one resample: every image ``w[i]`` times, in image order."""
    idx = torch.repeat_interleave(torch.arange(w.shape[0]), w.long()).tolist()
    return [[x[i] for i in idx] for x in data]


def loop_time(fn, data: tuple[list[torch.Tensor], ...], weights: torch.Tensor) -> tuple[float, list]:
    """Median seconds per resample of ``fn(resampled lists)`` and its results."""
    times, results = [], []
    for w in weights:
        start = time.perf_counter()
        results.append(fn(resampled_lists(data, w)))
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def evaluator(lists: list[list[torch.Tensor]]) -> object:
    return evaluate_set(EvalSet.from_lists(*lists, CLASSES), coco=False)


def mark_lists(data: tuple[list[torch.Tensor], ...]) -> object:
    """The per-image lists as one set, matched once and marked for resampling."""
    return mark(match(EvalSet.from_lists(*data, CLASSES)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--dets", type=int, default=200)
    parser.add_argument("--n", type=int, default=1000, help="resamples (default 1000)")
    parser.add_argument("--loop", type=int, default=20, help="resamples the loop runs (scaled to --n)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few repeats only")
    add_threads_arg(parser, allocator=False)
    add_record_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    repeat, n_loop = (2, 5) if args.quick else (args.repeat, args.loop)

    data = make_data(args.images, args.dets)
    weights = resample_weights(args.images, args.n, seed=0)
    marked = mark_lists(data)
    vec = median_time(lambda: resampled_ap(marked, weights), repeat=repeat)
    marking = median_time(lambda: mark_lists(data), repeat=repeat)
    full = median_time(lambda: bootstrap(mark_lists(data), n=args.n), repeat=repeat)
    ap_loop, ap_results = loop_time(lambda s: average_precision(*s, CLASSES), data, weights[:n_loop])
    ev_loop, _ = loop_time(evaluator, data, weights[:n_loop])

    ap07, _ = resampled_ap(marked, weights[:n_loop])
    diff = max(
        abs(float(ap07[r, i]) - ap_results[r].ap[c]) for r in range(n_loop) for i, c in enumerate(CLASSES)
    )
    n_det = sum(int(t.numel()) for t in data[1])
    n_gt = sum(int(t.numel()) for t in data[4])
    scaled = f"{n_loop} resamples timed, median x {args.n}"
    print_table(
        f"{args.n} bootstrap resamples of {args.images} images x {args.dets} detections ({n_det} detections, "
        f"{n_gt} objects, 3 classes) ({machine()}; {repeat} runs)",
        [
            {
                "name": "loop: average_precision (VOC07) per resample",
                "seconds": ap_loop * args.n,
                "note": scaled,
            },
            {
                "name": "loop: evaluate_set(coco=False) per resample",
                "seconds": ev_loop * args.n,
                "baseline": "loop: average_precision (VOC07) per resample",
                "note": scaled + " (VOC07 + all-point + confusion)",
            },
            {
                "name": "maskssd resampled_ap (VOC07 + all-point)",
                "seconds": vec,
                "baseline": "loop: average_precision (VOC07) per resample",
                "note": "detections marked once (below)",
            },
            {"name": "maskssd match + mark (once per run)", "seconds": marking},
            {
                "name": "maskssd bootstrap(): mark + resamples + intervals",
                "seconds": full,
                "baseline": "loop: average_precision (VOC07) per resample",
            },
        ],
    )
    print(f"same APs on the {n_loop} looped resamples: max |difference| {diff:.1e}")

    save_record(args.record, "bootstrap")


if __name__ == "__main__":
    main()
