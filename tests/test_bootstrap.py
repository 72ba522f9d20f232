"""Bootstrap intervals and the paired bootstrap (maskssd.evaluation.bootstrap): exactly the looped evaluator on
every resample, intervals around the estimate, a known difference found, identical runs at exactly zero."""

from __future__ import annotations

import math

import pytest
import torch

from maskssd.evaluation.bootstrap import bootstrap, mark, paired_bootstrap, resample_weights, resampled_ap
from maskssd.evaluation.records import EvalSet
from maskssd.evaluation.voc import average_precision, match

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")


def mark_detections(*data, class_names=CLASSES, image_ids=None):
    """The six per-image lists as one set, matched once and marked for resampling."""
    return mark(match(EvalSet.from_lists(*data, class_names, image_ids=image_ids)))


def make_data(
    n_images: int = 24, seed: int = 0, tie_step: float | None = None
) -> tuple[list[torch.Tensor], ...]:
    """Per-image detections (jittered copies of objects, wrong classes, clutter) and objects (some difficult).

    ``tie_step`` rounds scores to multiples of it: many detections of one image then share a score, true and
    false positives mixed (the case where the order of an image's copies matters).
    """
    g = torch.Generator().manual_seed(seed)
    out: tuple[list[torch.Tensor], ...] = tuple([] for _ in range(6))
    for _ in range(n_images):
        n_gt = int(torch.randint(0, 6, (1,), generator=g))
        wh = torch.rand(n_gt, 2, generator=g) * 60 + 10
        xy = torch.rand(n_gt, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), max(n_gt, 1), replacement=True, generator=g)
        labels = labels[:n_gt] + 1
        src = torch.randint(0, max(n_gt, 1), (3 * n_gt,), generator=g)
        near = boxes[src] + torch.randn(3 * n_gt, 4, generator=g) * 0.12 * wh[src].repeat(1, 2)
        near_labels = torch.where(
            torch.rand(3 * n_gt, generator=g) < 0.8,
            labels[src],
            torch.randint(1, 4, (3 * n_gt,), generator=g),
        )
        far_xy = torch.rand(4, 2, generator=g) * 200
        far = torch.cat([far_xy, far_xy + 20], 1)
        scores = torch.rand(near.shape[0] + 4, generator=g)
        if tie_step:
            scores = (scores / tie_step).round() * tie_step
        det = torch.cat([near, far])
        out[0].append(torch.cat([det[:, :2], torch.maximum(det[:, 2:], det[:, :2] + 1)], 1))
        out[1].append(torch.cat([near_labels, torch.randint(1, 4, (4,), generator=g)]))
        out[2].append(scores)
        out[3].append(boxes)
        out[4].append(labels)
        out[5].append(torch.rand(n_gt, generator=g) < 0.1)
    return out


def looped(data: tuple[list[torch.Tensor], ...], w: torch.Tensor) -> tuple[dict, dict]:
    """The plain evaluator on the resampled list of images (image order, copies next to each other)."""
    idx = torch.repeat_interleave(torch.arange(w.shape[0]), w.long()).tolist()
    sub = [[x[i] for i in idx] for x in data]
    return (
        average_precision(*sub, CLASSES, method="voc07").ap,
        average_precision(*sub, CLASSES, method="voc12").ap,
    )


def assert_same(vectorised: torch.Tensor, expected: dict, tol: float) -> None:
    for i, c in enumerate(CLASSES):
        v, e = float(vectorised[i]), expected[c]
        assert (math.isnan(v) and math.isnan(e)) or abs(v - e) <= tol, (c, v, e)


@pytest.mark.parametrize("tie_step", [None, 0.05])
def test_every_resample_equals_the_looped_evaluator(tie_step):
    data = make_data(tie_step=tie_step)
    marked = mark_detections(*data)
    if tie_step:  # the case the exact path exists for is really there
        assert any(t.mixed_images.numel() for t in marked.tables.values())
    n = len(data[0])
    weights = torch.cat([torch.ones(1, n, dtype=torch.float64), resample_weights(n, 40, seed=7)])
    weights[1, :3] = 0.0  # a resample without some images, and one whose rarest class may be absent
    ap07, ap12 = resampled_ap(marked, weights)
    for r in range(weights.shape[0]):
        e07, e12 = looped(data, weights[r])
        assert_same(ap07[r], e07, 1e-12 if r else 0.0)  # the identity resample bit for bit
        assert_same(ap12[r], e12, 1e-9)


