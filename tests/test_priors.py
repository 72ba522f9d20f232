"""Default boxes and box coding: SSD300 priors vs the tutorial's create_prior_boxes, encode/decode, IoU."""

from __future__ import annotations

from math import sqrt

import pytest
import torch
import torchvision

from maskssd.ssd.priors import (
    VARIANCES,
    PriorIoU,
    PriorSpec,
    box_iou,
    cxcywh_to_xyxy,
    decode,
    encode,
    xyxy_to_cxcywh,
)
from tests.reference import tutorial as reference


def random_boxes_xyxy(shape: tuple[int, ...], g: torch.Generator, min_size: float = 0.02) -> torch.Tensor:
    """Valid normalised xyxy boxes with positive width and height."""
    xy = torch.rand(*shape, 2, generator=g) * 0.9
    wh = min_size + torch.rand(*shape, 2, generator=g) * (1.0 - xy - min_size).clamp(min=1e-3)
    return torch.cat([xy, xy + wh], -1)


# ------------------------------------------------------------------------------------------ priors
def test_ssd300_has_8732_priors_in_tutorial_order():
    spec = PriorSpec.ssd300()
    ours = spec.priors()
    ref = reference.create_prior_boxes()
    assert spec.num_priors == 8732
    assert ours.shape == ref.shape == (8732, 4)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_ssd300_boxes_per_location():
    spec = PriorSpec.ssd300()
    assert spec.boxes_per_location == [4, 6, 6, 6, 4, 4]
    assert sum(f * f * b for f, b in zip(spec.feature_maps, spec.boxes_per_location, strict=True)) == 8732


def test_priors_are_clipped_unless_asked_not_to():
    clipped = PriorSpec.ssd300().priors()
    assert clipped.min() >= 0 and clipped.max() <= 1
    spec = PriorSpec((2, 1), (0.6, 0.9), ((3.0,), (2.0,)), clip=False)
    raw = spec.priors()
    assert raw.max() > 1  # 0.9 * sqrt(2) and the last map's extra scale-1 box stay unclipped
    assert raw.shape == (spec.num_priors, 4)


@pytest.mark.parametrize("fmaps", [(20, 10, 5), (16, 8, 4, 2, 1), (1,)])
def test_linear_spec_counts_and_scales(fmaps):
    spec = PriorSpec.linear(fmaps, 0.1, 0.9)
    assert spec.priors().shape == (spec.num_priors, 4)
    assert spec.scales[0] == pytest.approx(0.1)
    if len(fmaps) > 1:
        assert spec.scales[-1] == pytest.approx(0.9)
    assert spec.boxes_per_location == [4] * len(fmaps)


def test_priors_layout_is_map_row_col_ratio():
    spec = PriorSpec((2, 1), (0.5, 0.6), ((2.0,), ()), extra_scale_last=0.8, clip=False)
    p = spec.priors()
    assert p.shape == (2 * 2 * 3 + 1 * 1 * 2, 4)
    # location (row 0, col 1) is the second group of 3 boxes: cx = 0.75, cy = 0.25
    torch.testing.assert_close(p[3:6, :2], torch.tensor([[0.75, 0.25]] * 3))
    # row 1, col 0: cx = 0.25, cy = 0.75
    torch.testing.assert_close(p[6:9, :2], torch.tensor([[0.25, 0.75]] * 3))
    # ratio 1, the extra square sqrt(s_k * s_k+1), then ratio 2
    expected_wh = torch.tensor([[0.5, 0.5], [sqrt(0.3), sqrt(0.3)], [0.5 * sqrt(2), 0.5 / sqrt(2)]])
    torch.testing.assert_close(p[:3, 2:], expected_wh)


def test_last_map_extra_box_is_extra_scale_last():
    """The tutorial gives the last map's extra square box side ``1.0`` itself (not ``sqrt(s_last * 1.0)``)."""
    spec = PriorSpec((2, 1), (0.5, 0.6), ((2.0,), ()), extra_scale_last=0.8, clip=False)
    p = spec.priors()
    torch.testing.assert_close(p[-2:], torch.tensor([[0.5, 0.5, 0.6, 0.6], [0.5, 0.5, 0.8, 0.8]]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"feature_maps": (38, 19), "scales": (0.1,), "aspect_ratios": ((2.0,), (2.0,))},
        {"feature_maps": (38, 19), "scales": (0.1, 0.2), "aspect_ratios": ((2.0,),)},
        {"feature_maps": (38,), "scales": (0.0,), "aspect_ratios": ((2.0,),)},
        {"feature_maps": (38,), "scales": (-0.1,), "aspect_ratios": ((2.0,),)},
        {"feature_maps": (38,), "scales": (1.6,), "aspect_ratios": ((2.0,),)},
    ],
)
def test_prior_spec_validation(kwargs):
    with pytest.raises(ValueError):
        PriorSpec(**kwargs)


def test_prior_spec_accepts_scale_up_to_1_5():
    assert PriorSpec((1,), (1.5,), ((),)).num_priors == 2


