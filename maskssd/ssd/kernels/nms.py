"""Decode, score filter, greedy NMS and top-k of a batch in one compiled pass per image."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from maskssd.ssd.kernels._common import _F32
from maskssd.ssd.kernels._lock import wait_for_background_compile


def detect(
    locs: torch.Tensor,
    scores: torch.Tensor,
    priors_cxcy: torch.Tensor,
    min_score: torch.Tensor,
    max_overlap: float,
    top_k: int,
    pre_nms_top_k: int | None,
    class_agnostic: bool,
    variances: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSD post-processing of a batch on CPU: see :func:`maskssd.postprocess.postprocess`, which calls it.

    ``locs (N,P,4)``, ``scores (N,P,C)`` logits, ``min_score (C-1,)``. Returns ``counts (N,)`` and, image
    after image and best first, normalised xyxy ``boxes``, ``labels`` (1..C-1) and ``scores``.
    """
    wait_for_background_compile()
    thresh = min_score.detach().to("cpu", torch.float32).contiguous().numpy()
    floor = float(thresh.min())
    # p_c > t needs logit_c - logit_0 > log t: a cheap test that skips the softmax and decoding of the ~95 %
    # of priors that are confident background; the margin only widens this superset, the softmax decides
    bound = math.log(floor) - 0.01 if floor > 0 else -math.inf
    counts, boxes, labels, probs = _detect(
        locs.detach().to("cpu", torch.float32).contiguous().numpy(),
        scores.detach().to("cpu", torch.float32).contiguous().numpy(),
        priors_cxcy.detach().to("cpu", torch.float32).contiguous().numpy(),
        thresh,
        _F32(bound),
        _F32(max_overlap),
        int(top_k),
        -1 if pre_nms_top_k is None else int(pre_nms_top_k),
        bool(class_agnostic),
        _F32(variances[0]),
        _F32(variances[1]),
    )
    return (
        torch.from_numpy(counts),
        torch.from_numpy(boxes),
        torch.from_numpy(labels),
        torch.from_numpy(probs),
    )


@njit(cache=True, nogil=True, error_model="numpy")
def _detect(
    locs, scores, priors, thresh, bound, max_overlap, top_k, pre_top_k, agnostic, v0, v1
):  # pragma: no cover - compiled
    n_img, n_priors, n_cls = scores.shape
    cap = n_priors * (n_cls - 1)
    c_prior, c_cls, c_score = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.float32)
    e = np.empty(n_cls, np.float32)
    counts = np.zeros(n_img, np.int64)
    out_boxes = np.empty((n_img * top_k, 4), np.float32)
    out_labels = np.empty(n_img * top_k, np.int64)
    out_scores = np.empty(n_img * top_k, np.float32)
    n_out = 0
    for i in range(n_img):
        # 1. the (prior, class) candidates above min_score, in (prior, class) order
        n = 0
        for p in range(n_priors):
            s = scores[i, p]
            d = s[1]
            for c in range(2, n_cls):
                d = max(d, s[c])
            if not d - s[0] > bound:
                continue
            mx = max(s[0], d)  # (re-reading s in a loop here made this kernel 6x slower)
            total = _F32(0.0)
            for c in range(n_cls):
                e[c] = math.exp(s[c] - mx)
                total += e[c]
            for c in range(1, n_cls):
                prob = e[c] / total
                if prob > thresh[c - 1]:
                    c_prior[n], c_cls[n], c_score[n] = p, c, prob
                    n += 1
        # 2. best first (stable: ties keep (prior, class) order); optionally only the pre_top_k best
        order = np.argsort(-c_score[:n], kind="mergesort")
        if 0 <= pre_top_k < n:
            order = order[:pre_top_k]
        m = order.shape[0]
        box = np.empty((m, 4), np.float32)
        for j in range(m):
            p = c_prior[order[j]]
            off, pr = locs[i, p], priors[p]
            cx = off[0] * v0 * pr[2] + pr[0]  # priors.decode's operations, in its order
            cy = off[1] * v0 * pr[3] + pr[1]
            w = math.exp(off[2] * v1) * pr[2]
            h = math.exp(off[3] * v1) * pr[3]
            half_w, half_h = w / _F32(2.0), h / _F32(2.0)
            box[j, 0] = min(max(cx - half_w, _F32(0.0)), _F32(1.0))
            box[j, 1] = min(max(cy - half_h, _F32(0.0)), _F32(1.0))
            box[j, 2] = min(max(cx + half_w, _F32(0.0)), _F32(1.0))
            box[j, 3] = min(max(cy + half_h, _F32(0.0)), _F32(1.0))
        # 3. greedy NMS within each class (or the whole image), boxes visited best first
        group = np.zeros(m, np.int64) if agnostic else c_cls[order]
        by_group = np.argsort(group, kind="mergesort")  # stable: best first within each group
        keep = _greedy_nms(box, by_group, group, max_overlap)
        # 4. the top_k survivors, best first (ties: group order)
        kept = by_group[keep]
        kept = kept[np.argsort(-c_score[order[kept]], kind="mergesort")][:top_k]
        for j in range(kept.shape[0]):
            q = kept[j]
            out_boxes[n_out] = box[q]
            out_labels[n_out] = c_cls[order[q]]
            out_scores[n_out] = c_score[order[q]]
            n_out += 1
        counts[i] = kept.shape[0]
    return counts, out_boxes[:n_out].copy(), out_labels[:n_out].copy(), out_scores[:n_out].copy()


@njit(cache=True, nogil=True, error_model="numpy")
def _greedy_nms(box, visit, group, max_overlap):  # pragma: no cover - compiled
    """Greedy NMS over ``box`` visited in ``visit`` order (grouped, best first within a group): a box is
    suppressed by a kept box of its group with IoU > ``max_overlap`` (torchvision's ``nms`` rule). Returns
    the positions in ``visit`` that are kept."""
    m = visit.shape[0]
    x1, y1, x2, y2 = (
        np.empty(m, np.float32),
        np.empty(m, np.float32),
        np.empty(m, np.float32),
        np.empty(m, np.float32),
    )
    area = np.empty(m, np.float32)
    for j in range(m):  # coordinates in visiting order, contiguous
        b = box[visit[j]]
        x1[j], y1[j], x2[j], y2[j] = b[0], b[1], b[2], b[3]
        area[j] = (b[2] - b[0]) * (b[3] - b[1])
    suppressed = np.zeros(m, np.bool_)
    keep = np.empty(m, np.int64)
    n_keep, start = 0, 0
    while start < m:
        end = start
        while end < m and group[visit[end]] == group[visit[start]]:
            end += 1
        for a in range(start, end):
            if suppressed[a]:
                continue
            keep[n_keep] = a
            n_keep += 1
            ax1, ay1, ax2, ay2, a_area = x1[a], y1[a], x2[a], y2[a], area[a]
            for b in range(a + 1, end):
                w = max(min(ax2, x2[b]) - max(ax1, x1[b]), _F32(0.0))
                h = max(min(ay2, y2[b]) - max(ay1, y1[b]), _F32(0.0))
                inter = w * h
                # branch-free: suppressing an already suppressed box changes nothing
                suppressed[b] |= inter / (a_area + area[b] - inter) > max_overlap
        start = end
    return keep[:n_keep]
