"""Compiled CPU kernels (numba) for the SSD loops that tensor code cannot make sparse.

On a CPU the batched tensor versions in :mod:`maskssd.loss` and :mod:`maskssd.postprocess` are memory-bound:
they compute the IoU of every object with every prior, the loss of every negative and the softmax of every
prior, although only a few percent of those matter. These kernels visit only what can matter, with bounds
that keep the result exact:

- :class:`PriorMatcher` matches objects to priors (the tutorial's rule, ties included), visiting per object
  only the priors whose IoU can reach the threshold or the object's best overlap;
- :func:`hard_negatives` picks each image's hardest negatives from cheap bounds on their loss, computing the
  exact loss only for the candidates those bounds cannot rule out;
- :func:`detect` decodes, filters, runs greedy NMS and keeps the top-k of each image in one pass.

The torch versions stay for other devices and as the tests' cross-check. Kernels compile on first use and
are cached next to this file (numba's cache; ``NUMBA_CACHE_DIR`` moves it). They release the GIL and divide
as IEEE floats do (0/0 is NaN, as in torch). They run on one thread: numba's parallel loops (a second OpenMP
runtime whose idle workers spin) starved PyTorch's threads, and Python worker threads took ~2 ms to wake on
these VMs, more than the work they would share.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from numba import njit

#: ``MASKSSD_CPU_KERNELS=0`` makes the CPU run the tensor code instead (diagnostics; same results).
ENABLED = os.environ.get("MASKSSD_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_F32 = np.float32
_SLACK = 1e-6  # bounds are widened by this much: float rounding can never make a bound exclude a winner
_HUGE = 1e30  # stands for NaN and infinite ranking keys, so that selection arithmetic stays finite


# ------------------------------------------------------------------------------------------ matching
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

    def __call__(self, boxes: torch.Tensor, counts: torch.Tensor, threshold: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``boxes (K, 4)`` normalised xyxy of all images, ``counts (N,)`` objects per image -> the positive
        priors as ``(img, prior, obj)``, ordered by image then prior; ``obj`` indexes ``boxes``.

        A prior is positive when its best IoU over its image's objects reaches ``threshold`` (the first object
        wins ties) or when it is some object's best prior (the first prior wins ties; the later object wins a
        prior two objects share): the reference paper's matching, bit for bit.
        """
        b = boxes.detach().to("cpu", torch.float32).contiguous().numpy()
        c = counts.detach().to("cpu", torch.int64).contiguous().numpy()
        img, prior, obj = _match(b, c, _F32(threshold), self.ux, self.py1, self.py2, self.area, self.group_ptr,
                                 self.group_priors, self.group_y1, self.group_max_h, self.group_min_area,
                                 self.group_inv_step)
        return torch.from_numpy(img), torch.from_numpy(prior), torch.from_numpy(obj)


