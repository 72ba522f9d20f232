"""Tests of maskssd.metrics: hand-computed VOC cases, a loop reference, COCO, confusion matrix, plots."""

from __future__ import annotations

import math

import pytest
import torch

from maskssd.evaluation.confusion import confusion_matrix
from maskssd.evaluation.metrics import (
    OPERATING_THRESHOLD,
    APResult,
    DetectionEvaluator,
    EvalResult,
    average_precision,
    coco_map,
)
from maskssd.evaluation.plots import plot_confusion_matrix, plot_pr_curves
from maskssd.evaluation.records import EvalSet
from tests.reference.tutorial import calculate_map as reference_map

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")
ONE = ("face",)


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def image(det_boxes=(), det_labels=(), det_scores=(), gt_boxes=(), gt_labels=(), gt_difficult=None):
    """One image's six tensors (empty-safe)."""
    gt_difficult = [False] * len(gt_labels) if gt_difficult is None else gt_difficult
    return (
        t(det_boxes).reshape(-1, 4),
        t(det_labels, torch.long),
        t(det_scores),
        t(gt_boxes).reshape(-1, 4),
        t(gt_labels, torch.long),
        t(gt_difficult, torch.bool),
    )


def batch(*images):
    """Per-image tuples -> six per-image lists, the argument order of the metrics API."""
    return tuple(list(x) for x in zip(*images, strict=True))


def evalset(images, names, sizes=None, start=0):
    """Per-image tuples as an EvalSet (ids are the images' positions from ``start``)."""
    ids = [str(start + i) for i in range(len(images))]
    return (
        EvalSet.from_lists(*batch(*images), names, image_ids=ids, sizes=sizes) if images else EvalSet(names)
    )


def ap_of(images, names=ONE, method="voc07", iou_threshold=0.5) -> APResult:
    return average_precision(*batch(*images), names, iou_threshold=iou_threshold, method=method)


# --------------------------------------------------------------------------------------------- reference
def random_case(seed: int, n_images: int = 20, grid: bool = False):
    """Random objects and detections: jittered copies (right or wrong class, duplicates), clutter, ties.

    ``grid=True`` puts every coordinate on a coarse integer grid so IoU ties and IoU == 0.5 happen.
    """
    g = torch.Generator().manual_seed(seed)
    n_cls = len(CLASSES)

    def rand_boxes(n):
        if grid:
            xy = torch.randint(0, 4, (n, 2), generator=g).float()
            wh = torch.randint(2, 5, (n, 2), generator=g).float()
        else:
            xy = torch.rand(n, 2, generator=g) * 80
            wh = torch.rand(n, 2, generator=g) * 30 + 5
        return torch.cat([xy, xy + wh], 1)

    images = []
    for _ in range(n_images):
        n_gt = int(torch.randint(0, 9, (1,), generator=g))
        gt_boxes = rand_boxes(n_gt)
        gt_labels = torch.randint(1, n_cls + 1, (n_gt,), generator=g)
        gt_difficult = torch.rand(n_gt, generator=g) < 0.15
        n_near = int(torch.randint(0, 2 * n_gt + 1, (1,), generator=g)) if n_gt else 0
        src = torch.randint(0, max(n_gt, 1), (n_near,), generator=g)
        if grid:
            near = gt_boxes[src] + torch.randint(-1, 2, (n_near, 4), generator=g).float()
        else:
            near = gt_boxes[src] + torch.randn(n_near, 4, generator=g) * 3
        near_labels = torch.where(
            torch.rand(n_near, generator=g) < 0.8,
            gt_labels[src],
            torch.randint(1, n_cls + 1, (n_near,), generator=g),
        )
        n_far = int(torch.randint(0, 6, (1,), generator=g))
        det_boxes = torch.cat([near, rand_boxes(n_far)])
        det_boxes = torch.cat([det_boxes[:, :2], torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 0.5)], 1)
        det_labels = torch.cat([near_labels, torch.randint(1, n_cls + 1, (n_far,), generator=g)])
        det_scores = torch.rand(det_boxes.shape[0], generator=g)
        if grid:  # coarse scores: many ties, so the stable order matters
            det_scores = (det_scores * 4).round() / 4
        perm = torch.randperm(det_boxes.shape[0], generator=g)
        images.append(
            (det_boxes[perm], det_labels[perm], det_scores[perm], gt_boxes, gt_labels, gt_difficult)
        )
    return images


