"""Bootstrap confidence intervals for VOC AP, and the paired bootstrap that compares two runs on the same images.

The standard detection bootstrap resamples *images* with replacement and re-scores the same detections (no
re-inference). Scoring is vectorised over resamples: matching is per image, so a detection's TP/FP status does
not depend on which other images a resample holds. Per class, the detections are sorted by score and marked
once (:func:`mark_detections`); a resample is then a vector ``w`` of per-image multiplicities (multinomial
counts), and the cumulative TP and FP counts at each true positive are ``cumsum(w[image] * tp)`` and a
sparse product of ``w`` with the false positives that precede it. The 11-point VOC07 AP (the paper's metric)
and the all-point AP only need the precision/recall points at true positives (a false positive lowers
precision without moving recall), so every resample of a class is a ``(resamples, true positives)`` array.

Exactness: on any resample the APs equal :func:`maskssd.evaluation.voc.average_precision` run on the
resampled list of images taken in image order (every copy of an image next to the others), to rounding
(the tests: identical on the identity resample, within 1e-12 on random ones). Where, within one image and class, detections of exactly equal score mix true and
false positives, the order of the copies matters to the curve: those (rare) classes are re-scored exactly,
one resample at a time, on the resamples that draw such an image twice or more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from maskssd.evaluation.voc import Matched, ap_from_curve

__all__ = [
    "BootstrapResult",
    "ClassTable",
    "Interval",
    "Marked",
    "PairedResult",
    "bootstrap",
    "intervals_from_dict",
    "mark",
    "paired_bootstrap",
    "resample_weights",
    "resampled_ap",
]

_THRESHOLDS = torch.arange(11, dtype=torch.float64) / 10


@dataclass
class ClassTable:
    """One class's detections, sorted by score and marked once (ignored ones dropped)."""

    tp_image: Tensor  # (K,) image of each true positive, in score order
    fp_before: Tensor  # sparse (K + 1, n_images): false positives of each image before true positive k
    gt_count: Tensor  # (n_images,) float64 non-difficult objects per image
    image: Tensor  # (D,) image of every counted detection, in score order (the exact path)
    tp: Tensor  # (D,) bool
    run: Tensor  # (D,) run id: consecutive detections of one image with equal scores
    mixed_images: Tensor  # images with a run of equal scores mixing TP and FP (empty: none)


@dataclass
class Marked:
    """Every class's marked detections on one list of images: what a resample re-scores."""

    class_names: tuple[str, ...]
    n_images: int
    tables: dict[str, ClassTable]
    image_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile interval."""

    estimate: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.estimate, self.low, self.high]


@dataclass
class BootstrapResult:
    """Percentile intervals of mAP and each class's AP (VOC07, the paper's, and all-point)."""

    n: int
    ci: float
    seed: int
    map: Interval
    ap: dict[str, Interval]
    map_voc12: Interval
    ap_voc12: dict[str, Interval] = field(default_factory=dict)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}_map_ci_low/_high`` and ``{prefix}_ap_<class>_ci_low/_high`` (VOC07), nan ones left out."""
        out = {f"{prefix}_map_ci_low": self.map.low, f"{prefix}_map_ci_high": self.map.high}
        for name, iv in self.ap.items():
            out[f"{prefix}_ap_{name}_ci_low"] = iv.low
            out[f"{prefix}_ap_{name}_ci_high"] = iv.high
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "ci": self.ci,
            "seed": self.seed,
            "method": "percentile, images resampled with replacement",
            "map": self.map.as_list(),
            "ap": {k: v.as_list() for k, v in self.ap.items()},
            "map_voc12": self.map_voc12.as_list(),
            "ap_voc12": {k: v.as_list() for k, v in self.ap_voc12.items()},
        }


