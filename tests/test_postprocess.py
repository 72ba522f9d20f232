"""postprocess (batched decode + score filter + one batched NMS + per-image top-k) vs a per-image, per-class loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from maskssd.ssd.postprocess import DecodeSpec, Detections, postprocess
from maskssd.ssd.priors import PriorSpec, cxcywh_to_xyxy
from tests.reference.tutorial import gcxgcy_to_cxcy

N_CLASSES = 4
SMALL_PRIORS = PriorSpec.linear((10, 5, 3, 1), 0.1, 0.9).priors()  # 540 priors: fast loops


# ------------------------------------------------------------------------------------ reference
def reference_postprocess(
    locs,
    scores,
    priors,
    min_score=0.01,
    max_overlap=0.45,
    top_k=200,
    class_agnostic=False,
    sizes=None,
    class_min_score=None,
    pre_nms_top_k=None,
):
    """One image at a time, one class at a time: decode, softmax, score > min_score, NMS, then top_k."""
    out = []
    n_classes = scores.shape[2]
    for i in range(scores.shape[0]):
        boxes = cxcywh_to_xyxy(gcxgcy_to_cxcy(locs[i], priors)).clamp(0, 1)
        probs = F.softmax(scores[i], dim=1)
        cand_b, cand_l, cand_s = [], [], []
        for c in range(1, n_classes):
            thr = min_score if class_min_score is None else float(class_min_score[c - 1])
            above = probs[:, c] > thr
            cand_b.append(boxes[above])
            cand_s.append(probs[above, c])
            cand_l.append(torch.full((int(above.sum()),), c, dtype=torch.long))
        b, s, lab = torch.cat(cand_b), torch.cat(cand_s), torch.cat(cand_l)
        if pre_nms_top_k is not None and s.numel() > pre_nms_top_k:
            idx = s.topk(pre_nms_top_k).indices
            b, s, lab = b[idx], s[idx], lab[idx]
        if class_agnostic:
            keep = torchvision.ops.nms(b, s, max_overlap)
        else:
            keep = []
            for c in range(1, n_classes):
                idx = (lab == c).nonzero().squeeze(1)
                if idx.numel():
                    keep.append(idx[torchvision.ops.nms(b[idx], s[idx], max_overlap)])
            keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
        b, s, lab = b[keep], s[keep], lab[keep]
        if s.numel() > top_k:
            order = s.argsort(descending=True)[:top_k]
            b, s, lab = b[order], s[order], lab[order]
        if sizes is not None:
            w, h = sizes[i].tolist()
            b = b * torch.tensor([w, h, w, h])
        out.append((b, lab, s))
    return out


def canonical(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor):
    """Detections in a fixed order (score descending, then label) so sets compare as tensors."""
    key = scores.double() * 10 - labels.double() * 1e-9
    order = key.argsort(descending=True)
    return boxes[order], labels[order], scores[order]


def assert_same_detections(dets: list[Detections], ref) -> None:
    assert len(dets) == len(ref)
    for d, (rb, rl, rs) in zip(dets, ref, strict=True):
        assert len(d) == rs.numel()
        b, lab, s = canonical(d.boxes, d.labels, d.scores)
        rb, rl, rs = canonical(rb, rl, rs)
        assert torch.equal(lab, rl)
        torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, rb, rtol=1e-5, atol=1e-5)


def random_outputs(seed: int, n: int = 3, priors: torch.Tensor = SMALL_PRIORS, spread: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    locs = torch.randn(n, priors.shape[0], 4, generator=g) * 0.5
    scores = torch.randn(n, priors.shape[0], N_CLASSES, generator=g) * spread
    return locs, scores


# ---------------------------------------------------------------------------------------- tests
SPECS = {
    "paper": DecodeSpec(),
    "overlap_0.3": DecodeSpec(max_overlap=0.3),
    "overlap_0.6_min_0.2": DecodeSpec(min_score=0.2, max_overlap=0.6),
    "top_k_10": DecodeSpec(top_k=10),
    "agnostic": DecodeSpec(class_agnostic=True),
    "agnostic_top_k_25": DecodeSpec(class_agnostic=True, top_k=25, min_score=0.05),
    "pre_nms_top_k": DecodeSpec(pre_nms_top_k=150),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(SPECS))
def test_postprocess_matches_loop_reference(name, seed):
    spec = SPECS[name]
    locs, scores = random_outputs(seed)
    dets = postprocess(locs, scores, SMALL_PRIORS, spec)
    ref = reference_postprocess(
        locs,
        scores,
        SMALL_PRIORS,
        spec.min_score,
        spec.max_overlap,
        spec.top_k,
        spec.class_agnostic,
        pre_nms_top_k=spec.pre_nms_top_k,
    )
    assert_same_detections(dets, ref)


def test_postprocess_ssd300_realistic_scores():
    """8732 priors, mostly confident background: a few percent of priors above min_score."""
    priors = PriorSpec.ssd300().priors()
    g = torch.Generator().manual_seed(3)
    locs = torch.randn(2, priors.shape[0], 4, generator=g) * 0.3
    scores = torch.randn(2, priors.shape[0], N_CLASSES, generator=g)
    scores[..., 0] += 6.0
    hot = torch.rand(2, priors.shape[0], generator=g) < 0.03
    scores[..., 1:] += hot[..., None] * torch.rand(2, priors.shape[0], 3, generator=g) * 8
    dets = postprocess(locs, scores, priors)
    assert all(len(d) > 0 for d in dets)
    assert_same_detections(dets, reference_postprocess(locs, scores, priors))


def test_sizes_scale_boxes_to_pixels():
    locs, scores = random_outputs(4)
    sizes = torch.tensor([[640.0, 480.0], [300.0, 300.0], [123.0, 457.0]])
    norm = postprocess(locs, scores, SMALL_PRIORS)
    pix = postprocess(locs, scores, SMALL_PRIORS, sizes=sizes)
    for d_n, d_p, (w, h) in zip(norm, pix, sizes.tolist(), strict=True):
        assert torch.equal(d_n.labels, d_p.labels) and torch.equal(d_n.scores, d_p.scores)
        torch.testing.assert_close(d_p.boxes, d_n.boxes * torch.tensor([w, h, w, h]))
        assert d_p.boxes[:, 0::2].max() <= w + 1e-3 and d_p.boxes[:, 1::2].max() <= h + 1e-3
    ref = reference_postprocess(locs, scores, SMALL_PRIORS, sizes=sizes)
    assert_same_detections(pix, ref)


def test_boxes_are_clipped_to_unit_square():
    locs, scores = random_outputs(5)
    locs = locs * 6  # boxes far outside the image
    for d in postprocess(locs, scores, SMALL_PRIORS):
        assert d.boxes.min() >= 0 and d.boxes.max() <= 1


def _two_classes_one_box() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prior; p(with_mask) 0.6, p(without_mask) 0.3: the same box (IoU 1) in two classes."""
    priors = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    probs = torch.tensor([[[0.05, 0.6, 0.3, 0.05]]])
    return torch.zeros(1, 1, 4), probs.log(), priors


