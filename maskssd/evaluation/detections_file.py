"""The saved-detections file (``maskssd evaluate --save-detections``): every detection of a split in original
pixels, the metrics printed for it and the settings that produced it, as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskssd.evaluation.metrics import EvalResult
from maskssd.ssd.postprocess import Detections

__all__ = ["write_detections"]


def write_detections(
    path: str | Path,
    class_names: Sequence[str],
    detections: Sequence[tuple[str, Detections]],
    sizes: Mapping[str, tuple[int, int]],
    result: EvalResult,
    settings: Mapping[str, Any],
) -> Path:
    """Write ``(image_id, Detections)`` pairs with each image's (width, height), the metrics and the settings."""
    doc = {
        "classes": list(class_names),
        "images": [
            {"id": i, "width": sizes[i][0], "height": sizes[i][1], "detections": d.to_list(class_names)}
            for i, d in detections
        ],
        "metrics": {
            "map": result.map,
            "ap": result.ap,
            "map_voc12": result.map_voc12,
            "map_coco": result.map_coco,
            "ap50_coco": result.ap50_coco,
        },
        "settings": dict(settings),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path