def test_interval_contains_the_point_estimate_and_is_seeded():
    data = make_data(n_images=40, seed=1)
    marked = mark_detections(*data)
    r = bootstrap(marked, n=300, seed=3)
    plain = average_precision(*data, CLASSES)
    assert r.map.estimate == pytest.approx(plain.map, abs=1e-12)
    assert r.map.low < r.map.estimate < r.map.high
    for c in CLASSES:
        assert r.ap[c].estimate == plain.ap[c]
        assert r.ap[c].low <= r.ap[c].estimate <= r.ap[c].high
        assert r.ap[c].high - r.ap[c].low > 0.01  # 40 images: the interval is not degenerate
    assert bootstrap(marked, n=300, seed=3).map == r.map
    assert bootstrap(marked, n=300, seed=4).map != r.map
    narrow = bootstrap(marked, n=300, seed=3, ci=0.5)
    assert r.map.low <= narrow.map.low <= narrow.map.high <= r.map.high
    m = r.as_metrics("test")
    assert m["test_map_ci_low"] == r.map.low and m["test_ap_with_mask_ci_high"] == r.ap["with_mask"].high


def test_paired_bootstrap_finds_a_known_difference():
    """B = A with every other true positive removed: A is better on (nearly) every resample."""
    data = make_data(n_images=40, seed=2)
    marked_a = mark_detections(*data)
    assert sum(int(t.tp.sum()) for t in marked_a.tables.values()) > 20
    m = match(EvalSet.from_lists(*data, CLASSES))  # which detection of each image is a true positive
    tp = m.det_tp.split([len(s) for s in data[2]])
    det_b = ([], [], [])
    count = 0
    for i in range(len(data[0])):
        keep = torch.ones(data[0][i].shape[0], dtype=torch.bool)
        for k in torch.nonzero(tp[i]).squeeze(1).tolist():
            count += 1
            keep[k] = count % 2 == 1
        for store, x in zip(det_b, data[:3]):
            store.append(x[i][keep])
    marked_b = mark_detections(*det_b, *data[3:])
    r = paired_bootstrap([marked_a], [marked_b], n=400, seed=0)
    d = r.diff["map"]
    assert d.estimate > 0.1 and d.low > 0 and r.a_wins["map"] > 0.99
    assert r.a["map"] - r.b["map"] == pytest.approx(d.estimate)
    reverse = paired_bootstrap([marked_b], [marked_a], n=400, seed=0)
    assert reverse.diff["map"].high < 0 and reverse.a_wins["map"] < 0.01


def test_identical_runs_differ_by_exactly_zero_and_seeds_pool():
    data = make_data(n_images=30, seed=3)
    a = mark_detections(*data, image_ids=[str(i) for i in range(30)])
    r = paired_bootstrap([a], [a], n=200, seed=1)
    for key in ("map", *CLASSES):
        assert r.diff[key].as_list() == [0.0, 0.0, 0.0]
        assert r.ties[key] == 1.0 and r.a_wins[key] == 0.0
    # pooling: the mean over a side's runs; two copies of one run are that run
    other = mark_detections(*make_data(n_images=30, seed=4)[:3], *data[3:], image_ids=a.image_ids)
    one = paired_bootstrap([a], [other], n=200, seed=1)
    pooled = paired_bootstrap([a, a], [other, other], n=200, seed=1)
    assert pooled.diff["map"].as_list() == pytest.approx(one.diff["map"].as_list(), abs=1e-12)
    mixed = paired_bootstrap([a, other], [other], n=200, seed=1)
    assert mixed.diff["map"].estimate == pytest.approx(one.diff["map"].estimate / 2, abs=1e-12)


def test_paired_bootstrap_refuses_different_images():
    data = make_data(n_images=10, seed=5)
    a = mark_detections(*data, image_ids=[str(i) for i in range(10)])
    b = mark_detections(*data, image_ids=[str(i + 1) for i in range(10)])
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap([a], [b], n=10)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap(a, n=0)
