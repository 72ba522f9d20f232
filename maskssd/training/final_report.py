"""What the final evaluation adds to a run's numbers: bootstrap intervals on every AP, the selected checkpoint's
detections saved for later comparison, and the error analysis (by face size, at the operating threshold).

:func:`report_split` computes it for one split from the detections :func:`~maskssd.training.engine.evaluate`
collected; :func:`log_report` writes it to the run: ``detections/<split>.json`` (re-scorable, the format of
``maskssd evaluate --save-detections``), ``analysis/<split>.json``, and on validation the images with the most
errors under ``errors/``. The runner logs :attr:`SplitReport.metrics` with the final metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskssd.data.voc import Annotation
from maskssd.evaluation.analysis import ErrorAnalysis, analyse, render_worst
from maskssd.evaluation.bootstrap import BootstrapResult, bootstrap, mark_detections
from maskssd.evaluation.detections_file import detections_and_targets, write_detections
from maskssd.evaluation.metrics import EvalResult
from maskssd.ssd.postprocess import Detections
from maskssd.training.config import ExperimentConfig
from maskssd.training.tracker import Tracker

__all__ = ["SplitReport", "log_report", "report_split"]

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    """One split's final evaluation, beyond :class:`EvalResult`: intervals, error analysis, the detections."""

    split: str
    prefix: str  # metric prefix: val or test (the final split)
    result: EvalResult
    detections: list[tuple[str, Detections]]
    annotations: list[Annotation]
    analysis: ErrorAnalysis
    bootstrap: BootstrapResult | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        out = self.bootstrap.as_metrics(self.prefix) if self.bootstrap is not None else {}
        out.update(self.analysis.as_metrics(self.prefix))
        return out


def report_split(
    cfg: ExperimentConfig,
    *,
    split: str,
    prefix: str,
    result: EvalResult,
    detections: Sequence[tuple[str, Detections]],
    annotations: Sequence[Annotation],
    root: Path,
) -> SplitReport:
    """Intervals (``eval.bootstrap`` resamples, 0 = none) and the error analysis of one split's detections,
    scored against the same ground truth as ``result``."""
    ids, data, anns = detections_and_targets(detections, annotations)
    ev = cfg.eval
    boot = None
    if ev.bootstrap > 0:
        seed = ev.bootstrap_seed if ev.bootstrap_seed is not None else cfg.experiment.seed
        marked = mark_detections(*data, cfg.class_names, image_ids=ids)
        boot = bootstrap(marked, n=ev.bootstrap, seed=seed, ci=ev.bootstrap_ci)
        log.info(
            "%s mAP %.1f [%.1f, %.1f] (%g%% bootstrap interval, %d image resamples)",
            split,
            100 * boot.map.estimate,
            100 * boot.map.low,
            100 * boot.map.high,
            100 * ev.bootstrap_ci,
            ev.bootstrap,
        )
    analysis = analyse(*data, cfg.class_names, image_ids=ids, threshold=ev.operating_threshold)
    info = {"root": str(root.resolve()), "split_name": cfg.data.split_name, "split": split}
    return SplitReport(split, prefix, result, list(detections), anns, analysis, boot, info)


def log_report(
    tracker: Tracker, report: SplitReport, cfg: ExperimentConfig, out_dir: Path, settings: Mapping[str, Any]
) -> None:
    """Write the split's detections file, analysis JSON and (validation only) its worst images to the run."""
    sizes = {a.image_id: (a.width, a.height) for a in report.annotations}
    path = write_detections(
        out_dir / "detections" / f"{report.split}.json",
        cfg.class_names,
        report.detections,
        sizes,
        report.result,
        {**settings, "split": report.split},
        bootstrap=report.bootstrap,
        data=report.data,
    )
    tracker.log_artifact(path, "detections")
    tracker.log_dict(report.analysis.to_dict(), f"analysis/{report.split}.json")
    if report.split == "val" and cfg.eval.worst_images > 0:
        paths = render_worst(
            report.analysis,
            report.annotations,
            [d for _, d in report.detections],
            out_dir / "errors",
            cfg.eval.worst_images,
        )
        for p in paths:
            tracker.log_artifact(p, "errors")