def test_class_agnostic_suppresses_other_class_at_iou_1():
    locs, scores, priors = _two_classes_one_box()
    classwise = postprocess(locs, scores, priors, DecodeSpec(min_score=0.1))[0]
    assert sorted(classwise.labels.tolist()) == [1, 2]
    torch.testing.assert_close(classwise.boxes[0], classwise.boxes[1])
    agnostic = postprocess(locs, scores, priors, DecodeSpec(min_score=0.1, class_agnostic=True))[0]
    assert agnostic.labels.tolist() == [1]
    torch.testing.assert_close(agnostic.scores, torch.tensor([0.6]))


def test_class_agnostic_is_per_image():
    """Boxes of different images never suppress each other."""
    locs, scores, priors = _two_classes_one_box()
    dets = postprocess(
        locs.expand(3, -1, -1),
        scores.expand(3, -1, -1),
        priors,
        DecodeSpec(min_score=0.1, class_agnostic=True),
    )
    assert [d.labels.tolist() for d in dets] == [[1], [1], [1]]


@pytest.mark.parametrize("top_k", [1, 7, 50])
def test_top_k_keeps_the_best_per_image(top_k):
    locs, scores = random_outputs(6, n=4)
    full = postprocess(locs, scores, SMALL_PRIORS, DecodeSpec(top_k=10_000))
    cut = postprocess(locs, scores, SMALL_PRIORS, DecodeSpec(top_k=top_k))
    for f, c in zip(full, cut, strict=True):
        assert len(f) > top_k  # the cut matters
        assert len(c) == top_k
        torch.testing.assert_close(
            c.scores.sort(descending=True).values, f.scores.sort(descending=True).values[:top_k]
        )


def test_scores_are_sorted_within_each_image():
    locs, scores = random_outputs(7, n=3)
    for d in postprocess(locs, scores, SMALL_PRIORS):
        assert torch.equal(d.scores, d.scores.sort(descending=True).values)


def test_per_class_min_score_tensor():
    locs, scores = random_outputs(8)
    per_class = torch.tensor([0.05, 0.3, 0.6])
    dets = postprocess(locs, scores, SMALL_PRIORS, DecodeSpec(min_score=0.99), min_score=per_class)
    ref = reference_postprocess(locs, scores, SMALL_PRIORS, class_min_score=per_class)
    assert_same_detections(dets, ref)
    for d in dets:
        for c in (1, 2, 3):
            assert (d.scores[d.labels == c] > per_class[c - 1]).all()
    assert {int(x) for d in dets for x in d.labels} == {1, 2, 3}


def test_empty_results_have_the_right_shapes():
    locs, scores = random_outputs(9, n=2)
    scores[..., 0] += 50.0  # certain background everywhere
    sizes = torch.tensor([[640.0, 480.0], [10.0, 20.0]])
    for kw in ({}, {"sizes": sizes}):
        dets = postprocess(locs, scores, SMALL_PRIORS, **kw)
        assert len(dets) == 2
        for d in dets:
            assert len(d) == 0
            assert d.boxes.shape == (0, 4) and d.labels.shape == (0,) and d.scores.shape == (0,)
            assert d.labels.dtype == torch.long and d.boxes.dtype == torch.float32
            assert d.to_list(("a", "b", "c")) == []


def test_some_images_empty_others_not():
    locs, scores = random_outputs(10, n=3)
    scores[1, :, 0] += 50.0
    dets = postprocess(locs, scores, SMALL_PRIORS)
    assert [len(d) > 0 for d in dets] == [True, False, True]
    assert_same_detections(dets, reference_postprocess(locs, scores, SMALL_PRIORS))


def test_to_list():
    locs, scores, priors = _two_classes_one_box()
    d = postprocess(locs, scores, priors, DecodeSpec(min_score=0.1), sizes=torch.tensor([[100.0, 200.0]]))[0]
    rows = d.to_list(("with_mask", "without_mask", "mask_weared_incorrect"))
    assert [r["label"] for r in rows] == ["with_mask", "without_mask"]
    assert rows[0]["box"] == [30.0, 60.0, 70.0, 140.0]
    assert rows[0]["score"] == pytest.approx(0.6)