# --------------------------------------------------------------------------------------------- VOC, by hand
SQUARES = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10], [0, 40, 10, 50]]


@pytest.mark.parametrize("method", ["voc07", "voc12"])
def test_perfect_detections_give_ap_one(method):
    images = [
        image(SQUARES[:3], [1, 2, 3], [0.9, 0.8, 0.7], SQUARES[:3], [1, 2, 3]),
        image(SQUARES[1:], [3, 3, 1], [0.6, 0.95, 0.5], SQUARES[1:], [3, 3, 1]),
    ]
    result = ap_of(images, CLASSES, method)
    assert result.ap == pytest.approx(dict.fromkeys(CLASSES, 1.0))
    assert result.map == pytest.approx(1.0)
    assert result.n_gt == {"with_mask": 2, "without_mask": 1, "mask_weared_incorrect": 3}


# Objects A, B. Detections in score order: A (TP), A again (duplicate: FP), B (TP).
# precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
# voc07: t = 0..0.5 (6 points) -> 1; t = 0.6..1 (5 points) -> 2/3: (6 + 10/3) / 11 = 28/33.
# voc12: 1/2 * 1 + 1/2 * 2/3 = 5/6.
DUPLICATE = image([SQUARES[0], [0, 0, 10, 9], SQUARES[1]], [1, 1, 1], [0.9, 0.8, 0.7], SQUARES[:2], [1, 1])


@pytest.mark.parametrize(("method", "expected"), [("voc07", 28 / 33), ("voc12", 5 / 6)])
def test_duplicate_detection_is_false_positive(method, expected):
    result = ap_of([DUPLICATE], method=method)
    assert result.ap["face"] == pytest.approx(expected, abs=1e-9)
    assert result.precision["face"].tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert result.recall["face"].tolist() == pytest.approx([0.5, 0.5, 1.0])


@pytest.mark.parametrize(("method", "expected"), [("voc07", 8 / 11), ("voc12", 0.75)])
def test_missed_object_lowers_recall(method, expected):
    # 4 objects, 3 found exactly: recall 1/4, 2/4, 3/4 at precision 1; voc07 counts t = 0..0.7 (8 points).
    result = ap_of([image(SQUARES[:3], [1, 1, 1], [0.9, 0.8, 0.7], SQUARES, [1, 1, 1, 1])], method=method)
    assert result.ap["face"] == pytest.approx(expected, abs=1e-9)
    assert result.recall["face"][-1].item() == pytest.approx(0.75)


@pytest.mark.parametrize(("method", "expected"), [("voc07", 28 / 33), ("voc12", 5 / 6)])
def test_difficult_object_neither_helps_nor_hurts(method, expected):
    # Objects A, B easy, D difficult. Detections: A .9, D .8, clutter .7 (FP), B .6.
    # Counting the D detection as FP would give voc07 (6 + 5/2) / 11; as TP it would change n_gt.
    gt = [SQUARES[0], SQUARES[1], SQUARES[2]]
    with_d = image(
        [SQUARES[0], SQUARES[2], [60, 60, 70, 70], SQUARES[1]],
        [1, 1, 1, 1],
        [0.9, 0.8, 0.7, 0.6],
        gt,
        [1, 1, 1],
        [False, False, True],
    )
    without_d = image(
        [SQUARES[0], [60, 60, 70, 70], SQUARES[1]],
        [1, 1, 1],
        [0.9, 0.7, 0.6],
        gt,
        [1, 1, 1],
        [False, False, True],
    )
    a, b = ap_of([with_d], method=method), ap_of([without_d], method=method)
    assert a.ap["face"] == pytest.approx(expected, abs=1e-9)
    assert b.ap["face"] == pytest.approx(expected, abs=1e-9)
    assert a.n_gt["face"] == b.n_gt["face"] == 2
    assert len(a.precision["face"]) == 3  # the ignored detection is not on the curve


