"""Hard-negative mining from cheap bounds on each negative's loss; exact loss only where bounds cannot decide."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from maskssd.ssd.kernels._common import _F32, _HUGE, _SLACK
from maskssd.ssd.kernels._lock import wait_for_background_compile

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
        u = (
            None
            if n_terms <= 3
            else np.ascontiguousarray(np.log1p(np.exp(-g1) + (n_terms - 2) * np.exp(-g2)))
        )
        margin = 1.0 / (16 * _GAP_RES**2) + (n_terms - 1) * math.exp(-_GAP_CELLS / _GAP_RES) + _SLACK
        _TABLES[n_terms] = (np.ascontiguousarray(f), u, margin)
    return _TABLES[n_terms]


def hard_negatives(
    scores: torch.Tensor,
    pos_img: torch.Tensor,
    pos_prior: torch.Tensor,
    n_hard: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's ``n_hard[i]`` negatives (non-positive priors) of largest background loss, as ``(img, prior)``.

    The loss must be an increasing function of ``a * logsumexp(s) - beta . s`` with ``a = sum(beta) >= 0``:
    weighted, label-smoothed cross-entropy towards class 0, or (``beta`` = one-hot of class 0) any increasing
    function of ``-log p_0`` such as the focal loss. ``scores (N, P, C)``; positives ``(img, prior)`` sorted
    by image. Ties between equal losses go to the lower prior; NaN and infinite losses rank first, as in
    ``torch.topk``.
    """
    wait_for_background_compile()
    s = scores.detach().to("cpu", torch.float32).contiguous().numpy()
    b = beta.detach().to("cpu", torch.float64).contiguous().numpy()
    plain = b[0] == 1.0 and not b[1:].any()
    f, u, margin = _gap_tables(s.shape[2] - 1 if plain else s.shape[2])
    img, prior = _hard_negatives(
        s,
        pos_img.numpy(),
        pos_prior.numpy(),
        n_hard.to(torch.int64).numpy(),
        None if plain else b,
        f,
        u,
        margin,
    )
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
        pos = pos_prior[pos_start[i] : pos_start[i + 1]]
        k = min(n_hard[i], n_priors - pos.shape[0])
        n_out[i] = _hard_negatives_image(
            scores[i],
            pos,
            k,
            beta,
            f,
            u,
            margin,
            t1,
            base,
            lo_key,
            hi_key,
            cand,
            hist,
            out_prior[out_start[i] : out_start[i] + k],
        )
    img, prior = np.empty(n_out.sum(), np.int64), np.empty(n_out.sum(), np.int64)
    j = 0
    for i in range(n_img):
        img[j : j + n_out[i]] = i
        prior[j : j + n_out[i]] = out_prior[out_start[i] : out_start[i] + n_out[i]]
        j += n_out[i]
    return img, prior


@njit(cache=True, nogil=True, error_model="numpy")
def _hard_negatives_image(
    scores, pos, k, beta, f, u, margin, t1, base, lo_key, hi_key, cand, hist, out
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
    sample = values[:: max(1, n // 1024)]
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
