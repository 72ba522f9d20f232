"""MultiBoxLoss vs a per-image transcription of the tutorial's MultiBoxLoss.forward (the paper's code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.priors import PriorSpec, cxcywh_to_xyxy
from tests.reference import tutorial as reference
from tests.reference.tutorial import ConfFn, cxcy_to_xy, find_jaccard_overlap

N_CLASSES = 4
PRIORS = PriorSpec.ssd300().priors()  # 8732 default boxes


# ------------------------------------------------------------------------------- tutorial reference
def reference_match(boxes, labels, priors_cxcy, threshold):
    """The tutorial's per-image matching: true classes (N, P) and true locs (N, P, 4)."""
    return reference.MultiBoxLoss(priors_cxcy, threshold).match(boxes, labels)


def reference_loss(
    pred_locs,
    pred_scores,
    boxes,
    labels,
    priors_cxcy,
    threshold=0.5,
    neg_pos_ratio=3.0,
    alpha=1.0,
    loc_loss="l1",
    conf_fn: ConfFn | None = None,
):
    """The tutorial's MultiBoxLoss.forward as (total, conf, loc, n_positives)."""
    loss = reference.MultiBoxLoss(priors_cxcy, threshold, neg_pos_ratio, alpha, loc_loss, conf_fn)
    return loss.terms(pred_locs, pred_scores, boxes, labels)


def weighted_ce(
    weight: torch.Tensor | None = None, label_smoothing: float = 0.0, focal_gamma: float = 0.0
) -> ConfFn:
    """Cross-entropy written out: ``(1-e) w_y (-log p_y) + e/C sum_c w_c (-log p_c)``, times ``(1-p_y)^gamma``."""

    def fn(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(scores, dim=1)
        w = torch.ones(scores.shape[1]) if weight is None else weight
        nll = -(logp.gather(1, targets[:, None]).squeeze(1)) * w[targets]
        smooth = -(logp * w).sum(1) / scores.shape[1]
        loss = (1 - label_smoothing) * nll + label_smoothing * smooth
        if focal_gamma > 0:
            p_t = logp.gather(1, targets[:, None]).squeeze(1).exp()
            loss = loss * (1 - p_t) ** focal_gamma
        return loss

    return fn


# ---------------------------------------------------------------------------------------- inputs
def random_targets(g: torch.Generator, n_objects: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Realistic normalised xyxy face boxes (3-50 % of the side) and labels 1..3 per image."""
    boxes, labels = [], []
    for n in n_objects:
        wh = 0.03 + torch.rand(n, 2, generator=g) * 0.47
        c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat([c - wh / 2, c + wh / 2], 1).clamp(0, 1))
        labels.append(torch.randint(1, N_CLASSES, (n,), generator=g))
    return boxes, labels


def random_batch(seed: int, priors: torch.Tensor = PRIORS, with_empty: bool = True):
    g = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(4, 9, (1,), generator=g))
    n_objects = [int(x) for x in torch.randint(1, 12, (batch,), generator=g)]
    if with_empty:
        n_objects[int(torch.randint(0, batch, (1,), generator=g))] = 0
    boxes, labels = random_targets(g, n_objects)
    locs = torch.randn(batch, priors.shape[0], 4, generator=g)
    scores = torch.randn(batch, priors.shape[0], N_CLASSES, generator=g) * 2
    return locs, scores, boxes, labels


def assert_same(out, ref, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    total, conf, loc, n_pos = ref
    assert out.n_positives == n_pos
    torch.testing.assert_close(out.conf, conf, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.loc, loc, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.total, total, rtol=rtol, atol=atol)


WEIGHTS = [1.0, 2.0, 4.0, 3.0]  # the paper's final class weights (background first)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_equals_tutorial(seed):
    _, _, boxes, labels = random_batch(seed)
    loss = MultiBoxLoss(PRIORS)
    cls_t, loc_t = loss.match(boxes, labels)
    ref_cls, ref_loc = reference_match(boxes, labels, PRIORS, 0.5)
    assert torch.equal(cls_t, ref_cls)
    pos = ref_cls > 0
    assert pos.any()
    torch.testing.assert_close(loc_t[pos], ref_loc[pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_loss_equals_tutorial(seed):
    locs, scores, boxes, labels = random_batch(seed)
    out = MultiBoxLoss(PRIORS)(locs, scores, boxes, labels)
    assert_same(out, reference_loss(locs, scores, boxes, labels, PRIORS))


CONFIGS = {
    "paper_final": dict(neg_pos_ratio=2.0, alpha=2.0, class_weights=WEIGHTS),
    "ratio3_weights": dict(neg_pos_ratio=3.0, class_weights=WEIGHTS),
    "smooth_l1": dict(loc_loss="smooth_l1"),
    "smooth_l1_alpha2_ratio2": dict(
        loc_loss="smooth_l1", alpha=2.0, neg_pos_ratio=2.0, class_weights=WEIGHTS
    ),
    "threshold_0.4": dict(threshold=0.4),
    "no_negatives": dict(neg_pos_ratio=0.0),
    "focal": dict(focal_gamma=2.0),
    "focal_weights": dict(focal_gamma=1.5, class_weights=WEIGHTS, neg_pos_ratio=2.0),
    "label_smoothing": dict(label_smoothing=0.1),
    "label_smoothing_weights": dict(label_smoothing=0.2, class_weights=WEIGHTS),
    "everything": dict(
        label_smoothing=0.1,
        focal_gamma=2.0,
        class_weights=WEIGHTS,
        alpha=2.0,
        neg_pos_ratio=2.0,
        loc_loss="smooth_l1",
        threshold=0.45,
    ),
}


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_configured_loss_equals_reference(name, seed):
    kw = CONFIGS[name]
    locs, scores, boxes, labels = random_batch(seed)
    out = MultiBoxLoss(PRIORS, **kw)(locs, scores, boxes, labels)
    weight = None if kw.get("class_weights") is None else torch.tensor(kw["class_weights"])
    conf_fn = weighted_ce(weight, kw.get("label_smoothing", 0.0), kw.get("focal_gamma", 0.0))
    ref = reference_loss(
        locs,
        scores,
        boxes,
        labels,
        PRIORS,
        kw.get("threshold", 0.5),
        kw.get("neg_pos_ratio", 3.0),
        kw.get("alpha", 1.0),
        kw.get("loc_loss", "l1"),
        conf_fn,
    )
    assert_same(out, ref)


def test_written_out_cross_entropy_matches_torch():
    """The reference's hand-written CE equals F.cross_entropy (weights, label smoothing), so the focal and
    smoothing cases above check the loss against torch semantics."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, N_CLASSES, generator=g) * 3
    targets = torch.randint(0, N_CLASSES, (50,), generator=g)
    w = torch.tensor(WEIGHTS)
    for weight in (None, w):
        for ls in (0.0, 0.1, 0.3):
            ours = weighted_ce(weight, ls)(scores, targets)
            torch.testing.assert_close(
                ours, F.cross_entropy(scores, targets, weight=weight, reduction="none", label_smoothing=ls)
            )


def test_focal_is_ce_times_one_minus_pt_power_gamma():
    """Directly: with every prior selected (one positive per image is enough), conf == sum(ce * (1-p_t)^g) / n_pos."""
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5]])
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5]])]
    labels = [torch.tensor([2])]
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 3, N_CLASSES, generator=g)
    locs = torch.zeros(1, 3, 4)
    target = torch.tensor([2, 0, 0])
    p_t = scores[0].softmax(-1)[torch.arange(3), target]
    ce = F.cross_entropy(scores[0], target, reduction="none")
    for gamma in (0.5, 2.0):
        out = MultiBoxLoss(priors, neg_pos_ratio=3.0, focal_gamma=gamma)(locs, scores, boxes, labels)
        assert out.n_positives == 1
        torch.testing.assert_close(out.conf, (ce * (1 - p_t) ** gamma).sum())
    plain = MultiBoxLoss(priors, focal_gamma=0.0)(locs, scores, boxes, labels)
    torch.testing.assert_close(plain.conf, ce.sum())


