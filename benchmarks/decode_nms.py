"""Benchmark: detection post-processing (decode, score filter, NMS, top-k), maskssd.postprocess vs the
tutorial's ``detect_objects`` (a greedy NMS loop in Python, per image and class) and vs a per-image,
per-class ``torchvision.ops.nms`` loop.

8732 SSD300 priors, 4 classes, realistic scores: confident background nearly everywhere, a few faces whose
nearby priors score high, some clutter; about 1-5 % of priors exceed ``min_score`` 0.01 for some class.
Paper settings: min_score 0.01, max_overlap 0.45, top_k 200. All three give the same detections.
Run: ``.venv/bin/python -m benchmarks.decode_nms [--quick]``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

from benchmarks._timing import (
    add_record_arg,
    add_threads_arg,
    machine,
    median_time,
    print_table,
    save_record,
    set_threads,
)
from maskssd.ssd.postprocess import DecodeSpec, postprocess, postprocess_tensors
from maskssd.ssd.priors import PriorSpec, box_iou, cxcywh_to_xyxy
from tests.reference.tutorial import detect_objects, gcxgcy_to_cxcy

N_CLASSES = 4
MIN_SCORE, MAX_OVERLAP, TOP_K = 0.01, 0.45, 200


# ------------------------------------------------------------------------------------------ baselines
def decoded_boxes(locs_i: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    # clamped like maskssd (the tutorial leaves boxes unclipped), so that the detections compare equal
    return cxcywh_to_xyxy(gcxgcy_to_cxcy(locs_i, priors)).clamp(0, 1)


def torchvision_loop(locs, scores, priors, min_score=MIN_SCORE, max_overlap=MAX_OVERLAP, top_k=TOP_K):
    """The same loops with ``torchvision.ops.nms`` per image and class."""
    probs = F.softmax(scores, dim=2)
    out = []
    for i in range(locs.size(0)):
        boxes = decoded_boxes(locs[i], priors)
        b_all, l_all, s_all = [], [], []
        for c in range(1, scores.size(2)):
            above = probs[i, :, c] > min_score
            b, s = boxes[above], probs[i, above, c]
            keep = torchvision.ops.nms(b, s, max_overlap)
            b_all.append(b[keep])
            s_all.append(s[keep])
            l_all.append(torch.full((keep.numel(),), c, dtype=torch.long))
        b, lab, s = torch.cat(b_all), torch.cat(l_all), torch.cat(s_all)
        order = s.argsort(descending=True)[:top_k]
        out.append((b[order], lab[order], s[order]))
    return out


# ------------------------------------------------------------------------------------------- data
def make_outputs(batch: int, priors: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw SSD outputs of a trained-looking detector on images with 2-8 faces."""
    g = torch.Generator().manual_seed(seed)
    p = priors.shape[0]
    prior_xy = cxcywh_to_xyxy(priors)
    locs = torch.randn(batch, p, 4, generator=g) * 0.4
    scores = torch.randn(batch, p, N_CLASSES, generator=g) * 0.5
    scores[..., 0] += 8.0  # p(face class) ~ 3e-4: confident background
    for i in range(batch):
        n = int(torch.randint(2, 9, (1,), generator=g))
        side = 0.04 + torch.rand(n, 1, generator=g) * 0.3
        c = side / 2 + torch.rand(n, 2, generator=g) * (1 - side)
        faces = torch.cat([c - side / 2, c + side / 2], 1)
        labels = torch.randint(1, N_CLASSES, (n,), generator=g)
        iou, face = box_iou(faces, prior_xy).max(0)
        near = iou > 0.3
        boost = torch.randn(int(near.sum()), generator=g) * 1.5 + 8.0 * iou[near]
        scores[i, near, labels[face[near]]] += boost
        # a second class on some faces (the paper's "transition" frames), and clutter
        scores[i, near, (labels[face[near]] % 3) + 1] += torch.rand(int(near.sum()), generator=g) * 5
        clutter = torch.rand(p, generator=g) < 0.01
        scores[i, clutter, 1:] += torch.rand(int(clutter.sum()), N_CLASSES - 1, generator=g) * 5
    return locs, scores


