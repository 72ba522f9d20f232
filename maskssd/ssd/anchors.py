"""Default boxes fitted to a dataset's boxes, and how well a set of default boxes serves them.

The quality measure is the matcher's recall: the share of training boxes whose best prior has IoU >= 0.5 (the
MultiBox matcher's threshold). A box below it still gets its best prior (the matcher forces one), but only
that one, with a poor regression start.

Boxes are taken as the model sees them: squashed into the square input, ``(x / W, y / H)``. The fit:

* aspect ratios: 1-D k-means in ``log(w / h)`` with one centre fixed at 0 (the two square boxes every location
  has anyway), the ``K`` free centres becoming ``aspect_ratios``;
* scales: every level starts at a quantile of ``sqrt(w h)`` so that each gets a similar share of boxes
  (``(k + 0.5) / L``), raised to what its grid can serve (:data:`COVER_CELLS`), kept increasing and capped at
  ``max_scale`` (the top levels spread below the cap); then coordinate search on the recall itself (each scale
  times 0.7 ... 1.4, then 0.93 / 1.07, kept when the recall rises), which moves the scales to where the matcher
  gains: the equal-share start alone asks coarse maps for boxes their grid cannot serve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskssd.data import Annotation
from maskssd.errors import MaskSSDError
from maskssd.ssd.priors import PriorIoU, PriorSpec, cxcywh_to_xyxy

__all__ = [
    "AnchorFit",
    "ModelLayout",
    "PriorMatchStats",
    "evaluate_priors",
    "fit_anchors",
    "fit_aspect_ratios",
    "layout_of_model",
    "layout_from_size",
    "normalized_boxes",
    "prior_spec",
    "ssdlite_feature_maps",
]

#: The smallest scale a map of ``f`` cells is started at: ``COVER_CELLS / f``. A square prior of scale ``s``
#: meets IoU 0.5 with a box of its own size centred anywhere in its cell only from ``s ~ 2.7 / f`` (half a cell
#: off on both axes); at ``1.5 / f`` about half of the positions do, and the other boxes of a location help.
COVER_CELLS = 1.5


@dataclass(frozen=True)
class PriorMatchStats:
    """How a prior set serves boxes: overall and per level (the level of each box's best prior)."""

    recall: float  # share of boxes whose best prior has IoU >= threshold
    mean_best_iou: float
    level_share: tuple[float, ...]  # share of boxes whose best prior lies on each level
    level_recall: tuple[float, ...]  # recall among those boxes (nan where a level gets none)
    small_recall: float  # recall of the boxes under ``small_px`` (sqrt of area, input pixels); nan if none
    small_boxes: int
    small_px: float


@dataclass(frozen=True)
class AnchorFit:
    """Fitted default boxes for one model layout and what they (and the quantile start) achieve."""

    input_size: int
    feature_maps: tuple[int, ...]
    scales: tuple[float, ...]
    aspect_ratios: tuple[float, ...]
    stats: PriorMatchStats
    quantile_scales: tuple[float, ...]  # the start of the search: quantiles, grid floor, cap
    quantile_stats: PriorMatchStats
    num_boxes: int
    threshold: float = 0.5
    notes: list[str] = field(default_factory=list)

    def spec(self) -> PriorSpec:
        return prior_spec(self.feature_maps, self.scales, self.aspect_ratios)

    def toml(self) -> str:
        """``[model]`` lines for an experiment config."""
        return (
            f"scales = [{', '.join(repr(s) for s in self.scales)}]\n"
            f"aspect_ratios = [{', '.join(repr(r) for r in self.aspect_ratios)}]\n"
        )


# -------------------------------------------------------------------------------------------- inputs
def normalized_boxes(annotations: Iterable[Annotation]) -> np.ndarray:
    """Every box as ``(N, 4)`` xyxy in [0, 1] of its image: the box in the squashed square model input."""
    parts = [
        a.boxes / np.array([a.width, a.height, a.width, a.height], dtype=np.float32) for a in annotations
    ]
    boxes = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 4), np.float32)
    return boxes.clip(0.0, 1.0)


