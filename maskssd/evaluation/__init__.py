"""Detection metrics: VOC07/VOC12/COCO AP, PR curves, the confusion matrix, drawing detections, and the
saved-detections file.

Names resolve lazily (:mod:`maskssd._lazy`): importing one loads only its module."""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {
    "APResult": "metrics",
    "EvalResult": "metrics",
    "average_precision": "metrics",
    "coco_map": "metrics",
    "confusion_matrix": "metrics",
    "DetectionEvaluator": "metrics",
    "plot_pr_curves": "metrics",
    "plot_confusion_matrix": "metrics",
    "CLASS_COLOURS": "drawing",
    "colour_of": "drawing",
    "draw_detections": "drawing",
    "montage": "drawing",
    "write_detections": "detections_file",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
