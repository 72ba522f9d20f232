"""Benchmark: MultiBox matching + loss, batched (maskssd.loss) vs the tutorial's per-image loop.

A batch of 32 at the SSD300's 8732 priors, 4 classes, 1-20 realistic face boxes per image. Both must give the
same loss. Run: ``.venv/bin/python benchmarks/loss_matching.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_threads_arg, machine, median_time, print_table, set_threads  # noqa: E402

from maskssd.loss import MultiBoxLoss  # noqa: E402
from maskssd.priors import PriorSpec  # noqa: E402

N_CLASSES = 4


# ------------------------------------------------------------------------ the tutorial, transcribed
def find_jaccard_overlap(set_1: torch.Tensor, set_2: torch.Tensor) -> torch.Tensor:
    lower = torch.max(set_1[:, :2].unsqueeze(1), set_2[:, :2].unsqueeze(0))
    upper = torch.min(set_1[:, 2:].unsqueeze(1), set_2[:, 2:].unsqueeze(0))
    dims = torch.clamp(upper - lower, min=0)
    intersection = dims[:, :, 0] * dims[:, :, 1]
    area_1 = (set_1[:, 2] - set_1[:, 0]) * (set_1[:, 3] - set_1[:, 1])
    area_2 = (set_2[:, 2] - set_2[:, 0]) * (set_2[:, 3] - set_2[:, 1])
    return intersection / (area_1.unsqueeze(1) + area_2.unsqueeze(0) - intersection)


def xy_to_cxcy(xy: torch.Tensor) -> torch.Tensor:
    return torch.cat([(xy[:, 2:] + xy[:, :2]) / 2, xy[:, 2:] - xy[:, :2]], 1)


def cxcy_to_xy(cxcy: torch.Tensor) -> torch.Tensor:
    return torch.cat([cxcy[:, :2] - (cxcy[:, 2:] / 2), cxcy[:, :2] + (cxcy[:, 2:] / 2)], 1)


def cxcy_to_gcxgcy(cxcy: torch.Tensor, priors_cxcy: torch.Tensor) -> torch.Tensor:
    return torch.cat([(cxcy[:, :2] - priors_cxcy[:, :2]) / (priors_cxcy[:, 2:] / 10),
                      torch.log(cxcy[:, 2:] / priors_cxcy[:, 2:]) * 5], 1)


class TutorialMultiBoxLoss(nn.Module):
    """``MultiBoxLoss`` of sgrvinod's a-PyTorch-Tutorial-to-Object-Detection (the reference paper's code)."""

    def __init__(self, priors_cxcy: torch.Tensor, threshold: float = 0.5, neg_pos_ratio: int = 3, alpha: float = 1.0):
        super().__init__()
        self.priors_cxcy = priors_cxcy
        self.priors_xy = cxcy_to_xy(priors_cxcy)
        self.threshold = threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.smooth_l1 = nn.L1Loss()
        self.cross_entropy = nn.CrossEntropyLoss(reduction="none")

    def match(self, boxes, labels, n_priors):
        batch_size = len(boxes)
        true_locs = torch.zeros((batch_size, n_priors, 4), dtype=torch.float)
        true_classes = torch.zeros((batch_size, n_priors), dtype=torch.long)
        for i in range(batch_size):
            n_objects = boxes[i].size(0)
            overlap = find_jaccard_overlap(boxes[i], self.priors_xy)
            overlap_for_each_prior, object_for_each_prior = overlap.max(dim=0)
            _, prior_for_each_object = overlap.max(dim=1)
            object_for_each_prior[prior_for_each_object] = torch.LongTensor(range(n_objects))
            overlap_for_each_prior[prior_for_each_object] = 1.0
            label_for_each_prior = labels[i][object_for_each_prior]
            label_for_each_prior[overlap_for_each_prior < self.threshold] = 0
            true_classes[i] = label_for_each_prior
            true_locs[i] = cxcy_to_gcxgcy(xy_to_cxcy(boxes[i][object_for_each_prior]), self.priors_cxcy)
        return true_classes, true_locs

    def forward(self, predicted_locs, predicted_scores, boxes, labels):
        batch_size = predicted_locs.size(0)
        n_priors = self.priors_cxcy.size(0)
        n_classes = predicted_scores.size(2)
        true_classes, true_locs = self.match(boxes, labels, n_priors)
        positive_priors = true_classes != 0
        loc_loss = self.smooth_l1(predicted_locs[positive_priors], true_locs[positive_priors])
        n_positives = positive_priors.sum(dim=1)
        n_hard_negatives = self.neg_pos_ratio * n_positives
        conf_loss_all = self.cross_entropy(predicted_scores.view(-1, n_classes), true_classes.view(-1))
        conf_loss_all = conf_loss_all.view(batch_size, n_priors)
        conf_loss_pos = conf_loss_all[positive_priors]
        conf_loss_neg = conf_loss_all.clone()
        conf_loss_neg[positive_priors] = 0.0
        conf_loss_neg, _ = conf_loss_neg.sort(dim=1, descending=True)
        hardness_ranks = torch.LongTensor(range(n_priors)).unsqueeze(0).expand_as(conf_loss_neg)
        hard_negatives = hardness_ranks < n_hard_negatives.unsqueeze(1)
        conf_loss_hard_neg = conf_loss_neg[hard_negatives]
        conf_loss = (conf_loss_hard_neg.sum() + conf_loss_pos.sum()) / n_positives.sum().float()
        return conf_loss + self.alpha * loc_loss


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
        labels.append(torch.multinomial(torch.tensor([0.7, 0.22, 0.08]), n, replacement=True, generator=g) + 1)
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
        {"name": base_match, "note": f"{args.batch} images, {n_obj} objects",
         "seconds": median_time(lambda: ref.match(boxes, labels, priors.shape[0]), base_rep)},
        {"name": "maskssd MultiBoxLoss.match", "baseline": base_match, "note": "sparse compiled matcher (CPU)",
         "seconds": median_time(lambda: ours.match(boxes, labels), rep)},
        {"name": "maskssd assign_dense (the GPU code, on CPU)", "baseline": base_match,
         "note": "batched IoU of every object and prior",
         "seconds": median_time(lambda: ours.assign_dense(gt, counts), rep)},
        {"name": base_fwd, "note": "per-image loop, nn.L1Loss + CE, sort for hard negatives",
         "seconds": median_time(lambda: ref(locs, scores, boxes, labels), base_rep)},
        {"name": "maskssd MultiBoxLoss, forward", "baseline": base_fwd,
         "note": "compiled matching + bounded hard-negative selection, CE on kept rows",
         "seconds": median_time(lambda: ours(locs, scores, boxes, labels), rep)},
        {"name": base_fb, "seconds": median_time(fwd_bwd(lambda: ref(locs, scores, boxes, labels)), base_rep)},
        {"name": "maskssd MultiBoxLoss, forward+backward", "baseline": base_fb,
         "seconds": median_time(fwd_bwd(lambda: ours(locs, scores, boxes, labels).total), rep)},
    ]
    print_table(f"MultiBox matching + loss: batch {args.batch}, {priors.shape[0]} priors, {N_CLASSES} classes "
                f"({machine()}; {rep} runs, baseline {base_rep})", rows)
    print(f"same loss: maskssd {out.item():.7f} vs tutorial {expected.item():.7f}")


if __name__ == "__main__":
    main()