def test_label_smoothing_matches_cross_entropy():
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]])
    boxes, labels = [torch.tensor([[0.0, 0.0, 0.5, 0.5]])], [torch.tensor([3])]
    scores = torch.randn(1, 2, N_CLASSES, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 0])
    for ls in (0.05, 0.3):
        out = MultiBoxLoss(priors, label_smoothing=ls, class_weights=WEIGHTS)(
            torch.zeros(1, 2, 4), scores, boxes, labels
        )
        expected = F.cross_entropy(
            scores[0], target, weight=torch.tensor(WEIGHTS), label_smoothing=ls, reduction="none"
        ).sum()
        torch.testing.assert_close(out.conf, expected)


def test_two_objects_sharing_a_best_prior_later_object_wins():
    loss = MultiBoxLoss(PRIORS)
    p_star = 1234
    prior_box = cxcywh_to_xyxy(PRIORS[p_star : p_star + 1])
    # identical boxes: the same best prior; a slightly shifted copy: still the same best prior
    shifted = prior_box + torch.tensor([[0.002, 0.001, 0.002, 0.001]])
    for second in (prior_box, shifted):
        boxes = [torch.cat([prior_box, second]), torch.cat([prior_box, second])]
        labels = [torch.tensor([1, 2]), torch.tensor([3, 1])]
        iou = find_jaccard_overlap(boxes[0], cxcy_to_xy(PRIORS))
        assert iou.argmax(1).tolist() == [p_star, p_star]
        cls_t, loc_t = loss.match(boxes, labels)
        assert cls_t[0, p_star] == 2 and cls_t[1, p_star] == 1  # the later object's label
        ref_cls, ref_loc = reference_match(boxes, labels, PRIORS, 0.5)
        assert torch.equal(cls_t, ref_cls)
        pos = ref_cls > 0
        torch.testing.assert_close(loc_t[pos], ref_loc[pos], rtol=1e-5, atol=1e-5)