def ssdlite_feature_maps(input_size: int, levels: int, min_stride: int = 8) -> tuple[int, ...]:
    """Map sizes of an SSDLite layout: ``ceil(S / min_stride)``, then halved (rounding up) level by level, as
    stride-2 convolutions with "same" padding give them."""
    n, out = math.ceil(input_size / min_stride), []
    for _ in range(levels):
        out.append(n)
        n = math.ceil(n / 2)
    return tuple(out)


def prior_spec(
    feature_maps: Sequence[int], scales: Sequence[float], aspect_ratios: Sequence[float]
) -> PriorSpec:
    """An SSDLite prior spec: the same ratios on every map."""
    return PriorSpec(tuple(feature_maps), tuple(scales), tuple(tuple(aspect_ratios) for _ in feature_maps))


# ----------------------------------------------------------------------------------------- evaluation
def _level_priors(fmap: int, scale: float, extra: float, ratios: Sequence[float]) -> torch.Tensor:
    """One level's priors (xyxy), its extra square box of scale ``extra``."""
    return cxcywh_to_xyxy(PriorSpec((fmap,), (scale,), (tuple(ratios),), extra_scale_last=extra).priors())


def _best_iou(boxes: torch.Tensor, priors_xyxy: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Each box's best IoU over the priors, ``(N,)`` (chunked: ``(chunk, P)`` at a time)."""
    iou = PriorIoU(priors_xyxy)
    out = [iou(boxes[i : i + chunk], reuse=True).amax(1) for i in range(0, boxes.shape[0], chunk)]
    return torch.cat(out) if out else boxes.new_zeros(0)


def _extras(scales: Sequence[float], last: float = 1.0) -> list[float]:
    return [math.sqrt(scales[k] * scales[k + 1]) if k + 1 < len(scales) else last for k in range(len(scales))]


class _LevelCache:
    """Best IoU per box and level for one box set, recomputed only for the levels a scale change touches."""

    def __init__(self, boxes: np.ndarray, feature_maps: Sequence[int], ratios: Sequence[float]):
        self.boxes = torch.as_tensor(boxes, dtype=torch.float32)
        self.maps, self.ratios = tuple(feature_maps), tuple(ratios)
        self._memo: dict[tuple[int, float, float], torch.Tensor] = {}

    def level(self, k: int, scale: float, extra: float) -> torch.Tensor:
        key = (k, round(scale, 6), round(extra, 6))
        if key not in self._memo:
            self._memo[key] = _best_iou(self.boxes, _level_priors(self.maps[k], scale, extra, self.ratios))
        return self._memo[key]

    def per_level(self, scales: Sequence[float]) -> torch.Tensor:
        """``(L, N)`` best IoU of each box on each level."""
        extras = _extras(scales)
        return torch.stack([self.level(k, s, e) for k, (s, e) in enumerate(zip(scales, extras))])


def _stats(
    per_level: torch.Tensor, boxes: np.ndarray, input_size: int, threshold: float, small_px: float
) -> PriorMatchStats:
    n_levels, n = per_level.shape
    if n == 0:
        nan = float("nan")
        return PriorMatchStats(nan, nan, (0.0,) * n_levels, (nan,) * n_levels, nan, 0, small_px)
    best, level = per_level.max(0)
    hit = best >= threshold
    shares, recalls = [], []
    for k in range(n_levels):
        on = level == k
        shares.append(float(on.float().mean()))
        recalls.append(float(hit[on].float().mean()) if bool(on.any()) else float("nan"))
    wh = boxes[:, 2:] - boxes[:, :2]
    small = torch.as_tensor(np.sqrt(wh[:, 0] * wh[:, 1]) * input_size < small_px)
    small_recall = float(hit[small].float().mean()) if bool(small.any()) else float("nan")
    return PriorMatchStats(
        float(hit.float().mean()),
        float(best.mean()),
        tuple(shares),
        tuple(recalls),
        small_recall,
        int(small.sum()),
        small_px,
    )


def evaluate_priors(
    boxes: np.ndarray, spec: PriorSpec, input_size: int, threshold: float = 0.5, small_px: float = 16.0
) -> PriorMatchStats:
    """Recall of the matcher (best prior IoU >= ``threshold``) of ``spec``'s priors on ``boxes`` (xyxy in [0, 1])."""
    t = torch.as_tensor(boxes, dtype=torch.float32)
    extras = _extras(spec.scales, spec.extra_scale_last)
    per_level = (
        torch.stack(
            [
                _best_iou(
                    t,
                    cxcywh_to_xyxy(PriorSpec((f,), (s,), (r,), extra_scale_last=e, clip=spec.clip).priors()),
                )
                for f, s, r, e in zip(spec.feature_maps, spec.scales, spec.aspect_ratios, extras)
            ]
        )
        if len(t)
        else torch.zeros(len(spec.feature_maps), 0)
    )
    return _stats(per_level, boxes, input_size, threshold, small_px)


# ---------------------------------------------------------------------------------------------- fitting
def fit_aspect_ratios(boxes: np.ndarray, k: int, iters: int = 100) -> tuple[float, ...]:
    """``k`` aspect ratios (w / h) besides 1: k-means in ``log(w / h)`` with one centre fixed at 0 (ratio 1,
    which every location has anyway). Sorted by how many boxes they serve, most first (as a config lists them)."""
    if k < 1:
        return ()
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh > 0).all(1)
    x = np.log(wh[keep, 0] / wh[keep, 1]).astype(np.float64)
    if x.size == 0:
        raise ValueError("no boxes with a positive size to fit aspect ratios to")
    free = np.quantile(x, (np.arange(k) + 0.5) / k)  # start spread over the data
    free = np.where(np.abs(free) < 1e-3, 1e-3, free)
    for _ in range(iters):
        centres = np.concatenate([[0.0], free])
        assign = np.abs(x[:, None] - centres[None]).argmin(1)
        new = np.array([x[assign == j + 1].mean() if (assign == j + 1).any() else free[j] for j in range(k)])
        if np.allclose(new, free):
            break
        free = new
    counts = [(assign == j + 1).sum() for j in range(k)]
    ratios = [_sig(float(np.exp(c)), 3) for _, c in sorted(zip(counts, free), key=lambda t: -t[0])]
    # a ratio of exactly 1 would duplicate the square box (and the config refuses it)
    return tuple(r if r != 1 else 1.01 for r in ratios)