def test_undetected_difficult_object_does_not_lower_recall():
    result = ap_of([image([SQUARES[0]], [1], [0.9], SQUARES[:2], [1, 1], [False, True])])
    assert result.ap["face"] == pytest.approx(1.0)
    assert result.recall["face"].tolist() == [1.0]


def test_class_without_detections_is_zero_and_without_gt_is_nan():
    # with_mask: perfect; without_mask: objects, no detections; mask_weared_incorrect: detections, no objects.
    img = image([SQUARES[0], SQUARES[2]], [1, 3], [0.9, 0.8], SQUARES[:2], [1, 2])
    for method in ("voc07", "voc12"):
        result = ap_of([img], CLASSES, method)
        assert result.ap["with_mask"] == pytest.approx(1.0)
        assert result.ap["without_mask"] == 0.0
        assert math.isnan(result.ap["mask_weared_incorrect"])
        assert result.map == pytest.approx(0.5)  # nan excluded
        assert result.n_gt["mask_weared_incorrect"] == 0


def test_only_difficult_objects_is_nan_and_all_nan_map_is_nan():
    result = ap_of([image([SQUARES[0]], [1], [0.9], [SQUARES[0]], [1], [True])])
    assert math.isnan(result.ap["face"]) and math.isnan(result.map)
    empty = ap_of([image()], CLASSES)
    assert all(math.isnan(v) for v in empty.ap.values()) and math.isnan(empty.map)
    assert math.isnan(average_precision([], [], [], [], [], [], ONE).map)


def test_iou_exactly_at_threshold_is_not_a_match():
    # IoU([0,0,1,1], [0,0,2,1]) = 1 / 2 exactly.
    img = image([[0, 0, 1, 1]], [1], [0.9], [[0, 0, 2, 1]], [1])
    assert ap_of([img]).ap["face"] == 0.0
    assert ap_of([img], iou_threshold=0.49).ap["face"] == pytest.approx(1.0)


def test_results_are_keyed_by_class_name():
    names = ("zeta", "alpha", "mid")
    img = image([SQUARES[0], SQUARES[1]], [2, 2], [0.9, 0.8], [SQUARES[0]], [2])  # only label 2 = "alpha"
    result = ap_of([img], names)
    assert list(result.ap) == list(names) and set(result.precision) == set(result.recall) == set(names)
    assert result.ap["alpha"] == pytest.approx(1.0)
    assert math.isnan(result.ap["zeta"]) and math.isnan(result.ap["mid"])
    assert result.n_gt == {"zeta": 0, "alpha": 1, "mid": 0}


def test_wrong_class_and_other_image_do_not_match():
    # A detection only matches objects of its class in its own image.
    images = [image([SQUARES[0]], [2], [0.9], [SQUARES[0]], [1]), image([SQUARES[0]], [1], [0.8], [], [])]
    result = ap_of(images, CLASSES)
    assert result.ap["with_mask"] == 0.0 and math.isnan(result.ap["without_mask"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="one entry per image"):
        average_precision([t([[0, 0, 1, 1]])], [], [], [], [], [], ONE)
    with pytest.raises(ValueError, match="method"):
        ap_of([image()], method="voc10")


# --------------------------------------------------------------------------------------------- VOC, vs loop
@pytest.mark.parametrize("method", ["voc07", "voc12"])
@pytest.mark.parametrize(
    ("seed", "grid"), [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True)]
)
def test_matches_tutorial_loop(seed, grid, method):
    images = random_case(seed, grid=grid)
    expected = reference_map(*batch(*images), len(CLASSES), method=method)
    result = ap_of(images, CLASSES, method)
    got = [result.ap[name] for name in CLASSES]
    assert got == pytest.approx(expected, abs=1e-6, nan_ok=True)
    assert result.map == pytest.approx(torch.tensor(expected).nanmean().item(), abs=1e-6)


