"""Writing a split's final report (:class:`~maskssd.evaluation.report.SplitReport`) to the run:
``report/<split>.json`` (the record the docs' tables are rendered from, the shape of ``maskssd evaluate
--json``), ``detections/<split>.json`` (re-scorable, the format of ``maskssd evaluate --save-detections``),
``analysis/<split>.json``, and on validation the images with the most errors under ``errors/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maskssd.data import FaceMaskDataset
from maskssd.evaluation.analysis import render_worst
from maskssd.evaluation.detections_file import write_detections
from maskssd.evaluation.report import SplitReport
from maskssd.training.config import ExperimentConfig
from maskssd.training.tracker import Tracker

__all__ = ["log_report"]


def log_report(
    tracker: Tracker,
    report: SplitReport,
    cfg: ExperimentConfig,
    out_dir: Path,
    settings: Mapping[str, Any],
    dataset: FaceMaskDataset,
    root: Path,
    *,
    folds_hash: str | None = None,
) -> None:
    """Write the split's report, detections file, analysis JSON and (validation only) its worst images.
    ``folds_hash``: a fold run's folds' digest, so its validation file can join the other folds' files
    (:func:`maskssd.evaluation.detections_file.merge_folds`) wherever they were trained."""
    split, d = report.split, cfg.data
    data: dict[str, Any] = {"root": str(root.resolve()), "split_name": d.split_name, "split": split}
    if d.fold and split == "val":  # a fold of the train and val images together
        data.update(splits=["train", "val"], fold=d.fold, folds=d.folds, fold_seed=d.fold_seed)
        data.update(folds_hash=folds_hash, seed=cfg.experiment.seed)
    path = write_detections(
        out_dir / "detections" / f"{split}.json",
        report.evalset,
        report.result,
        {**settings, "split": split},
        bootstrap=report.bootstrap,
        data=data,
    )
    tracker.log_artifact(path, "detections")
    tracker.log_dict({**report.to_dict(), "data": data}, f"report/{split}.json")
    tracker.log_dict(report.analysis.to_dict(), f"analysis/{split}.json")
    if split == "val" and cfg.eval.worst_images > 0:
        by_id = {a.image_id: a for a in dataset.annotations}
        paths = render_worst(
            report.analysis,
            [by_id[i] for i in report.evalset.image_ids],
            report.evalset.detections,
            out_dir / "errors",
            cfg.eval.worst_images,
        )
        for p in paths:
            tracker.log_artifact(p, "errors")