@dataclass
class PairedResult:
    """A − B per class and for mAP (VOC07): the difference, its interval, and how often A beats B."""

    n: int
    ci: float
    seed: int
    n_a: int
    n_b: int
    diff: dict[str, Interval]  # "map" first, then each class
    a_wins: dict[str, float]  # share of resamples with A > B
    ties: dict[str, float]  # share of resamples with A == B
    a: dict[str, float]  # point estimates (mean over A's runs)
    b: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "ci": self.ci,
            "seed": self.seed,
            "runs_a": self.n_a,
            "runs_b": self.n_b,
            "metrics": {
                k: {
                    "a": self.a[k],
                    "b": self.b[k],
                    "diff": iv.estimate,
                    "low": iv.low,
                    "high": iv.high,
                    "a_wins": self.a_wins[k],
                    "ties": self.ties[k],
                }
                for k, iv in self.diff.items()
            },
        }


# ------------------------------------------------------------------------------------------- marking
def _class_table(scores: Tensor, image: Tensor, tp: Tensor, gt_count: Tensor, n_images: int) -> ClassTable:
    """Tables of one class from its score-sorted, counted detections."""
    k = int(tp.sum())
    tp_image = image[tp]
    fp = ~tp
    gap = torch.cumsum(tp.long(), 0)[fp]  # true positives before each false positive
    fp_before = torch.sparse_coo_tensor(
        torch.stack([gap, image[fp]]),
        torch.ones(int(fp.sum()), dtype=torch.float64),
        (k + 1, n_images),
        check_invariants=True,
    ).coalesce()
    same = (scores[1:] == scores[:-1]) & (image[1:] == image[:-1])
    run = torch.cumsum(torch.cat([torch.ones(min(1, len(tp)), dtype=torch.long), (~same).long()]), 0)
    mixed = torch.zeros(0, dtype=torch.long)
    if same.any():
        n_runs = int(run[-1]) + 1
        tps = torch.zeros(n_runs, dtype=torch.long).index_add_(0, run, tp.long())
        size = torch.bincount(run, minlength=n_runs)
        bad = (tps > 0) & (tps < size)
        mixed = torch.unique(image[bad[run]])
    return ClassTable(tp_image, fp_before, gt_count, image, tp, run, mixed)


def mark(matched: Matched) -> Marked:
    """Every class's detections of a matched set as resampling tables (sorted and marked once, by the matching
    AP is computed from)."""
    n_images = len(matched.evalset)
    tables = {
        m.name: _class_table(m.scores, m.image, m.tp, m.gt_per_image.double(), n_images)
        for m in matched.classes
    }
    return Marked(matched.class_names, n_images, tables, tuple(matched.evalset.image_ids))