@njit(cache=True, nogil=True, error_model="numpy")
def _match(boxes, counts, thr, ux, py1, py2, area, group_ptr, group_priors, group_y1, group_max_h, group_min_area,
           group_inv_step):  # pragma: no cover - compiled
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
        n = _match_image(boxes, starts[i], counts[i], thr, ux, py1, py2, area, group_ptr, group_priors, group_y1,
                         group_max_h, group_min_area, group_inv_step, best, best_obj, forced, marked, cand, ix, ub,
                         band, one_prior, one_obj)
        if total + n > cap:
            cap = 2 * (total + n)
            img, prior, obj = _grown(img, total, cap), _grown(prior, total, cap), _grown(obj, total, cap)
        img[total:total + n] = i
        prior[total:total + n] = one_prior[:n]
        obj[total:total + n] = one_obj[:n]
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
def _match_image(boxes, start, count, thr, ux, py1, py2, area, group_ptr, group_priors, group_y1, group_max_h,
                 group_min_area, group_inv_step, best, best_obj, forced, marked, cand, ix, ub, band, out_prior, out_obj
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
                need = level * (float(a_obj) + group_min_area[u]) / ((1.0 + level) * float(ixu)) * (1.0 - 1e-5)
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


# ------------------------------------------------------------------------------- hard negative mining
_GAP_RES, _GAP_CELLS = 8.0, 96  # the gap tables' grid: steps of 1/8 up to gap 12
_TABLES: dict[int, tuple[np.ndarray, np.ndarray | None, float]] = {}
_HIST_BINS = 256


def _gap_tables(n_terms: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """``log(sum_j exp(x_j - max x))`` over ``n_terms`` terms as a function of ``g1``, ``g2``, the gaps of the
    second and third largest terms to the largest: at least ``f = log(1 + e^-g1 + e^-g2)``, at most
    ``u = log(1 + e^-g1 + (n_terms - 2) e^-g2)`` (equal for 3 terms: ``u`` is None). Both tabulated on a grid of step
    ``h = 1/8``; bilinear interpolation is within ``h^2 / 16`` of them (each second derivative is at most 1/4),
    so the kernel bounds the key to a band ~0.002 wide without any ``exp``. Returns ``f``, ``u`` and the
    margin to take off ``f`` (interpolation error, gaps past the grid, rounding)."""
    if n_terms not in _TABLES:
        g = np.arange(_GAP_CELLS + 1) / _GAP_RES
        g1, g2 = np.meshgrid(g, g, indexing="ij")
        if n_terms == 1:
            f = np.zeros_like(g1)
        elif n_terms == 2:
            f = np.log1p(np.exp(-g1))
        else:
            f = np.log1p(np.exp(-g1) + np.exp(-g2))
        # u equals f up to 3 terms: None then (the kernel compiles the second interpolation away)
        u = None if n_terms <= 3 else np.ascontiguousarray(np.log1p(np.exp(-g1) + (n_terms - 2) * np.exp(-g2)))
        margin = 1.0 / (16 * _GAP_RES**2) + (n_terms - 1) * math.exp(-_GAP_CELLS / _GAP_RES) + _SLACK
        _TABLES[n_terms] = (np.ascontiguousarray(f), u, margin)
    return _TABLES[n_terms]


def hard_negatives(scores: torch.Tensor, pos_img: torch.Tensor, pos_prior: torch.Tensor, n_hard: torch.Tensor,
                   beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's ``n_hard[i]`` negatives (non-positive priors) of largest background loss, as ``(img, prior)``.

    The loss must be an increasing function of ``a * logsumexp(s) - beta . s`` with ``a = sum(beta) >= 0``:
    weighted, label-smoothed cross-entropy towards class 0, or (``beta`` = one-hot of class 0) any increasing
    function of ``-log p_0`` such as the focal loss. ``scores (N, P, C)``; positives ``(img, prior)`` sorted
    by image. Ties between equal losses go to the lower prior; NaN and infinite losses rank first, as in
    ``torch.topk``.
    """
    s = scores.detach().to("cpu", torch.float32).contiguous().numpy()
    b = beta.detach().to("cpu", torch.float64).contiguous().numpy()
    plain = b[0] == 1.0 and not b[1:].any()
    f, u, margin = _gap_tables(s.shape[2] - 1 if plain else s.shape[2])
    img, prior = _hard_negatives(s, pos_img.numpy(), pos_prior.numpy(), n_hard.to(torch.int64).numpy(),
                                 None if plain else b, f, u, margin)
    return torch.from_numpy(img), torch.from_numpy(prior)


@njit(cache=True, nogil=True, error_model="numpy")
def _hard_negatives(scores, pos_img, pos_prior, n_hard, beta, f, u, margin):  # pragma: no cover - compiled
    """Hard negatives of every image as (img, prior), by image then prior."""
    n_img, n_priors, _ = scores.shape
    pos_start = np.searchsorted(pos_img, np.arange(n_img + 1))
    out_start = np.cumsum(n_hard) - n_hard
    out_prior = np.empty(n_hard.sum(), np.int64)
    n_out = np.zeros(n_img, np.int64)
    t1, base = np.empty(n_priors, np.float32), np.empty(n_priors)
    lo_key, hi_key, cand = np.empty(n_priors), np.empty(n_priors), np.empty(n_priors, np.int64)
    hist = np.empty(_HIST_BINS, np.int64)
    for i in range(n_img):
        pos = pos_prior[pos_start[i]:pos_start[i + 1]]
        k = min(n_hard[i], n_priors - pos.shape[0])
        n_out[i] = _hard_negatives_image(scores[i], pos, k, beta, f, u, margin, t1, base, lo_key, hi_key, cand,
                                         hist, out_prior[out_start[i]:out_start[i] + k])
    img, prior = np.empty(n_out.sum(), np.int64), np.empty(n_out.sum(), np.int64)
    j = 0
    for i in range(n_img):
        img[j:j + n_out[i]] = i
        prior[j:j + n_out[i]] = out_prior[out_start[i]:out_start[i] + n_out[i]]
        j += n_out[i]
    return img, prior


@njit(cache=True, nogil=True, error_model="numpy")
def _hard_negatives_image(scores, pos, k, beta, f, u, margin, t1, base, lo_key, hi_key, cand, hist, out
                          ):  # pragma: no cover - compiled
    """The ``k`` hardest negatives of one image ``scores (P, C)`` into ``out`` (prior order); returns how many.

    The ranking key is ``a * lse - beta . s`` (plain: ``lse(s_1..) - s_0``). Three filters, each a bound that
    no winner can fail: (1) ``base = a * max_c s_c - beta . s``, computed for every prior in vectorised column
    passes, is within ``a * log(n_terms)`` below the key; (2) for the priors that pass, the gaps of the two
    runners-up to the largest term bound the key to a narrow band (interpolated tables, :func:`_gap_tables`);
    (3) the exact key of what remains.
    Each filter's threshold is a floor under the k-th largest key taken from a histogram: selecting by
    comparisons mispredicts branches on every image.
    """
    if k <= 0:
        return 0
    n_priors, n_cls = scores.shape
    c0 = 1 if beta is None else 0
    a = 1.0 if beta is None else beta.sum()
    flat = scores.reshape(-1)
    bad = 0
    for j in range(flat.shape[0]):  # any NaN or infinite logit: the exact key of every negative
        x = flat[j]
        bad |= np.int32(not x - x == 0)
    # (1) column passes, vectorised: branch-free selects, no row-length inner loop
    for p in range(n_priors):
        t1[p] = scores[p, c0]
    for c in range(c0 + 1, n_cls):
        for p in range(n_priors):
            x, m = scores[p, c], t1[p]
            t1[p] = x if x > m else m
    if beta is None:  # (numba compiles one version per case; a run-time flag made the loops 2x slower)
        for p in range(n_priors):
            base[p] = float(t1[p]) - float(scores[p, 0])
    else:
        for p in range(n_priors):
            base[p] = a * float(t1[p])
        for c in range(n_cls):
            for p in range(n_priors):
                base[p] -= beta[c] * float(scores[p, c])
    for p in pos:
        base[p] = -np.inf
    if bad or k >= n_priors - pos.shape[0]:
        return _top_exact(scores, pos, k, beta, a, lo_key, cand, out)
    floor = _sampled_floor(base, k, hist)  # <= the k-th largest base, so <= the k-th largest key
    thr = floor - a * math.log(n_cls - c0) - _SLACK
    n = 0
    for p in range(n_priors):  # branch-free compaction
        cand[n] = p
        n += base[p] >= thr
    # (2) the two-gap band of each candidate
    minus_inf = _F32(-np.inf)
    for j in range(n):
        s = scores[cand[j]]
        x1, x2, x3 = s[c0], minus_inf, minus_inf
        for c in range(c0 + 1, n_cls):  # the three largest, branch-free
            x = s[c]
            x3 = max(x3, min(x2, x))
            x2 = max(x2, min(x1, x))
            x1 = max(x1, x)
        fi, ui = _lse_band(f, u, x1, x2, x3)
        lo_key[j] = base[cand[j]] + a * (fi - margin)
        hi_key[j] = base[cand[j]] + a * (ui + margin)
    floor = _hist_floor(lo_key[:n], k, hist)
    w = 0
    for j in range(n):
        cand[w] = cand[j]
        w += hi_key[j] >= floor
    # (3) exact keys of the few left
    for j in range(w):
        lo_key[j] = _exact_key(scores[cand[j]], beta, a)
    _take_top(lo_key[:w], cand[:w], k, out)
    return k


@njit(cache=True, nogil=True, error_model="numpy")
def _lse_band(f, u, x1, x2, x3):  # pragma: no cover - compiled
    """``log(sum_j exp(x_j - x1))`` of terms whose three largest are ``x1 >= x2 >= x3`` lies within
    ``[fi - margin, ui + margin]`` (:func:`_gap_tables`): the tables interpolated at the two gaps."""
    top = float(_GAP_CELLS)
    g1 = (float(x1) - float(x2)) * _GAP_RES
    g2 = (float(x1) - float(x3)) * _GAP_RES
    g1, g2 = g1 if g1 < top else top, g2 if g2 < top else top
    i1, i2 = min(int(g1), _GAP_CELLS - 1), min(int(g2), _GAP_CELLS - 1)
    d1, d2 = g1 - i1, g2 - i2  # bilinear interpolation in the cell
    w00, w01, w10, w11 = (1 - d1) * (1 - d2), (1 - d1) * d2, d1 * (1 - d2), d1 * d2
    fi = w00 * f[i1, i2] + w01 * f[i1, i2 + 1] + w10 * f[i1 + 1, i2] + w11 * f[i1 + 1, i2 + 1]
    if u is None:  # up to 3 terms the bounds are one function (compiled away)
        return fi, fi
    return fi, w00 * u[i1, i2] + w01 * u[i1, i2 + 1] + w10 * u[i1 + 1, i2] + w11 * u[i1 + 1, i2 + 1]


@njit(cache=True, nogil=True, error_model="numpy")
def _exact_key(s, beta, a):  # pragma: no cover - compiled
    """The ranking key of one prior's logits ``s (C,)``, in float64; NaN and infinities rank first."""
    c0 = 1 if beta is None else 0
    mx = float(s[c0])
    for c in range(c0 + 1, s.shape[0]):
        mx = max(mx, float(s[c]))
    total = 0.0
    for c in range(c0, s.shape[0]):
        total += math.exp(float(s[c]) - mx)
    if beta is None:
        key = mx + math.log(total) - float(s[0])
    else:
        key = a * (mx + math.log(total))
        for c in range(s.shape[0]):
            key -= beta[c] * s[c]
    return key if abs(key) < _HUGE else _HUGE


@njit(cache=True, nogil=True, error_model="numpy")
def _top_exact(scores, pos, k, beta, a, keys, idx, out):  # pragma: no cover - compiled
    """The slow, safe path: the exact key of every negative (NaN and infinite logits too), top ``k``."""
    is_pos = np.zeros(scores.shape[0], np.bool_)
    is_pos[pos] = True
    n = 0
    for p in range(scores.shape[0]):
        if not is_pos[p]:
            keys[n], idx[n] = _exact_key(scores[p], beta, a), p
            n += 1
    _take_top(keys[:n], idx[:n], k, out)
    return min(k, n)


@njit(cache=True, nogil=True, error_model="numpy")
def _sampled_floor(values, k, hist):  # pragma: no cover - compiled
    """A value <= the k-th largest of ``values``: a histogram floor of a strided sample's matching order
    statistic, accepted once at least ``k`` values reach it (else the sample's order is doubled)."""
    n = values.shape[0]
    sample = values[::max(1, n // 1024)]
    rank = int(k * sample.shape[0] / n * 1.15) + 3
    while rank < sample.shape[0]:
        floor = _hist_floor(sample, rank, hist)
        count = 0
        for j in range(n):
            count += values[j] >= floor
        if count >= k:
            return floor
        rank *= 2
    return -np.inf


@njit(cache=True, nogil=True, error_model="numpy")
def _hist_floor(values, k, hist):  # pragma: no cover - compiled
    """A value <= the k-th largest of ``values`` (finite or -inf, ``k <= len(values)``): the lower edge of the
    bin below the histogram bin that holds it (one bin of margin absorbs the binning's rounding)."""
    lo, hi = np.inf, -np.inf
    for j in range(values.shape[0]):
        v = values[j]
        hi = v if v > hi else hi
        lo = v if v < lo and v > -np.inf else lo
    if not hi > lo:
        return lo if lo < np.inf else -np.inf
    n_bins = hist.shape[0]
    hist[:] = 0
    scale = (n_bins - 1) / (hi - lo)
    top = n_bins - 1.0
    for j in range(values.shape[0]):  # branch-free binning (-inf goes to bin 0)
        x = (values[j] - lo) * scale
        hist[int(min(x if x > 0.0 else 0.0, top))] += 1
    seen = 0
    for b in range(n_bins - 1, 0, -1):
        seen += hist[b]
        if seen >= k:
            return lo + (b - 1) / scale
    return -np.inf


@njit(cache=True, nogil=True, error_model="numpy")
def _take_top(keys, idx, k, out):  # pragma: no cover - compiled
    """``out[:k]`` = the ``idx`` of the ``k`` largest ``keys`` (ties: the first ones), in ``idx`` order."""
    n = keys.shape[0]
    if n <= k:
        out[:n] = idx
        return
    kth = np.partition(keys, n - k)[n - k]
    ties = k
    for j in range(n):
        if keys[j] > kth:
            ties -= 1
    w = 0
    for j in range(n):
        if keys[j] > kth or (keys[j] == kth and ties > 0):
            if keys[j] == kth:
                ties -= 1
            out[w] = idx[j]
            w += 1


# -------------------------------------------------------------------------------------------- detect
def detect(locs: torch.Tensor, scores: torch.Tensor, priors_cxcy: torch.Tensor, min_score: torch.Tensor,
           max_overlap: float, top_k: int, pre_nms_top_k: int | None, class_agnostic: bool,
           variances: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSD post-processing of a batch on CPU: see :func:`maskssd.postprocess.postprocess`, which calls it.

    ``locs (N,P,4)``, ``scores (N,P,C)`` logits, ``min_score (C-1,)``. Returns ``counts (N,)`` and, image
    after image and best first, normalised xyxy ``boxes``, ``labels`` (1..C-1) and ``scores``.
    """
    thresh = min_score.detach().to("cpu", torch.float32).contiguous().numpy()
    floor = float(thresh.min())
    # p_c > t needs logit_c - logit_0 > log t: a cheap test that skips the softmax and decoding of the ~95 %
    # of priors that are confident background; the margin only widens this superset, the softmax decides
    bound = math.log(floor) - 0.01 if floor > 0 else -math.inf
    counts, boxes, labels, probs = _detect(
        locs.detach().to("cpu", torch.float32).contiguous().numpy(),
        scores.detach().to("cpu", torch.float32).contiguous().numpy(),
        priors_cxcy.detach().to("cpu", torch.float32).contiguous().numpy(),
        thresh, _F32(bound), _F32(max_overlap), int(top_k), -1 if pre_nms_top_k is None else int(pre_nms_top_k),
        bool(class_agnostic), _F32(variances[0]), _F32(variances[1]))
    return (torch.from_numpy(counts), torch.from_numpy(boxes), torch.from_numpy(labels), torch.from_numpy(probs))


@njit(cache=True, nogil=True, error_model="numpy")
def _detect(locs, scores, priors, thresh, bound, max_overlap, top_k, pre_top_k, agnostic, v0, v1
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
    x1, y1, x2, y2 = np.empty(m, np.float32), np.empty(m, np.float32), np.empty(m, np.float32), np.empty(m, np.float32)
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