def test_input_dtypes_do_not_matter():
    images = random_case(7)
    base = ap_of(images, CLASSES)
    as_double = [
        (db.double(), dl.int(), ds.double(), gb.double(), gl.int(), gd.to(torch.uint8))
        for db, dl, ds, gb, gl, gd in images
    ]
    assert ap_of(as_double, CLASSES).ap == pytest.approx(base.ap, nan_ok=True)


# --------------------------------------------------------------------------------------------- COCO
def test_coco_map_perfect_and_shifted():
    gt = [[0, 0, 100, 100], [200, 200, 300, 260], [0, 300, 80, 400]]
    perfect = image(gt, [1, 2, 3], [0.9, 0.8, 0.7], gt, [1, 2, 3])
    result = coco_map(evalset([perfect], CLASSES, [(400, 400)]))
    assert result["map"] == pytest.approx(1.0) and result["ap50"] == pytest.approx(1.0)
    assert set(result) == {"map", "ap50", *(f"ap_{c}" for c in CLASSES)}

    # Shift by 10% of the width: IoU 90/110 = 0.818 -> matched at IoU .5 .. .8 (7 of 10 thresholds).
    shifted = [[10, 0, 110, 100]]
    result = coco_map(evalset([image(shifted, [1], [0.9], [gt[0]], [1])], CLASSES))
    assert result["ap50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(0.7, abs=1e-6)
    assert result["ap_with_mask"] == pytest.approx(0.7, abs=1e-6)
    assert math.isnan(result["ap_without_mask"])


def test_coco_map_difficult_empty_and_missing():
    gt = [[0, 0, 100, 100], [200, 200, 300, 260]]
    # A difficult object is iscrowd: a miss does not count against recall.
    result = coco_map(evalset([image([gt[0]], [1], [0.9], gt, [1, 1], [False, True])], CLASSES))
    assert result["map"] == pytest.approx(1.0)
    # No detections at all: AP 0 where there are objects.
    result = coco_map(evalset([image([], [], [], gt, [1, 2])], CLASSES))
    assert result["map"] == 0.0 and result["ap50"] == 0.0 and math.isnan(result["ap_mask_weared_incorrect"])
    # No objects / no images: nan, no crash.
    assert math.isnan(coco_map(evalset([image([gt[0]], [1], [0.9])], CLASSES))["map"])
    assert math.isnan(coco_map(EvalSet(CLASSES))["ap50"])


# --------------------------------------------------------------------------------------------- confusion
def test_confusion_matrix_hand_case():
    names = ("a", "b")
    # Objects: a @ S0, b @ S1, a @ S2. Detections: a @ S0 (correct), a @ S1 (wrong class),
    # b far away (false positive), a @ S2 with score .3 (below threshold: the object is missed).
    img = image(
        [SQUARES[0], SQUARES[1], [60, 60, 70, 70], SQUARES[2]],
        [1, 1, 2, 1],
        [0.9, 0.8, 0.7, 0.3],
        SQUARES[:3],
        [1, 2, 1],
    )
    cm = confusion_matrix(evalset([img], names), score_threshold=0.5)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[0, 0, 1], [1, 1, 0], [0, 1, 0]]
    assert confusion_matrix(evalset([img], names), score_threshold=0.2).tolist() == [
        [0, 0, 1],
        [0, 2, 0],
        [0, 1, 0],
    ]


def test_confusion_matrix_greedy_takes_next_free_object():
    # det1 = object 1 exactly; det2 overlaps object 1 best (taken) but object 2 at IoU 0.6: matched to it.
    img = image(
        [[0, 0, 10, 10], [0.5, 0, 10.5, 10]], [1, 1], [0.9, 0.8], [[0, 0, 10, 10], [3, 0, 13, 10]], [1, 1]
    )
    assert confusion_matrix(evalset([img], ONE), score_threshold=0.5).tolist() == [[0, 0], [0, 2]]
    assert confusion_matrix(EvalSet(ONE), score_threshold=0.5).tolist() == [[0, 0], [0, 0]]