# ------------------------------------------------------------------------------------------- coding
def test_xyxy_cxcywh_round_trip():
    g = torch.Generator().manual_seed(0)
    b = random_boxes_xyxy((5, 7), g)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b, rtol=0, atol=1e-6)
    c = xyxy_to_cxcywh(torch.tensor([[0.1, 0.2, 0.5, 0.8]]))
    torch.testing.assert_close(c, torch.tensor([[0.3, 0.5, 0.4, 0.6]]))


def test_encode_matches_tutorial_cxcy_to_gcxgcy():
    assert VARIANCES == (0.1, 0.2)
    g = torch.Generator().manual_seed(1)
    priors = PriorSpec.ssd300().priors()
    boxes = xyxy_to_cxcywh(random_boxes_xyxy((priors.shape[0],), g))
    torch.testing.assert_close(
        encode(boxes, priors), reference.cxcy_to_gcxgcy(boxes, priors), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encode_decode_round_trip_batched(seed):
    g = torch.Generator().manual_seed(seed)
    priors = PriorSpec.ssd300().priors()
    boxes = xyxy_to_cxcywh(random_boxes_xyxy((3, priors.shape[0]), g))  # (N, P, 4) against (P, 4)
    offsets = encode(boxes, priors)
    assert offsets.shape == boxes.shape
    torch.testing.assert_close(decode(offsets, priors), boxes, rtol=0, atol=1e-5)
    # and the other way round: offsets -> boxes -> offsets
    off = torch.randn(3, priors.shape[0], 4, generator=g)
    torch.testing.assert_close(encode(decode(off, priors), priors), off, rtol=0, atol=1e-4)


def test_encode_of_prior_is_zero():
    priors = PriorSpec.ssd300().priors()
    torch.testing.assert_close(encode(priors, priors), torch.zeros_like(priors))
    torch.testing.assert_close(decode(torch.zeros_like(priors), priors), priors)


def test_encode_custom_variances():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    box = torch.tensor([[0.6, 0.3, 0.4, 0.2]])
    out = encode(box, prior, (0.5, 1.0))
    expected = torch.tensor(
        [[0.1 / 0.1, -0.2 / 0.2, torch.log(torch.tensor(2.0)), torch.log(torch.tensor(0.5))]]
    )
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(decode(out, prior, (0.5, 1.0)), box)


# ---------------------------------------------------------------------------------------------- IoU
@pytest.mark.parametrize("seed", [0, 1])
def test_box_iou_matches_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    a = random_boxes_xyxy((13,), g)
    b = random_boxes_xyxy((29,), g)
    torch.testing.assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b), rtol=1e-5, atol=1e-6)


def test_box_iou_batched_matches_per_item():
    g = torch.Generator().manual_seed(3)
    a = random_boxes_xyxy((4, 6), g)
    b = random_boxes_xyxy((4, 50), g)
    batched = box_iou(a, b)
    assert batched.shape == (4, 6, 50)
    for i in range(4):
        torch.testing.assert_close(batched[i], torchvision.ops.box_iou(a[i], b[i]), rtol=1e-5, atol=1e-6)
    # broadcasting priors (P, 4) against batched objects (N, M, 4)
    torch.testing.assert_close(
        box_iou(a, b[0]), torch.stack([torchvision.ops.box_iou(x, b[0]) for x in a]), rtol=1e-5, atol=1e-6
    )


def test_box_iou_simple_cases():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.5, 0.5]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1.0, 1 / 3, 0.0, 0.25]]))


def test_box_iou_degenerate_boxes_are_finite():
    a = torch.tensor([[0.2, 0.2, 0.2, 0.2]])  # zero area
    iou = box_iou(a, a)
    assert torch.isfinite(iou).all() and float(iou) == 0.0
    assert box_iou(torch.zeros(0, 4), torch.rand(5, 4)).shape == (0, 5)


def test_prior_iou_equals_box_iou_bit_for_bit():
    priors_xy = cxcywh_to_xyxy(PriorSpec.ssd300().priors())
    fast = PriorIoU(priors_xy)
    assert fast.factored  # 332 distinct x and y extents among 8732 priors
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(57, 2, generator=g)
    boxes = torch.cat([xy, xy + torch.rand(57, 2, generator=g) * 0.6], 1)
    expected = box_iou(boxes, priors_xy)
    assert torch.equal(fast(boxes), expected)
    first = fast(boxes, reuse=True).clone()
    fast(boxes[:5] * 0.5, reuse=True)  # the workspace is reused: results only live until the next call
    assert torch.equal(first, expected) and torch.equal(fast(boxes[:0]), expected[:0])
    scattered = torch.rand(40, 4, generator=g).sort(1).values[:, [0, 1, 2, 3]]
    unstructured = PriorIoU(scattered)  # no shared extents: falls back to box_iou
    assert not unstructured.factored
    assert torch.equal(unstructured(boxes), box_iou(boxes, scattered))
