"""Detection metrics on records (per image :class:`Detections` and :class:`Target`, gathered in an
:class:`EvalSet`, matched once into :class:`Matched`): VOC07/VOC12/COCO AP, PR curves, the confusion matrix,
drawing detections, the saved-detections file, bootstrap intervals (and the paired comparison of two runs), the
error analysis and one split's final report.

Names resolve lazily (:mod:`maskssd._lazy`): importing one loads only its module."""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {
    "APMethod": "voc",
    "APResult": "voc",
    "ap_from_curve": "voc",
    "average_precision": "voc",
    "voc_ap": "voc",
    "match": "voc",
    "Matched": "voc",
    "ClassMatches": "voc",
    "Detections": "records",
    "Target": "records",
    "EvalSet": "records",
    "ReportSpec": "report",
    "SplitReport": "report",
    "report_split": "report",
    "evaluate_set": "metrics",
    "OPERATING_THRESHOLD": "metrics",
    "pr_curves": "voc",
    "coco_map": "coco",
    "confusion_matrix": "confusion",
    "DetectionEvaluator": "metrics",
    "EvalResult": "metrics",
    "plot_confusion_matrix": "plots",
    "plot_pr_curves": "plots",
    "_FALLBACK": "drawing",
    "colour_of": "drawing",
    "draw_detections": "drawing",
    "montage": "drawing",
    "write_detections": "detections_file",
    "compare_detections": "detections_file",
    "doc_evalset": "detections_file",
    "detections_doc": "detections_file",
    "load_detections": "detections_file",
    "mark_doc": "detections_file",
    "score_detections": "detections_file",
    "BootstrapResult": "bootstrap",
    "ClassTable": "bootstrap",
    "Interval": "bootstrap",
    "Marked": "bootstrap",
    "PairedResult": "bootstrap",
    "intervals_from_dict": "bootstrap",
    "mark": "bootstrap",
    "paired_bootstrap": "bootstrap",
    "resample_weights": "bootstrap",
    "resampled_ap": "bootstrap",
    "SIZE_BUCKETS": "analysis",
    "SIZE_EDGES": "analysis",
    "ErrorAnalysis": "analysis",
    "analyse": "analysis",
    "render_worst": "analysis",
    "size_bucket": "analysis",
    "draw_review": "drawing",
    "ThresholdFit": "thresholds",
    "fit_f1_thresholds": "thresholds",
    "thresholds_of": "thresholds",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
