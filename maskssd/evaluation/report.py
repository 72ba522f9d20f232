"""One split's final report, the same for a run's last evaluation and for ``maskssd evaluate``: every metric
(:func:`~maskssd.evaluation.metrics.evaluate_set`), bootstrap intervals, the error analysis at the operating
threshold and, on validation, the per-class operating thresholds, all from one matching of the split.

:meth:`SplitReport.to_dict` is the record both write (``report/<split>.json`` in a run, ``maskssd evaluate
--json``): what the docs' results tables are rendered from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from maskssd.evaluation.analysis import ErrorAnalysis, analyse
from maskssd.evaluation.bootstrap import BootstrapResult, bootstrap, mark
from maskssd.evaluation.metrics import OPERATING_THRESHOLD, EvalResult, evaluate_set
from maskssd.evaluation.records import EvalSet
from maskssd.evaluation.thresholds import ThresholdFit, fit_f1_thresholds

__all__ = ["ReportSpec", "SplitReport", "report_split"]


@dataclass(frozen=True)
class ReportSpec:
    """How a split is reported: image resamples for the intervals (0: none), their seed and level, the
    operating threshold, COCO AP (pycocotools, the slow part) and the IoU of a match."""

    bootstrap: int = 1000
    bootstrap_seed: int = 0
    ci: float = 0.95
    operating_threshold: float = OPERATING_THRESHOLD
    coco: bool = True
    iou_threshold: float = 0.5


@dataclass
class SplitReport:
    """One split's final evaluation: its records, metrics, intervals, error analysis and (validation) the
    per-class operating thresholds."""

    split: str
    evalset: EvalSet
    result: EvalResult
    analysis: ErrorAnalysis
    bootstrap: BootstrapResult | None = None
    thresholds: dict[str, ThresholdFit] | None = None

    def metrics(self, prefix: str) -> dict[str, float]:
        """Every number a run logs for this split: ``{prefix}_map``, per-class AP, intervals, AP by size,
        recall at the operating threshold."""
        out = self.result.as_metrics(prefix)
        if self.bootstrap is not None:
            out.update(self.bootstrap.as_metrics(prefix))
        out.update(self.analysis.as_metrics(prefix))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON values (NaN as None): metrics per class with their intervals, the error
        analysis summary and the operating thresholds."""
        r = self.result
        doc: dict[str, Any] = {
            "split": self.split,
            "images": len(self.evalset),
            "map": r.map,
            "map_voc12": r.map_voc12,
            "map_coco": r.map_coco,
            "ap50_coco": r.ap50_coco,
            "classes": {
                c: {
                    "ap": r.ap[c],
                    "ap_voc12": r.ap_voc12[c],
                    "ap_coco": r.ap_coco.get(c),
                    "objects": r.n_gt[c],
                }
                for c in self.evalset.class_names
            },
            "intervals": self.bootstrap.to_dict() if self.bootstrap is not None else None,
            "operating_threshold": r.operating_threshold,
            "errors": self.analysis.to_dict(),
            "thresholds": {c: asdict(f) for c, f in (self.thresholds or {}).items()} or None,
        }
        return finite(doc)


def report_split(
    evalset: EvalSet, spec: ReportSpec, *, split: str, fit_thresholds: bool = False
) -> SplitReport:
    """Score ``evalset`` once and report it as ``spec`` says; ``fit_thresholds`` (validation only: thresholds
    chosen on test would leak it into the model) adds the per-class F1-maximising thresholds."""
    result = evaluate_set(
        evalset,
        iou_threshold=spec.iou_threshold,
        coco=spec.coco,
        operating_threshold=spec.operating_threshold,
    )
    assert result.matched is not None
    boot = None
    if spec.bootstrap > 0:
        boot = bootstrap(mark(result.matched), n=spec.bootstrap, seed=spec.bootstrap_seed, ci=spec.ci)
    analysis = analyse(result.matched, threshold=spec.operating_threshold)
    fits = fit_f1_thresholds(result.matched) if fit_thresholds else None
    return SplitReport(split, evalset, result, analysis, boot, fits)


def finite(v: Any) -> Any:
    """``v`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v