# ------------------------------------------------------------------------------------------ resampling
def resample_weights(n_images: int, n: int, seed: int = 0) -> Tensor:
    """``(n, n_images)`` float64 multiplicities: each row draws ``n_images`` images with replacement."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n_images, (n, n_images), generator=g)
    w = torch.zeros((n, n_images), dtype=torch.float64)
    return w.scatter_add_(1, idx, torch.ones_like(w)) if n_images else w


def _ap_vectorised(t: ClassTable, w: Tensor) -> tuple[Tensor, Tensor]:
    """VOC07 and all-point AP of one class for every row of ``w`` (nan where the row holds no object)."""
    r = w.shape[0]
    n_gt = w @ t.gt_count
    k = t.tp_image.shape[0]
    ap07 = torch.zeros(r, dtype=torch.float64)
    ap12 = torch.zeros(r, dtype=torch.float64)
    if k:
        cum_tp = torch.cumsum(w[:, t.tp_image], 1)
        fp_gap = torch.sparse.mm(t.fp_before, w.T).T[:, :k]  # (r, k): FPs between TP k-1 and TP k
        cum_fp = torch.cumsum(fp_gap, 1)
        precision = cum_tp / (cum_tp + cum_fp + 1e-10)
        recall = cum_tp / n_gt[:, None]
        envelope = precision.flip(1).cummax(1).values.flip(1)
        first = torch.searchsorted(recall.contiguous(), _THRESHOLDS.expand(r, 11).contiguous(), side="left")
        values = torch.where(first < k, envelope.gather(1, first.clamp(max=k - 1)), 0.0)
        ap07 = values.sum(1) / 11
        step = torch.diff(recall, dim=1, prepend=torch.zeros(r, 1, dtype=torch.float64))
        ap12 = (step * envelope).sum(1)
    none = n_gt == 0
    return ap07.masked_fill(none, math.nan), ap12.masked_fill(none, math.nan)


def _ap_exact(t: ClassTable, w: Tensor) -> tuple[float, float]:
    """One resample, copies in the order the looped evaluator sees them (each tie run repeated as a block)."""
    n_gt = float(w @ t.gt_count)
    if n_gt == 0:
        return math.nan, math.nan
    counts = w[t.image].long()
    det = torch.repeat_interleave(torch.arange(t.image.shape[0]), counts)
    copy = torch.arange(det.shape[0]) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    d, m = t.image.shape[0], int(counts.max()) if counts.numel() else 0
    order = torch.argsort(t.run[det] * (m * d + d) + copy * d + det)
    tp = t.tp[det[order]].double()
    cum_tp, cum_fp = torch.cumsum(tp, 0), torch.cumsum(1.0 - tp, 0)
    precision, recall = cum_tp / (cum_tp + cum_fp + 1e-10), cum_tp / n_gt
    n = int(round(n_gt))
    return ap_from_curve(precision, recall, n, "voc07"), ap_from_curve(precision, recall, n, "voc12")


def resampled_ap(marked: Marked, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(ap07, ap12)``, each ``(resamples, classes)`` float64 (nan: no object of that class in the resample)."""
    weights = weights.to(torch.float64)
    if weights.ndim != 2 or weights.shape[1] != marked.n_images:
        raise ValueError(f"weights must be (resamples, {marked.n_images}), got {tuple(weights.shape)}")
    cols07, cols12 = [], []
    for name in marked.class_names:
        t = marked.tables[name]
        ap07, ap12 = _ap_vectorised(t, weights)
        if t.mixed_images.numel():
            for row in torch.nonzero((weights[:, t.mixed_images] >= 2).any(1)).squeeze(1).tolist():
                ap07[row], ap12[row] = _ap_exact(t, weights[row])
        cols07.append(ap07)
        cols12.append(ap12)
    return torch.stack(cols07, 1), torch.stack(cols12, 1)