def same_detections(ours, theirs) -> bool:
    for d, (b, lab, s) in zip(ours, theirs, strict=True):
        keep = lab > 0  # the tutorial's placeholder "background" box for images without detections
        b, lab, s = b[keep], lab[keep], s[keep]
        if len(d) != s.numel():
            return False
        o1, o2 = d.scores.argsort(descending=True), s.argsort(descending=True)
        if not (
            torch.allclose(d.scores[o1], s[o2], atol=1e-6) and torch.allclose(d.boxes[o1], b[o2], atol=1e-5)
        ):
            return False
    return True


def measure(batch: int, priors: torch.Tensor, spec: DecodeSpec, rep: int, base_rep: int) -> list[dict]:
    """Check that the three implementations agree on one batch, then time them."""
    locs, scores = make_outputs(batch, priors, seed=batch)
    probs = F.softmax(scores, 2)[..., 1:]
    frac = float((probs > MIN_SCORE).any(-1).float().mean())
    n_cand = int((probs > MIN_SCORE).sum()) / batch
    ours = postprocess(locs, scores, priors, spec)
    n_det = sum(len(d) for d in ours) / batch
    if not same_detections(ours, list(zip(*detect_objects(locs, scores, priors), strict=True))):
        raise SystemExit(f"batch {batch}: maskssd and the tutorial's loop disagree")
    if not same_detections(ours, torchvision_loop(locs, scores, priors)):
        raise SystemExit(f"batch {batch}: maskssd and the torchvision loop disagree")
    base = f"tutorial Python-loop NMS, batch {batch}"
    tv = f"per-class torchvision nms loop, batch {batch}"
    ours_s = median_time(lambda: postprocess(locs, scores, priors, spec), rep)
    thresh = torch.tensor(spec.min_score)
    return [
        {
            "name": base,
            "seconds": median_time(lambda: detect_objects(locs, scores, priors), base_rep),
            "note": f"{100 * frac:.1f}% of priors > min_score, {n_cand:.0f} candidates, {n_det:.0f} detections per image",
        },
        {
            "name": tv,
            "baseline": base,
            "seconds": median_time(lambda: torchvision_loop(locs, scores, priors), rep),
        },
        {
            "name": f"maskssd postprocess, batch {batch}",
            "baseline": base,
            "seconds": ours_s,
            "note": "compiled kernel: logit pre-filter, softmax + decode of candidates, greedy NMS",
        },
        {
            "name": f"maskssd tensor path (the GPU code, on CPU), batch {batch}",
            "baseline": base,
            "seconds": median_time(lambda: postprocess_tensors(locs, scores, priors, spec, thresh), rep),
            "note": "batched ops, torchvision nms per (image, class) slice",
        },
        {
            "name": f"maskssd postprocess, batch {batch} (vs torchvision loop)",
            "baseline": tv,
            "seconds": ours_s,
            "note": "(the same timing, against the torchvision loop)",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--baseline-repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a few repeats only")
    add_threads_arg(parser)
    add_record_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads, args.default_allocator)
    rep, base_rep = (5, 3) if args.quick else (args.repeat, args.baseline_repeat)

    priors = PriorSpec.ssd300().priors()
    spec = DecodeSpec(MIN_SCORE, MAX_OVERLAP, TOP_K)
    rows = [row for batch in (1, 8) for row in measure(batch, priors, spec, rep, base_rep)]
    print_table(
        f"Decode + NMS + top-k: 8732 priors, {N_CLASSES} classes, min_score {MIN_SCORE}, "
        f"max_overlap {MAX_OVERLAP}, top_k {TOP_K} ({machine()}; {rep} runs, baseline {base_rep})",
        rows,
    )

    save_record(args.record, "decode_nms")


if __name__ == "__main__":
    main()
