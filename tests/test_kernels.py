"""The compiled CPU kernels (maskssd.kernels) against the batched tensor code they replace on CPU.

The tensor versions are themselves checked against the tutorial's loops in test_loss.py / test_postprocess.py;
here the kernels must give the same matches, the same hard negatives and the same detections, including the
exact ties that grid-aligned boxes produce.
"""

from __future__ import annotations

import math

import pytest
import torch

from maskssd.ssd.kernels import mining
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.postprocess import DecodeSpec, postprocess, postprocess_tensors
from maskssd.ssd.priors import PriorSpec, cxcywh_to_xyxy

N_CLASSES = 4
PRIOR_SETS = {
    "ssd300": PriorSpec.ssd300().priors(),
    "linear_4maps": PriorSpec.linear((10, 5, 3, 1), 0.1, 0.9).priors(),
    "unclipped": PriorSpec((8, 4, 2), (0.2, 0.5, 0.9), ((2.0, 0.5), (2.0,), (3.0,)), clip=False).priors(),
    "unstructured": torch.cat(
        [
            torch.rand(300, 2, generator=torch.Generator().manual_seed(0)),
            0.05 + 0.6 * torch.rand(300, 2, generator=torch.Generator().manual_seed(1)),
        ],
        1,
    ),
}


def target_sets(priors: torch.Tensor, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images with random faces, tiny and huge boxes, exact copies of priors (IoU 1: ties), duplicated
    objects, grid-aligned boxes, a zero-area box and an empty image."""
    g = torch.Generator().manual_seed(seed)
    pxy = cxcywh_to_xyxy(priors).clamp(0, 1)
    images = []
    for n in (1, 7, 15):
        wh = 0.01 + torch.rand(n, 2, generator=g) * 0.6
        c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
        images.append(torch.cat([c - wh / 2, c + wh / 2], 1))
    picks = torch.randint(0, priors.shape[0], (6,), generator=g)
    images.append(pxy[picks])  # boxes equal to priors
    images.append(
        torch.cat([pxy[picks[:2]], pxy[picks[:2]], torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    )  # duplicates
    images.append(
        torch.tensor(
            [
                [0.25, 0.25, 0.5, 0.5],
                [0.0, 0.0, 0.5, 0.5],
                [0.5, 0.0, 1.0, 0.25],
                [0.4, 0.4, 0.4, 0.6],
                [0.3, 0.3, 0.3005, 0.3005],
            ]
        )
    )  # grid-aligned, zero area, tiny
    images.append(torch.zeros(0, 4))
    labels = [torch.randint(1, N_CLASSES, (b.shape[0],), generator=g) for b in images]
    return images, labels


@pytest.mark.parametrize("threshold", [0.5, 0.35, 0.9, 0.05])
@pytest.mark.parametrize("name", list(PRIOR_SETS))
def test_prior_matcher_equals_dense_matching(name, threshold):
    priors = PRIOR_SETS[name]
    loss = MultiBoxLoss(priors, threshold=threshold)
    for seed in range(3):
        boxes, labels = target_sets(priors, seed)
        img, prior, cls_pos, loc_t = loss.assign(boxes, labels)  # the kernel on CPU
        gt = torch.cat(boxes)
        counts = torch.tensor([b.shape[0] for b in boxes])
        d_img, d_prior, d_obj = loss.assign_dense(gt, counts)
        assert torch.equal(img, d_img) and torch.equal(prior, d_prior)
        assert torch.equal(cls_pos, torch.cat(labels)[d_obj])
        assert img.numel() >= sum(1 for b in boxes if b.shape[0])  # every object has its forced prior


def test_prior_matcher_handles_a_prior_set_without_grid_structure():
    """Unstructured priors have one prior per x-group: still exact, every object matched."""
    priors = PRIOR_SETS["unstructured"]
    boxes, labels = target_sets(priors, 5)
    loss = MultiBoxLoss(priors)
    img, prior, _, _ = loss.assign(boxes, labels)
    d_img, d_prior, _ = loss.assign_dense(torch.cat(boxes), torch.tensor([b.shape[0] for b in boxes]))
    assert torch.equal(img, d_img) and torch.equal(prior, d_prior)


def random_scores(seed: int, n: int, p: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, p, N_CLASSES, generator=g) * scale
    scores[..., 0] += torch.rand(n, p, 1, generator=g).squeeze(-1) * scale  # some confident background
    return scores


LOSS_KNOBS = {
    "plain": {},
    "weights": dict(class_weights=[1.0, 2.0, 4.0, 3.0]),
    "zero_background_weight": dict(class_weights=[0.0, 1.0, 1.0, 1.0]),
    "focal": dict(focal_gamma=2.0, class_weights=[1.0, 2.0, 4.0, 3.0]),
    "smoothing": dict(label_smoothing=0.1),
    "smoothing_weights": dict(label_smoothing=0.3, class_weights=[1.0, 2.0, 4.0, 3.0]),
}


@pytest.mark.parametrize("scale", [0.3, 3.0, 40.0])
@pytest.mark.parametrize("name", list(LOSS_KNOBS))
def test_hard_negative_kernel_selects_what_ranking_every_negative_selects(name, scale):
    """The same negatives (as a set per image) as ranking the loss of every negative; where losses tie, the
    same loss sum. Logit scales from near-uniform to saturated (bounds must hold everywhere)."""
    priors = PRIOR_SETS["ssd300"]
    loss = MultiBoxLoss(priors, **LOSS_KNOBS[name])
    boxes, labels = target_sets(priors, 1)
    scores = random_scores(int(scale), len(boxes), priors.shape[0], scale)
    img, prior, _, _ = loss.assign(boxes, labels)
    for ratio in (0.5, 3.0, 40.0):
        n_hard = (torch.bincount(img, minlength=len(boxes)).float() * ratio).ceil().long()
        k_img, k_prior = loss.hard_negatives(scores, img, prior, n_hard)
        d_img, d_prior = loss.hard_negatives_dense(scores, img, prior, n_hard)
        assert torch.equal(
            torch.bincount(k_img, minlength=len(boxes)), torch.bincount(d_img, minlength=len(boxes))
        )
        neg_loss = loss.conf_loss(scores, torch.zeros(scores.shape[:2], dtype=torch.long))
        torch.testing.assert_close(
            neg_loss[k_img, k_prior].sum(), neg_loss[d_img, d_prior].sum(), rtol=1e-6, atol=1e-5
        )
        if scale < 40 and name != "zero_background_weight":  # no ties: the very same priors
            key = lambda i, p: sorted((i * priors.shape[0] + p).tolist())  # noqa: E731
            assert key(k_img, k_prior) == key(d_img, d_prior)
        pos = torch.zeros(scores.shape[:2], dtype=torch.bool)
        pos[img, prior] = True
        assert not pos[k_img, k_prior].any()


@pytest.mark.parametrize("n_terms", [1, 2, 3, 4, 6])
def test_lse_band_contains_the_exact_log_sum_exp(n_terms):
    """The mining's second filter: interpolated tables plus margin bound ``lse(x) - max(x)`` from both sides, for
    gaps on and between grid nodes, past the grid's end, and with ties."""
    g = torch.Generator().manual_seed(n_terms)
    f, u, margin = mining._gap_tables(n_terms)
    rows = [torch.randn(4000, n_terms, generator=g) * scale for scale in (0.01, 0.3, 3.0, 30.0)]
    rows.append(torch.randint(0, 200, (2000, n_terms), generator=g).float() / 8.0)  # gaps on grid nodes
    rows.append(torch.zeros(10, n_terms))
    x = torch.cat(rows).double()
    top = x.sort(dim=1, descending=True).values
    exact = (torch.logsumexp(x, dim=1) - top[:, 0]).numpy()
    pad = torch.full((x.shape[0], 2), -torch.inf, dtype=torch.float64)
    top = torch.cat([top, pad], 1).float().numpy()  # the kernel reads float32 logits
    for j in range(x.shape[0]):
        lo, hi = mining._lse_band(f, u, top[j, 0], top[j, 1], top[j, 2])
        assert lo - margin <= exact[j] + 1e-6 and exact[j] - 1e-6 <= hi + margin
        assert hi - lo <= math.log(max(n_terms, 3) / 3) + 1e-9  # exact up to 3 terms


def test_hard_negatives_with_all_losses_tied():
    """Constant logits: every negative has the same loss (the floors' histograms collapse to one value)."""
    priors = PRIOR_SETS["ssd300"]
    loss = MultiBoxLoss(priors)
    boxes, labels = target_sets(priors, 3)
    img, prior, _, _ = loss.assign(boxes, labels)
    n_hard = torch.bincount(img, minlength=len(boxes)) * 3
    k_img, k_prior = loss.hard_negatives(
        torch.zeros(len(boxes), priors.shape[0], N_CLASSES), img, prior, n_hard
    )
    assert torch.equal(torch.bincount(k_img, minlength=len(boxes)), n_hard)
    pos = torch.zeros(len(boxes), priors.shape[0], dtype=torch.bool)
    pos[img, prior] = True
    assert not pos[k_img, k_prior].any()


def test_non_finite_logits_rank_first_as_in_torch():
    """A negative whose loss is NaN (a NaN logit, or an infinite background logit: inf - inf) is among the
    hardest, as ``torch.topk`` ranks NaN, so that the loss reports the divergence."""
    priors = PRIOR_SETS["ssd300"]
    loss = MultiBoxLoss(priors)
    boxes, labels = target_sets(priors, 4)
    img, prior, _, _ = loss.assign(boxes, labels)
    scores = random_scores(4, len(boxes), priors.shape[0], 1.0)
    negatives = [int(p) for p in range(priors.shape[0]) if not bool(((img == 0) & (prior == p)).any())][:2]
    scores[0, negatives[0], 0] = float("inf")
    scores[0, negatives[1], 2] = float("nan")
    n_hard = torch.bincount(img, minlength=len(boxes)) * 3
    k_img, k_prior = loss.hard_negatives(scores, img, prior, n_hard)
    d_img, d_prior = loss.hard_negatives_dense(scores, img, prior, n_hard)
    assert set(negatives) <= set(k_prior[k_img == 0].tolist())
    assert sorted((k_img * priors.shape[0] + k_prior).tolist()) == sorted(
        (d_img * priors.shape[0] + d_prior).tolist()
    )


def test_hard_negatives_when_more_are_wanted_than_exist():
    priors = PRIOR_SETS["linear_4maps"]
    loss = MultiBoxLoss(priors)
    boxes, labels = target_sets(priors, 2)
    img, prior, _, _ = loss.assign(boxes, labels)
    n_hard = torch.full((len(boxes),), priors.shape[0])
    k_img, _ = loss.hard_negatives(random_scores(0, len(boxes), priors.shape[0], 1.0), img, prior, n_hard)
    n_pos = torch.bincount(img, minlength=len(boxes))
    expected = torch.where(n_pos > 0, priors.shape[0] - n_pos, priors.shape[0])
    assert torch.equal(torch.bincount(k_img, minlength=len(boxes)), expected)


DECODE_SPECS = {
    "paper": DecodeSpec(),
    "strict": DecodeSpec(min_score=0.3, max_overlap=0.3, top_k=20),
    "no_score_floor": DecodeSpec(min_score=0.0, top_k=50),
    "agnostic": DecodeSpec(class_agnostic=True),
    "pre_nms_top_k": DecodeSpec(pre_nms_top_k=60, top_k=30),
}


@pytest.mark.parametrize("name", list(DECODE_SPECS))
@pytest.mark.parametrize("prior_set", ["ssd300", "linear_4maps"])
def test_detect_kernel_equals_tensor_postprocessing(name, prior_set):
    priors, spec = PRIOR_SETS[prior_set], DECODE_SPECS[name]
    g = torch.Generator().manual_seed(len(name))
    n = 3
    locs = torch.randn(n, priors.shape[0], 4, generator=g) * 0.5
    scores = torch.randn(n, priors.shape[0], N_CLASSES, generator=g) * 2
    scores[..., 0] += 3.0
    scores[1, :, 0] += 30.0  # an image without detections
    sizes = torch.tensor([[640, 480], [300, 300], [1024, 768]])
    for min_score in (None, torch.tensor([0.2, 0.05, 0.5])):
        dets = postprocess(locs, scores, priors, spec, sizes=sizes, min_score=min_score)
        thresh = torch.tensor(spec.min_score) if min_score is None else min_score
        img, boxes, labels, probs = postprocess_tensors(locs, scores, priors, spec, thresh)
        wh = sizes.float()[img]
        boxes = boxes * torch.cat([wh, wh], 1)
        for i, d in enumerate(dets):
            mine = img == i
            assert len(d) == int(mine.sum())
            assert torch.equal(d.labels, labels[mine])
            torch.testing.assert_close(d.scores, probs[mine], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(d.boxes, boxes[mine], rtol=1e-5, atol=1e-3)
            assert (d.scores[:-1] >= d.scores[1:]).all()
        if min_score is None and name != "no_score_floor":
            assert len(dets[1]) == 0 and len(dets[0]) > 0


def test_kernels_survive_nan_and_infinite_outputs():
    """A diverged network (NaN / inf outputs) must give a NaN loss the runner reports, never a crash or an
    out-of-range index."""
    priors = PRIOR_SETS["ssd300"]
    loss = MultiBoxLoss(priors)
    boxes, labels = target_sets(priors, 0)
    scores = random_scores(0, len(boxes), priors.shape[0], 1.0)
    scores[0, :100] = float("nan")
    scores[1, :50, 2] = float("inf")
    scores[2] = float("nan")
    img, prior, _, _ = loss.assign(boxes, labels)
    n_hard = (torch.bincount(img, minlength=len(boxes)) * 3).clamp(max=priors.shape[0])
    k_img, k_prior = loss.hard_negatives(scores, img, prior, n_hard)
    assert int(k_prior.min()) >= 0 and int(k_prior.max()) < priors.shape[0]
    assert torch.equal(
        torch.bincount(k_img, minlength=len(boxes)), torch.bincount(img, minlength=len(boxes)) * 3
    )
    out = loss(torch.zeros(len(boxes), priors.shape[0], 4), scores, boxes, labels)
    assert not torch.isfinite(out.total)
    locs = torch.zeros(len(boxes), priors.shape[0], 4)
    locs[0] = float("nan")
    dets = postprocess(locs, scores, priors)
    assert len(dets) == len(boxes) and all(bool((d.labels >= 1).all()) for d in dets)
