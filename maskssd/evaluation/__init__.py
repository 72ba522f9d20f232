"""Detection metrics: VOC07/VOC12/COCO AP, PR curves, the confusion matrix, drawing detections, and the
saved-detections file.

Names resolve lazily (:mod:`maskssd._lazy`): importing one loads only its module."""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {
    "APMethod": "voc",
    "APResult": "voc",
    "ap_from_curve": "voc",
    "average_precision": "voc",
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
    "ThresholdFit": "thresholds",
    "fit_f1_thresholds": "thresholds",
    "fit_on_annotations": "thresholds",
    "thresholds_of": "thresholds",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
