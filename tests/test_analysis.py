"""Error analysis (maskssd.evaluation.analysis): AP and recall by face size on a hand-made image, false boxes
and missed objects at the operating threshold, the confusion matrix there, and the worst-images gallery."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from maskssd.evaluation.analysis import SIZE_BUCKETS, analyse, render_worst, size_bucket
from maskssd.evaluation.records import EvalSet
from maskssd.evaluation.voc import match
from maskssd.ssd.postprocess import Detections

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")

# objects of one class, one per size bucket (shorter side 10, 20, 34 and 100 px)
GT = torch.tensor(
    [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 84, 84], [100, 100, 200, 200]], dtype=torch.float32
)
DETS = torch.tensor(
    [
        [100, 100, 200, 200],  # 0: the 100 px object, TP
        [20, 20, 40, 40],  # 1: the 20 px object, TP
        [150, 10, 160, 20],  # 2: matches nothing, 10 px: a false box of the < 16 bucket
        [100, 100, 190, 190],  # 3: a duplicate of the 100 px object (IoU 0.81): FP in the >= 64 bucket
        [52, 52, 82, 82],  # 4: 30 px itself, matches the 34 px object (IoU 0.78): TP of the 32-64 bucket
    ],
    dtype=torch.float32,
)
SCORES = torch.tensor([0.9, 0.85, 0.8, 0.7, 0.3])


def analyse_lists(*data, image_ids=None, threshold=0.4):
    """The analysis of six per-image lists (matched once, as every evaluation is)."""
    return analyse(match(EvalSet.from_lists(*data, CLASSES, image_ids=image_ids)), threshold=threshold)


def hand_made():
    labels = torch.ones(5, dtype=torch.long)
    return analyse_lists(
        [DETS], [labels], [SCORES], [GT], [torch.ones(4, dtype=torch.long)], [torch.zeros(4, dtype=torch.bool)],
        image_ids=["img"], threshold=0.4,
    )  # fmt: skip


def test_size_buckets_by_shorter_side():
    boxes = torch.tensor(
        [[0, 0, 15.9, 100], [0, 0, 16, 100], [0, 0, 100, 31.99], [0, 0, 64, 64], [0, 0, 500, 63]]
    )
    assert size_bucket(boxes).tolist() == [0, 1, 1, 3, 2]
    assert [k for k, _ in SIZE_BUCKETS] == ["lt16", "16_32", "32_64", "ge64"]


def test_ap_and_recall_by_size_on_a_hand_made_image():
    r = hand_made()
    ap = r.ap["with_mask"]
    # < 16: its object missed, one false box of that size; 16-32: found; 32-64: found by a 30 px box (it belongs to
    # its object's bucket); >= 64: found, then a duplicate (precision 1 at recall 1 stays)
    assert ap == pytest.approx({"lt16": 0.0, "16_32": 1.0, "32_64": 1.0, "ge64": 1.0})
    assert r.n_gt["with_mask"] == {"lt16": 1, "16_32": 1, "32_64": 1, "ge64": 1, "all": 4}
    assert math.isnan(r.ap["without_mask"]["ge64"]) and r.map_by_size["16_32"] == pytest.approx(
        1.0
    )  # nan classes left out
    # at score >= 0.4 the 32-64 object's only detection (0.3) is not shown: recall 2 of 4
    assert r.recall["with_mask"] == {"lt16": 0.0, "16_32": 1.0, "32_64": 0.0, "ge64": 1.0, "all": 0.5}
    assert r.recall["all"]["all"] == 0.5 and math.isnan(r.recall["without_mask"]["all"])
    assert r.detections["with_mask"] == {"above": 4, "tp": 2, "false": 2}
    (row,) = r.images
    assert row["missed_objects"] == [0, 2] and row["false_detections"] == [2, 3]
    assert r.confusion.tolist() == [[0, 2, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = r.as_metrics("val")
    assert m["val_recall_op"] == 0.5 and m["val_map_size_lt16"] == 0.0
    assert "best_val_recall_op_without_mask" not in m  # nan left out
    doc = r.to_dict()
    assert doc["worst_images"][0]["id"] == "img" and doc["size_buckets"][0]["max"] == 16.0


def test_a_lower_threshold_counts_the_low_detection(make_dataset, good_sample, tmp_path):
    labels = torch.ones(5, dtype=torch.long)
    gt = ([GT], [torch.ones(4, dtype=torch.long)], [torch.zeros(4, dtype=torch.bool)])
    r = analyse_lists([DETS], [labels], [SCORES], *gt, threshold=0.25)
    assert r.recall["with_mask"]["32_64"] == 1.0 and r.images[0]["missed"] == 1
    # difficult objects are neither missed nor found; their detections are not false boxes
    r = analyse_lists([DETS], [labels], [SCORES], [GT], gt[1], [torch.tensor([True, False, False, True])])
    assert (
        r.n_gt["with_mask"]["all"] == 2 and r.detections["with_mask"]["false"] == 1
    )  # only the 10 px clutter


def test_worst_images_are_drawn(make_dataset, good_sample, tmp_path):
    from maskssd.data import load_split

    samples = {f"im{i}": good_sample(f"im{i}", 240, 240, seed=i) for i in range(3)}
    root = make_dataset(samples, {"train": list(samples), "val": list(samples), "test": list(samples)})
    anns = load_split(root, "val", "test_split", list(CLASSES))
    dets, data = [], ([], [], [], [], [], [])
    for k, ann in enumerate(anns):
        gt = torch.from_numpy(ann.boxes)
        d = Detections(
            gt[: k % 2 + 1].clone(), torch.tensor([1, 2])[: k % 2 + 1], torch.tensor([0.9, 0.8])[: k % 2 + 1]
        )
        if k == 2:  # one false box too
            d = Detections(
                torch.cat([d.boxes, torch.tensor([[100.0, 100, 140, 140]])]),
                torch.tensor([1, 1]),
                torch.tensor([0.9, 0.95]),
            )
        dets.append(d)
        for store, x in zip(
            data,
            (d.boxes, d.labels, d.scores, gt, torch.from_numpy(ann.labels), torch.from_numpy(ann.difficult)),
        ):
            store.append(x)
    r = analyse_lists(*data, image_ids=[a.image_id for a in anns])
    assert [(w["id"], w["missed"], w["false"]) for w in r.worst(5)] == [("im2", 1, 1), ("im0", 1, 0)]
    paths = render_worst(r, anns, dets, tmp_path / "errors", k=5)
    assert [p.name for p in paths] == ["01_im2.png", "02_im0.png"]
    with Image.open(paths[0]) as img:
        assert img.size == (240, 240)
        assert (255, 0, 255) in {img.getpixel((x, y)) for x in range(240) for y in range(0, 240, 2)}  # missed


def test_an_image_without_objects_has_only_false_boxes():
    """Detections on an image with no face: false boxes of their own size (this crashed before the records)."""
    empty = (torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    r = analyse_lists([DETS[:1]], [torch.ones(1, dtype=torch.long)], [SCORES[:1]], *([x] for x in empty))
    assert r.detections["with_mask"] == {"above": 1, "tp": 0, "false": 1} and r.images[0]["false"] == 1
    assert math.isnan(r.map_by_size["ge64"])
