"""Boxes stay on the pixels they annotate through every transform.

The test image is flat grey with four rectangles, each filled with its own saturated colour exactly at its
box and given its own label (and a difficult pattern). After a transform, for every box that remains,
the pixels inside the (denormalised) box shrunk by 2 px must be that label's colour, and a ring 1-3 px
outside it mostly not: a box that drifted, was scaled or flipped wrongly, or swapped its label with
another box fails.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskssd.data import FaceMaskDataset, load_annotations
from maskssd.data.transforms import (
    AugmentSpec,
    eval_transform,
    preprocess_images,
    sample_iou_crop,
    train_transform,
)

W, H = 300, 200
GREY = 128
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}
DIFFICULT = {1: False, 2: True, 3: True, 4: False}
BOXES = {1: (20, 20, 100, 90), 2: (130, 30, 200, 110), 3: (225, 40, 285, 180), 4: (30, 120, 110, 185)}
SIZE = 300
NONE = AugmentSpec(photometric_p=0, zoom_out_p=0, iou_crop_p=0, hflip_p=0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Intra-op threads fighting for 2 busy cores make the augmentation 10-20x slower; use one here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rect_image() -> torch.Tensor:
    img = torch.full((3, H, W), GREY, dtype=torch.uint8)
    for label, (x1, y1, x2, y2) in BOXES.items():
        img[:, y1:y2, x1:x2] = torch.tensor(COLOURS[label], dtype=torch.uint8)[:, None, None]
    return img


def rect_sample(order: tuple[int, ...] = (1, 2, 3, 4)) -> dict:
    return {
        "image": tv_tensors.Image(rect_image()),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([BOXES[k] for k in order], dtype=torch.float32), format="XYXY", canvas_size=(H, W)
        ),
        "labels": torch.tensor(order, dtype=torch.int64),
        "difficult": torch.tensor([DIFFICULT[k] for k in order]),
        "image_id": "rects",
        "size": (W, H),
    }


def _is_colour(pixels: np.ndarray, colour: tuple[int, int, int], tol: float = 40.0) -> np.ndarray:
    return (np.abs(pixels.astype(np.float32) - np.asarray(colour, np.float32)) <= tol).all(axis=-1)


def assert_aligned(out: dict, margin: int = 2) -> int:
    """Check every box of a transformed sample against its colour; returns how many boxes were checked."""
    img = out["image"]
    assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    h, w = img.shape[-2:]
    rgb = (img.permute(1, 2, 0).numpy() * 255.0).round()
    boxes, labels, difficult = out["boxes"], out["labels"], out["difficult"]
    assert isinstance(boxes, torch.Tensor) and boxes.dtype == torch.float32 and boxes.shape[-1] == 4
    assert boxes.shape[0] == labels.shape[0] == difficult.shape[0]
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    checked = 0
    for box, label, diff in zip(boxes.tolist(), labels.tolist(), difficult.tolist(), strict=True):
        assert label in COLOURS and diff == DIFFICULT[label]
        x1, y1, x2, y2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
        ix1, iy1 = math.ceil(x1) + margin, math.ceil(y1) + margin
        ix2, iy2 = math.floor(x2) - margin, math.floor(y2) - margin
        if ix2 - ix1 < 1 or iy2 - iy1 < 1:
            continue  # a sliver left by a crop: too thin to check its inside
        inside = _is_colour(rgb[iy1:iy2, ix1:ix2], COLOURS[label])
        assert inside.mean() >= 0.97, (
            f"label {label}: only {inside.mean():.0%} of the box is its colour ({box})"
        )
        # ring 1..3 px outside the box, inside the image
        ox1, oy1 = max(math.floor(x1) - 3, 0), max(math.floor(y1) - 3, 0)
        ox2, oy2 = min(math.ceil(x2) + 3, w), min(math.ceil(y2) + 3, h)
        ring = np.ones((oy2 - oy1, ox2 - ox1), bool)
        ring[
            max(math.floor(y1) - 1 - oy1, 0) : math.ceil(y2) + 1 - oy1,
            max(math.floor(x1) - 1 - ox1, 0) : math.ceil(x2) + 1 - ox1,
        ] = False
        if ring.sum() >= 4:
            around = _is_colour(rgb[oy1:oy2, ox1:ox2][ring], COLOURS[label])
            assert around.mean() <= 0.25, (
                f"label {label}: {around.mean():.0%} of the ring is its colour ({box})"
            )
        checked += 1
    return checked


def _spec(**on: float) -> AugmentSpec:
    return dataclasses.replace(NONE, **on)


def _run(transform, sample: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    return transform(sample)


def test_the_checker_catches_misaligned_boxes():
    out = eval_transform(SIZE)(rect_sample())
    assert assert_aligned(out) == 4
    shifted = dict(out, boxes=(out["boxes"] + torch.tensor([0.03, 0.0, 0.03, 0.0])).clamp(0, 1))
    with pytest.raises(AssertionError):
        assert_aligned(shifted)
    swapped = dict(out, labels=out["labels"][[1, 0, 2, 3]], difficult=out["difficult"][[1, 0, 2, 3]])
    with pytest.raises(AssertionError):
        assert_aligned(swapped)
    mirrored = out["boxes"].clone()
    mirrored[:, [0, 2]] = 1 - out["boxes"][:, [2, 0]]
    with pytest.raises(AssertionError):
        assert_aligned(dict(out, boxes=mirrored))


@pytest.mark.parametrize("size", [SIZE, (150, 400), (384, 256)])
def test_resize_keeps_boxes_on_their_pixels(size):
    out = eval_transform(size)(rect_sample())
    hw = (size, size) if isinstance(size, int) else size
    assert tuple(out["image"].shape) == (3, *hw)
    assert assert_aligned(out) == 4
    expected = torch.tensor([BOXES[k] for k in (1, 2, 3, 4)], dtype=torch.float32) / torch.tensor(
        [W, H, W, H]
    )
    assert torch.allclose(out["boxes"], expected, atol=1e-6)
    assert assert_aligned(train_transform(size, NONE)(rect_sample())) == 4


@pytest.mark.parametrize("seed", range(6))
def test_zoom_out_keeps_boxes_on_their_pixels(seed: int):
    out = _run(train_transform(SIZE, _spec(zoom_out_p=1.0)), rect_sample(), seed)
    assert out["labels"].tolist() == [1, 2, 3, 4]
    assert assert_aligned(out) == 4
    # zoom-out shrinks every box by the same factor per axis
    base = eval_transform(SIZE)(rect_sample())["boxes"]
    ratio = (out["boxes"][:, 2:] - out["boxes"][:, :2]) / (base[:, 2:] - base[:, :2])
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=0.02)
    assert (ratio <= 1 + 1e-5).all() and (ratio >= 1 / 4 - 1e-5).all()


def test_zoom_out_actually_zooms():
    outs = [_run(train_transform(SIZE, _spec(zoom_out_p=1.0)), rect_sample(), s) for s in range(6)]
    base = eval_transform(SIZE)(rect_sample())["boxes"]
    assert all(
        float((o["boxes"][:, 2] - o["boxes"][:, 0]).sum()) < float((base[:, 2] - base[:, 0]).sum())
        for o in outs
    )


@pytest.mark.parametrize("seed", range(12))
def test_iou_crop_keeps_boxes_on_their_pixels(seed: int):
    out = _run(train_transform(SIZE, _spec(iou_crop_p=1.0)), rect_sample((3, 1, 4, 2)), seed)
    assert 1 <= out["boxes"].shape[0] <= 4
    assert_aligned(out)


def test_iou_crop_actually_crops():
    outs = [_run(train_transform(SIZE, _spec(iou_crop_p=1.0)), rect_sample(), s) for s in range(12)]
    assert any(o["boxes"].shape[0] < 4 for o in outs) or any(
        not torch.allclose(o["boxes"], outs[0]["boxes"]) for o in outs
    )


def test_hflip_mirrors_boxes_with_their_pixels():
    base = eval_transform(SIZE)(rect_sample())
    out = _run(train_transform(SIZE, _spec(hflip_p=1.0)), rect_sample(), 0)
    assert assert_aligned(out) == 4
    assert torch.allclose(out["boxes"][:, 0], 1 - base["boxes"][:, 2], atol=1e-6)
    assert torch.allclose(out["boxes"][:, 2], 1 - base["boxes"][:, 0], atol=1e-6)
    assert torch.equal(out["boxes"][:, [1, 3]], base["boxes"][:, [1, 3]])
    assert torch.equal(out["image"], base["image"].flip(-1))


@pytest.mark.parametrize("seed", range(4))
def test_photometric_changes_pixels_not_boxes(seed: int):
    base = eval_transform(SIZE)(rect_sample())
    out = _run(train_transform(SIZE, _spec(photometric_p=1.0)), rect_sample(), seed)
    assert torch.equal(out["boxes"], base["boxes"])
    assert torch.equal(out["labels"], base["labels"]) and torch.equal(out["difficult"], base["difficult"])
    # structure survives: each box is still a flat patch that differs from the ring around it
    img = out["image"]
    for x1, y1, x2, y2 in (out["boxes"] * SIZE).round().int().tolist():
        inside = img[:, y1 + 3 : y2 - 3, x1 + 3 : x2 - 3].reshape(3, -1)
        assert float(inside.std(dim=1).max()) < 0.02
        ring = torch.cat(
            [img[:, y1 - 5 : y1 - 2, x1:x2].reshape(3, -1), img[:, y2 + 2 : y2 + 5, x1:x2].reshape(3, -1)], 1
        )
        assert float((inside.mean(1) - ring.mean(1)).abs().max()) > 0.05


def test_photometric_does_change_pixels():
    base = eval_transform(SIZE)(rect_sample())
    outs = [_run(train_transform(SIZE, _spec(photometric_p=1.0)), rect_sample(), s) for s in range(4)]
    assert any(not torch.allclose(o["image"], base["image"], atol=1e-3) for o in outs)


def test_full_train_pipeline_keeps_boxes_on_their_pixels():
    tf = train_transform(SIZE, AugmentSpec(photometric_p=0.0))
    checked, n_boxes = 0, []
    for seed in range(40):
        out = _run(tf, rect_sample(), seed)
        assert tuple(out["image"].shape) == (3, SIZE, SIZE)
        checked += assert_aligned(out)
        n_boxes.append(out["boxes"].shape[0])
    assert checked >= 40  # most boxes were thick enough to check
    assert min(n_boxes) >= 1 and len(set(n_boxes)) > 1  # crops do drop boxes sometimes


def test_train_pipeline_through_the_dataset(tmp_path: Path, voc_xml):
    """The same check from a PNG + VOC XML on disk, class names and difficult flags from the XML."""
    root = tmp_path / "rects"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(rect_image().permute(1, 2, 0).numpy(), "RGB").save(root / "images" / "rects.png")
    classes = ("red", "green", "blue", "yellow")
    objects = [(classes[k - 1], *BOXES[k], int(DIFFICULT[k])) for k in (4, 2, 1, 3)]
    (root / "annotations" / "rects.xml").write_text(voc_xml("rects.png", W, H, objects))
    ds = FaceMaskDataset(
        load_annotations(root, classes=classes),
        train_transform(SIZE, AugmentSpec(photometric_p=0.0)),
        classes,
    )
    assert ds.annotations[0].labels.tolist() == [4, 2, 1, 3]
    assert ds.annotations[0].difficult.tolist() == [False, True, False, True]
    checked = sum(assert_aligned(ds[(seed, 0)]) for seed in range(20))
    assert checked >= 20
    assert torch.equal(ds[(5, 0)]["image"], ds[(5, 0)]["image"])


def test_image_without_boxes_passes_the_train_pipeline():
    sample = rect_sample()
    sample["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(H, W))
    sample["labels"] = torch.zeros(0, dtype=torch.int64)
    sample["difficult"] = torch.zeros(0, dtype=torch.bool)
    for seed in range(5):
        out = _run(train_transform(SIZE), sample, seed)
        assert tuple(out["image"].shape) == (3, SIZE, SIZE) and out["boxes"].shape == (0, 4)


@pytest.mark.parametrize("size", [SIZE, (180, 240)])
def test_eval_transform_is_deterministic_and_only_resizes(size):
    hw = [size, size] if isinstance(size, int) else list(size)
    outs = [_run(eval_transform(size), rect_sample(), seed) for seed in (0, 1, 2)]
    for o in outs[1:]:
        assert torch.equal(o["image"], outs[0]["image"]) and torch.equal(o["boxes"], outs[0]["boxes"])
    expected = v2.functional.resize(rect_image(), hw, antialias=True).float() / 255.0
    assert torch.equal(outs[0]["image"].as_subclass(torch.Tensor), expected)
    assert outs[0]["labels"].tolist() == [1, 2, 3, 4]
    # preprocess_images (inference) gives the same pixels as eval_transform, one image or a batch
    other = rect_image().flip(-1)
    batch = preprocess_images([rect_image(), other], size)
    assert batch.shape == (2, 3, *hw) and batch.dtype == torch.float32
    assert torch.equal(batch[0], outs[0]["image"].as_subclass(torch.Tensor))
    flipped = dict(rect_sample(), image=tv_tensors.Image(other))
    assert torch.equal(batch[1], eval_transform(size)(flipped)["image"].as_subclass(torch.Tensor))


def test_preprocess_images_keeps_camera_frames_channels_last():
    """A (3, H, W) view of an (H, W, 3) frame resizes to a channels_last batch: the CPU model's layout, so the
    predictor copies nothing more; its values are those of a contiguous image, and the input is never written."""
    frame = torch.randint(
        0, 256, (120, 160, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    view = frame.permute(2, 0, 1)
    one = preprocess_images([view], 64)
    assert one.shape == (1, 3, 64, 64) and one.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(one, preprocess_images([view.contiguous()], 64))
    two = preprocess_images([view, view], 64)
    assert two.is_contiguous(memory_format=torch.channels_last) and torch.equal(two[1], one[0])
    same = torch.rand(3, 64, 64) * 255  # already the model size (resize may return it as it is)
    before = same.clone()
    preprocess_images([same], 64)
    assert torch.equal(same, before)


def test_iou_crop_sampler_follows_torchvision_distribution():
    """The batched sampler draws crops as torchvision's RandomIoUCrop does: same share of uncropped images,
    same mean crop area, and every crop within its limits (aspect ratio, scale, a box centre inside)."""
    from torchvision.transforms.v2 import RandomIoUCrop

    w, h = 400, 300
    boxes = torch.tensor([[20.0, 30.0, 44.0, 60.0], [200.0, 100.0, 215.0, 118.0], [300, 200, 390, 290]])
    canvas = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    reference, n = RandomIoUCrop(), 1500
    torch.manual_seed(0)
    ref = [reference.make_params([image, canvas]) for _ in range(n)]
    ref_area = [p["width"] * p["height"] / (w * h) for p in ref if p]
    torch.manual_seed(1)
    ours = [sample_iou_crop(boxes, w, h) for _ in range(n)]
    crops = [c for c in ours if c is not None]
    assert abs(len(crops) - len(ref_area)) / n < 0.05
    assert abs(np.mean([cw * ch / (w * h) for _, _, cw, ch, _ in crops]) - np.mean(ref_area)) < 0.03
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    for left, top, cw, ch, kept in crops:
        assert 0.5 <= cw / ch <= 2.0 and 0.3 * w - 1 <= cw <= w and 0.3 * h - 1 <= ch <= h
        assert 0 <= left <= w - cw and 0 <= top <= h - ch
        inside = (left < cx) & (cx < left + cw) & (top < cy) & (cy < top + ch)
        assert kept.any() and torch.equal(kept, inside)