def _sig(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` significant digits (what the TOML snippet writes)."""
    return float(f"{x:.{digits}g}")


def _quantile_scales(
    g: np.ndarray, feature_maps: Sequence[int], max_scale: float, min_step: float
) -> list[float]:
    """Equal-share quantiles of box size, each raised to its grid's floor, increasing, capped at ``max_scale``."""
    n = len(feature_maps)
    scales = [float(np.quantile(g, (k + 0.5) / n)) for k in range(n)]
    scales = [max(s, COVER_CELLS / f) for s, f in zip(scales, feature_maps)]
    for k in range(1, n):
        scales[k] = max(scales[k], scales[k - 1] * min_step)
    # the top levels: capped, spread log-evenly below the cap when several would sit on it
    capped = [k for k, s in enumerate(scales) if s > max_scale]
    if capped:
        first = capped[0]
        lo = scales[first - 1] if first else min(float(g.min()), max_scale / 2)
        steps = len(scales) - first
        scales[first:] = [lo * (max_scale / lo) ** ((i + 1) / steps) for i in range(steps)]
    return scales


def _search(
    scales: list[float],
    current: float,
    score: Callable[[Sequence[float]], float],
    steps: Sequence[float],
    passes: int,
    lo_bound: float,
    max_scale: float,
    min_step: float,
) -> tuple[list[float], float]:
    """Coordinate search: each scale times each step, kept when the score rises (scales stay increasing)."""
    for _ in range(passes):
        improved = False
        for k in range(len(scales)):
            for m in steps:
                s = scales[k] * m
                lo = scales[k - 1] * min_step if k else lo_bound
                hi = scales[k + 1] / min_step if k + 1 < len(scales) else max_scale
                if not lo <= s <= hi:
                    continue
                trial = [*scales[:k], s, *scales[k + 1 :]]
                v = score(trial)
                if v > current + 1e-9:
                    scales, current, improved = trial, v, True
        if not improved:
            break
    return scales, current


def fit_anchors(
    boxes: np.ndarray,
    feature_maps: Sequence[int],
    input_size: int,
    num_ratios: int = 3,
    threshold: float = 0.5,
    max_scale: float = 0.95,
    min_step: float = 1.05,
    passes: int = 6,
    small_px: float = 16.0,
) -> AnchorFit:
    """Fit per-level scales and ``num_ratios`` aspect ratios to ``boxes`` (xyxy in [0, 1] of the square input)
    for a model whose maps have ``feature_maps`` cells a side (finest first)."""
    if len(boxes) == 0:
        raise ValueError("no boxes to fit default boxes to")
    if not feature_maps:
        raise ValueError("need at least one feature map")
    boxes = np.asarray(boxes, dtype=np.float32)
    wh = boxes[:, 2:] - boxes[:, :2]
    g = np.sqrt(np.clip(wh[:, 0] * wh[:, 1], 1e-12, None))
    ratios = fit_aspect_ratios(boxes, num_ratios)
    cache = _LevelCache(boxes, feature_maps, ratios)
    start = _quantile_scales(g, feature_maps, max_scale, min_step)
    notes = []

    def score(scales: Sequence[float]) -> float:
        # recall first; mean best IoU breaks ties (and rewards a better start for the regression)
        best = cache.per_level(scales).amax(0)
        return float((best >= threshold).float().mean()) + 0.01 * float(best.mean())

    scales, current = list(start), score(start)
    lo_bound = float(g.min())
    for steps in ((0.7, 0.85, 1.15, 1.4), (0.93, 1.07)):  # coarse, then fine
        scales, current = _search(scales, current, score, steps, passes, lo_bound, max_scale, min_step)
    scales, start = [_sig(s, 4) for s in scales], [_sig(s, 4) for s in start]
    stats = _stats(cache.per_level(scales), boxes, input_size, threshold, small_px)
    q_stats = _stats(cache.per_level(start), boxes, input_size, threshold, small_px)
    tiny = float((g * input_size < 8).mean())
    if tiny > 0:
        notes.append(f"{100 * tiny:.1f}% of the boxes are under 8 px at {input_size} px")
    return AnchorFit(
        input_size,
        tuple(feature_maps),
        tuple(scales),
        tuple(ratios),
        stats,
        tuple(start),
        q_stats,
        len(boxes),
        threshold,
        notes,
    )


# ------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class ModelLayout:
    """What the fit needs from a model: its input size, map sizes and current default boxes."""

    input_size: int
    feature_maps: tuple[int, ...]
    current: PriorSpec | None = None
    source: str = ""


def layout_of_model(
    name: str, build_kwargs: dict[str, Any], num_classes: int, source: str = ""
) -> ModelLayout:
    """The layout of a model as a config builds it (without pretrained weights: only its prior spec counts)."""
    from maskssd.ssd.models import build_model

    if name == "ssd300_vgg16":
        raise MaskSSDError(
            f"{source}: ssd300_vgg16 has the paper's fixed default boxes (model.scales does not apply)"
        )
    kw = {**build_kwargs, "pretrained": False}
    kw.pop("init_checkpoint", None)
    scales = kw.pop("scales", None)
    model = build_model(name, num_classes=num_classes, **kw)  # the model's own scales
    spec, source = model.prior_spec, f"{source} ({name})"
    current: PriorSpec | None = spec
    if scales is not None:
        if len(scales) == len(spec.feature_maps):  # what SSDLite does with model.scales
            current = PriorSpec(spec.feature_maps, tuple(scales), spec.aspect_ratios)
        else:  # e.g. a stride-4 map added with --set: the config's scales are for another layout
            current, source = (
                None,
                f"{source}; its {len(scales)} scales do not fit these {len(spec.feature_maps)} maps",
            )
    return ModelLayout(model.input_size, tuple(spec.feature_maps), current, source)


def layout_from_size(input_size: int, levels: int, min_stride: int = 8) -> ModelLayout:
    """An SSDLite layout without a config: ``levels`` maps from stride ``min_stride`` on."""
    return ModelLayout(
        input_size,
        ssdlite_feature_maps(input_size, levels, min_stride),
        None,
        f"{levels} maps from stride {min_stride} at {input_size} px",
    )
