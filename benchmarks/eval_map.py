"""Benchmark: VOC07 mAP, batched (maskssd.metrics) vs the tutorial's per-detection loop; COCO for reference.

128 images, 200 detections each, 3 classes, 5-30 objects per image; most detections are jittered copies
of objects (some of the wrong class, many duplicates), the rest clutter. Both implementations must give
the same mAP. Run: ``.venv/bin/python -m benchmarks.eval_map``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from benchmarks._timing import add_record_arg, record_rich, save_record
from maskssd.evaluation.metrics import average_precision, coco_map, evaluate_set
from maskssd.evaluation.records import EvalSet
from tests.reference.tutorial import calculate_map

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")
Images = tuple[list[torch.Tensor], ...]


def make_data(n_images: int = 128, n_dets: int = 200, seed: int = 0) -> Images:
    """Seeded, realistic-ish detections and objects in 400x300-pixel images (six per-image lists)."""
    g = torch.Generator().manual_seed(seed)
    n_cls = len(CLASSES)
    det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult = ([] for _ in range(6))
    for _ in range(n_images):
        n_gt = int(torch.randint(5, 31, (1,), generator=g))
        size = torch.rand(n_gt, 1, generator=g) * 70 + 10  # faces 10-80 px
        wh = size * torch.cat([torch.ones(n_gt, 1), 1.0 + 0.3 * torch.rand(n_gt, 1, generator=g)], 1)
        xy = torch.rand(n_gt, 2, generator=g) * (torch.tensor([400.0, 300.0]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.multinomial(torch.tensor([0.7, 0.22, 0.08]), n_gt, replacement=True, generator=g) + 1
        gt_boxes.append(boxes)
        gt_labels.append(labels)
        gt_difficult.append(torch.rand(n_gt, generator=g) < 0.05)

        n_near = int(n_dets * 0.7)
        src = torch.randint(0, n_gt, (n_near,), generator=g)
        jitter = torch.randn(n_near, 4, generator=g) * 0.15 * wh[src].repeat(1, 2)
        near = boxes[src] + jitter
        near_labels = torch.where(
            torch.rand(n_near, generator=g) < 0.85,
            labels[src],
            torch.randint(1, n_cls + 1, (n_near,), generator=g),
        )
        near_scores = (1.0 - jitter.abs().mean(1) / size[src, 0]) * torch.rand(n_near, generator=g).sqrt()
        n_far = n_dets - n_near
        far_xy = torch.rand(n_far, 2, generator=g) * 350
        far = torch.cat([far_xy, far_xy + torch.rand(n_far, 2, generator=g) * 60 + 8], 1)
        dets = torch.cat([near, far])
        dets = torch.cat([dets[:, :2], torch.maximum(dets[:, 2:], dets[:, :2] + 1)], 1)
        det_boxes.append(dets)
        det_labels.append(torch.cat([near_labels, torch.randint(1, n_cls + 1, (n_far,), generator=g)]))
        det_scores.append(torch.cat([near_scores.clamp(0, 1), torch.rand(n_far, generator=g) * 0.5]))
    return det_boxes, det_labels, det_scores, gt_boxes, gt_labels, gt_difficult


# --------------------------------------------------------------------------------------------- baseline
def loop_map(*data: list[torch.Tensor]) -> float:
    """The tutorial's ``calculate_mAP`` (one detection at a time): the mean over classes with objects."""
    return torch.tensor(calculate_map(*data, n_classes=len(CLASSES))).nanmean().item()


# --------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time in ms over ``repeats`` runs (after one warm-up) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--dets", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline-repeats", type=int, default=3, help="the loop takes seconds per run")
    add_record_arg(parser)
    args = parser.parse_args()

    data = make_data(args.images, args.dets)
    n_det = sum(int(t.numel()) for t in data[1])
    n_gt = sum(int(t.numel()) for t in data[4])

    evalset = EvalSet.from_lists(*data, CLASSES, sizes=[(400, 300)] * len(data[0]))

    def evaluator(coco: bool) -> Callable[[], object]:
        return lambda: evaluate_set(EvalSet.from_lists(*data, CLASSES), coco=coco)

    base_ms, base_map = timed(lambda: loop_map(*data), args.baseline_repeats)
    vec_ms, vec_result = timed(lambda: average_precision(*data, CLASSES, method="voc07"), args.repeats)
    v12_ms, _ = timed(lambda: average_precision(*data, CLASSES, method="voc12"), args.repeats)
    coco_ms, coco_result = timed(lambda: coco_map(evalset), max(1, args.repeats // 2))
    ev_ms, _ = timed(evaluator(False), args.repeats)
    vec_map = vec_result.map
    if not math.isclose(vec_map, base_map, abs_tol=1e-6):
        raise SystemExit(f"mAP mismatch: batched {vec_map!r} vs loop {base_map!r}")

    table = Table(
        title=f"VOC07 mAP: {args.images} images x {args.dets} detections ({n_det} detections, "
        f"{n_gt} objects, 3 classes), CPU, {torch.get_num_threads()} torch threads"
    )
    table.add_column("implementation")
    table.add_column("median ms", justify="right")
    table.add_column("ratio vs baseline", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("result", justify="right")
    rows = [
        (
            f"tutorial per-detection loop, voc07 (baseline, {args.baseline_repeats} runs)",
            base_ms,
            f"mAP {base_map:.6f}",
        ),
        (f"maskssd.metrics batched, voc07 ({args.repeats} runs)", vec_ms, f"mAP {vec_map:.6f}"),
        ("maskssd.metrics batched, voc12", v12_ms, ""),
        ("evaluate_set(coco=False): records, one matching, voc07+voc12+confusion", ev_ms, ""),
        (
            "pycocotools COCOeval via coco_map (info)",
            coco_ms,
            f"mAP {coco_result['map']:.4f}, AP50 {coco_result['ap50']:.4f}",
        ),
    ]
    for name, ms, result in rows:
        table.add_row(name, f"{ms:.1f}", f"{ms / base_ms:.4f}", f"{base_ms / ms:.1f}x", result)
    Console(width=max(Console().width, 140)).print(record_rich(table))
    print(f"same mAP: batched {vec_map:.9f} vs loop {base_map:.9f} (|diff| {abs(vec_map - base_map):.2e})")

    save_record(args.record, "eval_map")


if __name__ == "__main__":
    main()
