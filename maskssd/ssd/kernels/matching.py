"""Sparse exact SSD matching of objects to priors (the tutorial's rule, ties included)."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from maskssd.ssd.kernels._common import _F32, _SLACK
from maskssd.ssd.kernels._lock import wait_for_background_compile


class PriorMatcher:
    """Sparse, exact SSD matching of objects to one fixed set of priors (see :meth:`__call__`).

    Priors are grouped by their distinct x-interval (332 for SSD300's 8732), sorted by y within a group. An
    object's IoU with any prior of a group is at most ``x-overlap / max(object width, group width)``; in a
    group, IoU >= ``level`` needs a y-overlap of at least ``level * (object area + smallest prior area) /
    ((1 + level) * x-overlap)``, a window of rows. Each object visits the groups and rows that can reach
    ``level`` (the threshold first); if its best IoU found stays below, it searches again at a lower level.
    """

    def __init__(self, priors_xyxy: torch.Tensor):
        pxy = priors_xyxy.detach().to("cpu", torch.float32).contiguous()
        # the prior areas exactly as PriorIoU / box_iou compute them (same float32 operations)
        self.area = ((pxy[:, 2] - pxy[:, 0]) * (pxy[:, 3] - pxy[:, 1])).numpy()
        ux, inv_x = torch.unique(pxy[:, [0, 2]], dim=0, return_inverse=True)
        self.ux = ux.contiguous().numpy()
        self.py1, self.py2 = pxy[:, 1].contiguous().numpy(), pxy[:, 3].contiguous().numpy()
        # priors group by group, by y1 within a group; per group the tallest prior, the smallest area and the
        # mean row spacing, which guesses where a y-window starts
        y1 = self.py1.astype(np.float64)
        order = np.lexsort((np.arange(len(y1)), y1, inv_x.numpy()))
        self.group_priors = order.astype(np.int64)
        self.group_y1 = y1[order]
        sizes = np.bincount(inv_x.numpy(), minlength=len(ux))
        self.group_ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        height = (self.py2 - self.py1).astype(np.float64)
        self.group_max_h = np.zeros(len(ux))
        np.maximum.at(self.group_max_h, inv_x.numpy(), height)
        self.group_min_area = np.full(len(ux), np.inf)
        np.minimum.at(self.group_min_area, inv_x.numpy(), self.area.astype(np.float64))
        first, last = self.group_y1[self.group_ptr[:-1]], self.group_y1[np.maximum(self.group_ptr[1:] - 1, 0)]
        span = last - first
        self.group_inv_step = np.where(span > 0, (sizes - 1) / np.where(span > 0, span, 1.0), 0.0)

    def __call__(
        self, boxes: torch.Tensor, counts: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``boxes (K, 4)`` normalised xyxy of all images, ``counts (N,)`` objects per image -> the positive
        priors as ``(img, prior, obj)``, ordered by image then prior; ``obj`` indexes ``boxes``.

        A prior is positive when its best IoU over its image's objects reaches ``threshold`` (the first object
        wins ties) or when it is some object's best prior (the first prior wins ties; the later object wins a
        prior two objects share): the reference paper's matching, bit for bit.
        """
        wait_for_background_compile()
        b = boxes.detach().to("cpu", torch.float32).contiguous().numpy()
        c = counts.detach().to("cpu", torch.int64).contiguous().numpy()
        img, prior, obj = _match(
            b,
            c,
            _F32(threshold),
            self.ux,
            self.py1,
            self.py2,
            self.area,
            self.group_ptr,
            self.group_priors,
            self.group_y1,
            self.group_max_h,
            self.group_min_area,
            self.group_inv_step,
        )
        return torch.from_numpy(img), torch.from_numpy(prior), torch.from_numpy(obj)


@njit(cache=True, nogil=True, error_model="numpy")
def _match(
    boxes,
    counts,
    thr,
    ux,
    py1,
    py2,
    area,
    group_ptr,
    group_priors,
    group_y1,
    group_max_h,
    group_min_area,
    group_inv_step,
):  # pragma: no cover - compiled
    """Positives of every image as (img, prior, obj), by image then prior."""
    n_img = counts.shape[0]
    n_priors = area.shape[0]
    starts = np.cumsum(counts) - counts
    best = np.zeros(n_priors, np.float32)  # scratch, reset entry by entry after each image
    best_obj = np.zeros(n_priors, np.int64)
    forced = np.full(n_priors, -1, np.int64)
    marked = np.zeros(n_priors, np.bool_)
    cand, ix, ub = np.empty(ux.shape[0], np.int64), np.empty(ux.shape[0], np.float32), np.empty(ux.shape[0])
    band = np.empty(ux.shape[0], np.int64)
    one_prior, one_obj = np.empty(n_priors, np.int64), np.empty(n_priors, np.int64)
    # the output grows as needed (~10 positives per object): a dense (images x priors) buffer would be MBs of
    # fresh pages per call
    cap = 16 * counts.sum() + 64
    img, prior, obj = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    total = 0
    for i in range(n_img):
        n = _match_image(
            boxes,
            starts[i],
            counts[i],
            thr,
            ux,
            py1,
            py2,
            area,
            group_ptr,
            group_priors,
            group_y1,
            group_max_h,
            group_min_area,
            group_inv_step,
            best,
            best_obj,
            forced,
            marked,
            cand,
            ix,
            ub,
            band,
            one_prior,
            one_obj,
        )
        if total + n > cap:
            cap = 2 * (total + n)
            img, prior, obj = _grown(img, total, cap), _grown(prior, total, cap), _grown(obj, total, cap)
        img[total : total + n] = i
        prior[total : total + n] = one_prior[:n]
        obj[total : total + n] = one_obj[:n]
        total += n
    return img[:total].copy(), prior[:total].copy(), obj[:total].copy()


@njit(cache=True, nogil=True, error_model="numpy")
def _grown(a, n, cap):  # pragma: no cover - compiled
    """A copy of ``a[:n]`` with room for ``cap`` entries."""
    out = np.empty(cap, a.dtype)
    out[:n] = a[:n]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _lower_bound(a, lo, hi, inv_step, x):
    """The first index in ``[lo, hi)`` with ``a[j] >= x`` (``a`` sorted there): guessed from the mean spacing
    (``1 / inv_step``) of a near-regular grid, then corrected by a few steps (a binary search mispredicts)."""
    if hi <= lo:
        return lo
    t = math.ceil((x - a[lo]) * inv_step)
    t = t if t > 0.0 else 0.0  # (NaN too)
    j = lo + int(t if t < hi - lo else hi - lo)
    while j > lo and a[j - 1] >= x:
        j -= 1
    while j < hi and a[j] < x:
        j += 1
    return j


@njit(cache=True, nogil=True, error_model="numpy")
def _match_image(
    boxes,
    start,
    count,
    thr,
    ux,
    py1,
    py2,
    area,
    group_ptr,
    group_priors,
    group_y1,
    group_max_h,
    group_min_area,
    group_inv_step,
    best,
    best_obj,
    forced,
    marked,
    cand,
    ix,
    ub,
    band,
    out_prior,
    out_obj,
):  # pragma: no cover - compiled
    """One image: writes its positive priors (sorted) and their objects to ``out_*``; returns how many.
    Data-dependent branches are written as selects and compactions: on random boxes they mispredict."""
    zero, tiny = _F32(0.0), _F32(1e-12)
    n_touched = 0
    for g in range(start, start + count):
        x1, y1, x2, y2 = boxes[g, 0], boxes[g, 1], boxes[g, 2], boxes[g, 3]
        a_obj = (x2 - x1) * (y2 - y1)
        w_obj = float(x2 - x1)
        # the groups that overlap the object in x (groups are sorted by x1: only those starting before x2)
        n_cand = 0
        for u in range(np.searchsorted(ux[:, 0], x2)):  # branch-free compaction
            ixu = min(x2, ux[u, 1]) - max(x1, ux[u, 0])
            cand[n_cand], ix[n_cand] = u, ixu
            ub[n_cand] = ixu / max(w_obj, float(ux[u, 1] - ux[u, 0])) + _SLACK
            n_cand += ixu > zero
        best_v, best_p = zero, 0  # the object's best prior; all-zero overlaps give prior 0, as argmax does
        level = float(thr)
        while True:
            # visit every group whose bound reaches `level`, and in it the window of rows whose IoU can
            n_band = 0
            for q in range(n_cand):  # branch-free compaction
                band[n_band] = q
                n_band += ub[q] >= level
            for qq in range(n_band):
                q = band[qq]
                u, ixu = cand[q], ix[q]
                g0, g1 = group_ptr[u], group_ptr[u + 1]
                need = (
                    level * (float(a_obj) + group_min_area[u]) / ((1.0 + level) * float(ixu)) * (1.0 - 1e-5)
                )
                lo = _lower_bound(group_y1, g0, g1, group_inv_step[u], y1 + need - group_max_h[u] - _SLACK)
                for j in range(lo, _lower_bound(group_y1, lo, g1, group_inv_step[u], y2 - need + _SLACK)):
                    p = group_priors[j]
                    iyp = max(min(y2, py2[p]) - max(y1, py1[p]), zero)
                    inter = ixu * iyp
                    iou = inter / max((a_obj + area[p]) - inter, tiny)  # box_iou's operations, in its order
                    better = (iou > best_v) | ((iou == best_v) & (p < best_p))  # branch-free
                    best_v = iou if better else best_v
                    best_p = p if better else best_p
                    if iou >= thr and iou > best[p]:  # strict: the first object keeps a tie
                        best[p], best_obj[p] = iou, g
                        if not marked[p]:
                            marked[p] = True
                            out_prior[n_touched] = p
                            n_touched += 1
            # every row not visited has IoU < level: done once the best found reaches it. Otherwise search
            # again, lower (rows seen twice change nothing)
            if best_v >= level or level <= 0.0:
                break
            level = max(float(best_v), level * 0.25) if level > 1e-4 else 0.0
        forced[best_p] = g  # a later object takes over a shared best prior
        if not marked[best_p]:
            marked[best_p] = True
            out_prior[n_touched] = best_p
            n_touched += 1
    out_prior[:n_touched].sort()
    for j in range(n_touched):
        p = out_prior[j]
        out_obj[j] = forced[p] if forced[p] >= 0 else best_obj[p]
        best[p], forced[p], marked[p] = zero, -1, False
    return n_touched