def test_confusion_matrix_counts_every_object_and_detection():
    images = random_case(11)
    cm = confusion_matrix(evalset(images, CLASSES), score_threshold=0.3)
    n_det = sum(int((s >= 0.3).sum()) for _, _, s, *_ in images)
    n_gt = sum(int(gl.numel()) for *_, gl, _ in images)
    assert int(cm[:, 1:].sum()) == n_det and int(cm[1:, :].sum()) == n_gt and cm[0, 0] == 0


# --------------------------------------------------------------------------------------------- evaluator
def test_evaluator_two_updates_equal_one_shot():
    images = random_case(21)
    sizes = [(100, 100)] * len(images)
    one = DetectionEvaluator(CLASSES)
    whole = evalset(images, CLASSES, sizes)
    one.update(dict(zip(whole.image_ids, whole.detections)), dict(zip(whole.image_ids, whole.targets)))
    two = DetectionEvaluator(CLASSES)
    for part in (evalset(images[:8], CLASSES, sizes[:8]), evalset(images[8:], CLASSES, sizes[8:], start=8)):
        ids = part.image_ids
        two.update(dict(zip(ids, part.detections)), dict(zip(ids, part.targets)), dict(zip(ids, part.sizes)))
    a, b = one.compute(), two.compute()
    assert isinstance(a, EvalResult) and len(two) == len(images)
    for key in ("map", "map_voc12", "map_coco", "ap50_coco"):
        assert getattr(a, key) == pytest.approx(getattr(b, key))
    assert a.ap == pytest.approx(b.ap, nan_ok=True) and a.ap_voc12 == pytest.approx(b.ap_voc12, nan_ok=True)
    assert torch.equal(a.confusion, b.confusion) and a.n_gt == b.n_gt
    # one confusion matrix: the one at the operating threshold, kept with the matching it came from
    assert a.operating_threshold == OPERATING_THRESHOLD and a.matched is not None
    assert a.confusion is a.matched.confusion(OPERATING_THRESHOLD)
    assert torch.equal(a.confusion, confusion_matrix(whole, score_threshold=OPERATING_THRESHOLD))
    with pytest.raises(ValueError, match="no target"):
        one.update({"x": whole.detections[0]}, {})
    direct = average_precision(*batch(*images), CLASSES)
    assert a.map == pytest.approx(direct.map) and 0 < a.map_coco < a.ap50_coco <= 1

    assert set(a.as_metrics("val")) == {
        "val_map",
        "val_map_voc12",
        "val_map_coco",
        "val_ap50_coco",
        *(f"val_ap_{c}" for c in CLASSES),
    }
    no_coco = two.compute(coco=False)
    assert math.isnan(no_coco.map_coco) and no_coco.map == pytest.approx(a.map)
    assert set(no_coco.as_metrics("test")) == {
        "test_map",
        "test_map_voc12",
        *(f"test_ap_{c}" for c in CLASSES),
    }
    two.reset()
    assert len(two) == 0


# --------------------------------------------------------------------------------------------- plots
def test_plots_write_png(tmp_path):
    images = random_case(5)
    from maskssd.evaluation.metrics import evaluate_set

    result = evaluate_set(evalset(images, CLASSES), coco=False)
    for path in (
        plot_pr_curves(result, tmp_path / "pr.png"),
        plot_pr_curves(ap_of(images, CLASSES, "voc12"), tmp_path / "sub" / "pr12.png"),
        plot_confusion_matrix(result.confusion, CLASSES, tmp_path / "cm.png"),
    ):
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_iou_tie_picks_first_object():
    # det1 has IoU 90/110 with both objects: like the tutorial's torch.max it takes the first (object 1),
    # so det2 (exactly on object 1) is a duplicate: precision 1, 1/2 at recall 1/2 -> voc07 6/11.
    img = image(
        [[1, 0, 11, 10], [0, 0, 10, 10]], [1, 1], [0.9, 0.8], [[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1]
    )
    assert ap_of([img]).ap["face"] == pytest.approx(6 / 11)
    assert ap_of([img], method="voc12").ap["face"] == pytest.approx(0.5)