# ------------------------------------------------------------------------------------------ intervals
def _nanmean(x: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` of the non-nan entries (nan where all are nan), like :func:`nanmean` per row."""
    ok = ~torch.isnan(x)
    total = torch.where(ok, x, 0.0).sum(dim)
    count = ok.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=1), math.nan)


def _interval(estimate: float, samples: Tensor, ci: float) -> Interval:
    finite = samples[~torch.isnan(samples)]
    if finite.numel() == 0:
        return Interval(estimate, math.nan, math.nan)
    alpha = (1.0 - ci) / 2
    q = torch.quantile(finite, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return Interval(estimate, float(q[0]), float(q[1]))


def _check(n: int, ci: float) -> None:
    if n < 1:
        raise ValueError(f"the number of resamples must be >= 1, got {n}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"the interval level must be in (0, 1), got {ci}")


def bootstrap(
    marked: Marked | Sequence[Marked], n: int = 1000, seed: int = 0, ci: float = 0.95
) -> BootstrapResult:
    """Percentile intervals of mAP and each class's AP from ``n`` image resamples (seeded).

    The estimates are the plain evaluation (every image once); the intervals hold ``ci`` of the resamples.
    Several runs on the same images (seeds) pool: every AP, on the plain set and on each resample, is the mean
    over the runs, as one side of :func:`paired_bootstrap` is.
    """
    _check(n, ci)
    runs = [marked] if isinstance(marked, Marked) else list(marked)
    _same_images(runs)
    first = runs[0]
    ones = torch.ones((1, first.n_images), dtype=torch.float64)
    weights = resample_weights(first.n_images, n, seed)
    names = first.class_names
    points, samples = [resampled_ap(m, ones) for m in runs], [resampled_ap(m, weights) for m in runs]

    def pooled(k: int) -> tuple[Interval, dict[str, Interval]]:
        point = torch.stack([p[k] for p in points]).mean(0)
        sample = torch.stack([s[k] for s in samples]).mean(0)
        per_class = {c: _interval(float(point[0, i]), sample[:, i], ci) for i, c in enumerate(names)}
        point_map = torch.stack([_nanmean(p[k], 1) for p in points]).mean(0)
        sample_map = torch.stack([_nanmean(s[k], 1) for s in samples]).mean(0)
        return _interval(float(point_map[0]), sample_map, ci), per_class

    map07, cls07 = pooled(0)
    map12, cls12 = pooled(1)
    return BootstrapResult(n, ci, seed, map07, cls07, map12, cls12)


def _same_images(runs: Sequence[Marked]) -> None:
    """Refuse runs that did not score the same images in the same order, with the same classes."""
    if not runs:
        raise ValueError("no runs to resample")
    first = runs[0]
    for m in runs[1:]:
        if m.n_images != first.n_images or (m.image_ids or None) != (first.image_ids or None):
            raise ValueError(
                "every run of a paired bootstrap must have scored the same images in the same order"
            )
        if m.class_names != first.class_names:
            raise ValueError(f"different classes: {m.class_names} vs {first.class_names}")


def _side_ap(side: Sequence[Marked], weights: Tensor) -> Tensor:
    """``(resamples, 1 + classes)``: mAP then each class's AP, averaged over the side's runs."""
    per_run = []
    for m in side:
        ap07, _ = resampled_ap(m, weights)
        per_run.append(torch.cat([_nanmean(ap07, 1)[:, None], ap07], 1))
    return torch.stack(per_run).mean(0)


def paired_bootstrap(
    a: Sequence[Marked], b: Sequence[Marked], n: int = 1000, seed: int = 0, ci: float = 0.95
) -> PairedResult:
    """A − B on the same images: each resample draws the images once and re-scores both sides on them.

    Each side is one run or several (seeds): a side's AP on a resample is the mean over its runs, so the
    interval pools images and seeds. Every run must have scored the same images in the same order, with the
    same classes.
    """
    _check(n, ci)
    if not a or not b:
        raise ValueError("paired_bootstrap needs at least one run on each side")
    _same_images([*a, *b])
    first = a[0]
    keys = ["map", *first.class_names]
    ones = torch.ones((1, first.n_images), dtype=torch.float64)
    point_a, point_b = _side_ap(a, ones)[0], _side_ap(b, ones)[0]
    weights = resample_weights(first.n_images, n, seed)
    diff = _side_ap(a, weights) - _side_ap(b, weights)
    out: dict[str, Interval] = {}
    wins: dict[str, float] = {}
    ties: dict[str, float] = {}
    for i, key in enumerate(keys):
        col = diff[:, i]
        finite = col[~torch.isnan(col)]
        out[key] = _interval(float(point_a[i] - point_b[i]), col, ci)
        wins[key] = float((finite > 0).double().mean()) if finite.numel() else math.nan
        ties[key] = float((finite == 0).double().mean()) if finite.numel() else math.nan
    as_dict = lambda t: {k: float(t[i]) for i, k in enumerate(keys)}  # noqa: E731
    return PairedResult(n, ci, seed, len(a), len(b), out, wins, ties, as_dict(point_a), as_dict(point_b))


def intervals_from_dict(d: Mapping[str, Any]) -> dict[str, Interval]:
    """``{"map": Interval, class: Interval}`` from :meth:`BootstrapResult.to_dict` (a saved file's ``bootstrap``)."""
    out = {"map": Interval(*d["map"])}
    out.update({k: Interval(*v) for k, v in d.get("ap", {}).items()})
    return out