def test_forced_prior_below_threshold_is_positive():
    """A tiny object overlaps no prior by 0.5, yet its best prior is forced positive (overlap set to 1)."""
    box = torch.tensor([[0.50, 0.50, 0.51, 0.51]])
    cls_t, _ = MultiBoxLoss(PRIORS).match([box], [torch.tensor([3])])
    assert int((cls_t > 0).sum()) == 1
    assert int(cls_t.max()) == 3


def test_empty_image_contributes_nothing():
    """An image without boxes has no positives and hence no hard negatives: dropping it changes nothing."""
    locs, scores, boxes, labels = random_batch(7, with_empty=False)
    loss = MultiBoxLoss(PRIORS)
    base = loss(locs, scores, boxes, labels)
    g = torch.Generator().manual_seed(99)
    locs2 = torch.cat([locs, torch.randn(1, *locs.shape[1:], generator=g)])
    scores2 = torch.cat([scores, torch.randn(1, *scores.shape[1:], generator=g) * 5])
    more = loss(locs2, scores2, [*boxes, torch.zeros(0, 4)], [*labels, torch.zeros(0, dtype=torch.long)])
    assert more.n_positives == base.n_positives
    torch.testing.assert_close(more.total, base.total)
    torch.testing.assert_close(more.conf, base.conf)
    torch.testing.assert_close(more.loc, base.loc)


def test_all_empty_batch_gives_finite_zero_loss():
    loss = MultiBoxLoss(PRIORS, class_weights=WEIGHTS, focal_gamma=1.0)
    locs = torch.randn(3, PRIORS.shape[0], 4, requires_grad=True)
    scores = torch.randn(3, PRIORS.shape[0], N_CLASSES, requires_grad=True)
    out = loss(locs, scores, [torch.zeros(0, 4)] * 3, [torch.zeros(0, dtype=torch.long)] * 3)
    assert out.n_positives == 0
    for v in (out.total, out.conf, out.loc):
        assert torch.isfinite(v) and abs(v.item()) < 1e-12
    out.total.backward()
    assert torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all()
    assert float(locs.grad.abs().sum()) == 0.0 and float(scores.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("loc_loss", ["l1", "smooth_l1"])
def test_gradients_flow_to_positives_and_hard_negatives(loc_loss):
    locs, scores, boxes, labels = random_batch(3)
    locs.requires_grad_(True)
    scores.requires_grad_(True)
    loss = MultiBoxLoss(PRIORS, neg_pos_ratio=3.0, loc_loss=loc_loss, class_weights=WEIGHTS)
    out = loss(locs, scores, boxes, labels)
    out.total.backward()
    assert torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all()
    cls_t, _ = loss.match(boxes, labels)
    pos = cls_t > 0
    loc_rows = locs.grad.abs().sum(-1) > 0
    assert torch.equal(loc_rows, pos)  # localisation: positives only
    score_rows = scores.grad.abs().sum(-1) > 0
    n_pos = pos.sum(1)
    expected = n_pos + torch.minimum(3 * n_pos, PRIORS.shape[0] - n_pos)
    assert torch.equal(score_rows.sum(1), expected)  # confidence: positives + 3x hard negatives per image
    assert (score_rows | ~pos).all()


def test_small_prior_set_more_negatives_wanted_than_exist():
    """neg_pos_ratio x positives may exceed the negatives available: every negative is taken."""
    priors = PriorSpec((2, 1), (0.4, 0.8), ((2.0,), (2.0,))).priors()  # 14 priors
    g = torch.Generator().manual_seed(0)
    boxes = [
        torch.tensor([[0.05, 0.05, 0.95, 0.95], [0.0, 0.0, 0.5, 0.5]]),
        torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
    ]
    labels = [torch.tensor([1, 2]), torch.tensor([3])]
    locs = torch.randn(2, priors.shape[0], 4, generator=g)
    scores = torch.randn(2, priors.shape[0], N_CLASSES, generator=g)
    out = MultiBoxLoss(priors, neg_pos_ratio=3.0)(locs, scores, boxes, labels)
    assert_same(out, reference_loss(locs, scores, boxes, labels, priors, neg_pos_ratio=3.0))


@pytest.mark.parametrize("ratio", [0.5, 1.5, 2.5])
def test_fractional_neg_pos_ratio_follows_tutorial(ratio):
    """The tutorial keeps negatives of rank < ratio x positives, i.e. ceil(ratio x positives) of them."""
    locs, scores, boxes, labels = random_batch(11)
    out = MultiBoxLoss(PRIORS, neg_pos_ratio=ratio)(locs, scores, boxes, labels)
    assert_same(out, reference_loss(locs, scores, boxes, labels, PRIORS, neg_pos_ratio=ratio))
