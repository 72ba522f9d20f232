"""Benchmark: MultiBox matching + loss, batched (maskssd.loss) vs the tutorial's per-image loop.

A batch of 32 at the SSD300's 8732 priors, 4 classes, 1-20 realistic face boxes per image. Both must give the
same loss. Run: ``.venv/bin/python -m benchmarks.loss_matching [--quick]``.
"""

from __future__ import annotations

import argparse

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
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.priors import PriorSpec
from tests.reference.tutorial import MultiBoxLoss as TutorialMultiBoxLoss

N_CLASSES = 4


# ------------------------------------------------------------------------------------------- data
def make_batch(batch: int, n_priors: int, seed: int = 0):
    """Face boxes of 2-40 % of the image side (a few elongated), 1-20 per image, labels 1..3."""
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, 21, (1,), generator=g))
        side = 0.02 + torch.rand(n, 1, generator=g) ** 2 * 0.38
        wh = side * torch.cat([torch.ones(n, 1), 1.0 + 0.4 * torch.rand(n, 1, generator=g)], 1)
        wh = wh.clamp(max=0.95)
        c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat([c - wh / 2, c + wh / 2], 1))
        labels.append(
            torch.multinomial(torch.tensor([0.7, 0.22, 0.08]), n, replacement=True, generator=g) + 1
        )
    locs = torch.randn(batch, n_priors, 4, generator=g)
    scores = torch.randn(batch, n_priors, N_CLASSES, generator=g)
    return locs, scores, boxes, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--baseline-repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a few repeats only")
    add_threads_arg(parser)
    add_record_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads, args.default_allocator)
    rep, base_rep = (3, 3) if args.quick else (args.repeat, args.baseline_repeat)

    priors = PriorSpec.ssd300().priors()
    locs, scores, boxes, labels = make_batch(args.batch, priors.shape[0])
    locs.requires_grad_(True)
    scores.requires_grad_(True)
    ours = MultiBoxLoss(priors)
    ref = TutorialMultiBoxLoss(priors)

    out, expected = ours(locs, scores, boxes, labels).total, ref(locs, scores, boxes, labels)
    if not torch.allclose(out, expected, rtol=1e-5, atol=1e-5):
        raise SystemExit(f"loss mismatch: maskssd {out.item()!r} vs tutorial {expected.item()!r}")
    n_obj = sum(int(b.shape[0]) for b in boxes)
    gt, counts = torch.cat(boxes), torch.tensor([int(b.shape[0]) for b in boxes])

    def fwd_bwd(fn):
        def run():
            locs.grad = scores.grad = None
            fn().backward()

        return run

    base_match = "tutorial matching loop"
    base_fwd = "tutorial loss, forward"
    base_fb = "tutorial loss, forward+backward"
    rows = [
        {
            "name": base_match,
            "note": f"{args.batch} images, {n_obj} objects",
            "seconds": median_time(lambda: ref.match(boxes, labels), base_rep),
        },
        {
            "name": "maskssd MultiBoxLoss.match",
            "baseline": base_match,
            "note": "sparse compiled matcher (CPU)",
            "seconds": median_time(lambda: ours.match(boxes, labels), rep),
        },
        {
            "name": "maskssd assign_dense (the GPU code, on CPU)",
            "baseline": base_match,
            "note": "batched IoU of every object and prior",
            "seconds": median_time(lambda: ours.assign_dense(gt, counts), rep),
        },
        {
            "name": base_fwd,
            "note": "per-image loop, nn.L1Loss + CE, sort for hard negatives",
            "seconds": median_time(lambda: ref(locs, scores, boxes, labels), base_rep),
        },
        {
            "name": "maskssd MultiBoxLoss, forward",
            "baseline": base_fwd,
            "note": "compiled matching + bounded hard-negative selection, CE on kept rows",
            "seconds": median_time(lambda: ours(locs, scores, boxes, labels), rep),
        },
        {
            "name": base_fb,
            "seconds": median_time(fwd_bwd(lambda: ref(locs, scores, boxes, labels)), base_rep),
        },
        {
            "name": "maskssd MultiBoxLoss, forward+backward",
            "baseline": base_fb,
            "seconds": median_time(fwd_bwd(lambda: ours(locs, scores, boxes, labels).total), rep),
        },
    ]
    print_table(
        f"MultiBox matching + loss: batch {args.batch}, {priors.shape[0]} priors, {N_CLASSES} classes "
        f"({machine()}; {rep} runs, baseline {base_rep})",
        rows,
    )
    print(f"same loss: maskssd {out.item():.7f} vs tutorial {expected.item():.7f}")

    save_record(args.record, "loss_matching")


if __name__ == "__main__":
    main()
