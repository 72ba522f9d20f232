"""The MLflow pyfunc model (logged as code): images in, one row per detection out.

Images are uint8 arrays ``(N, H, W, 3)`` or encoded images (a column ``image`` of JPEG/PNG bytes or base64
strings; :mod:`maskssd.deploy.model_input`), so ``mlflow models serve`` answers ordinary photos. The rows are
the detections shown to a user: above the model's per-class thresholds (fitted on validation), or above the
``score_threshold`` param when given (``0`` returns everything decoding kept). Bad input is refused as
``INVALID_PARAMETER_VALUE`` (HTTP 400 from the scoring server), with the reason.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd

COLUMNS = ["image_index", "x1", "y1", "x2", "y2", "label", "score"]


class MaskSSDModel(mlflow.pyfunc.PythonModel):
    """Wraps a :class:`maskssd.predictor.Predictor` built from the model's ``checkpoint`` artifact."""

    def load_context(self, context: Any) -> None:
        from maskssd.deploy.predictor import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """``model_input``: a DataFrame (what the scoring server passes) or any form of
        :func:`~maskssd.deploy.model_input.images_from_input`; the hint is one MLflow infers no schema from
        (the logged signature is explicit)."""
        from maskssd.deploy.model_input import images_from_input
        from maskssd.errors import MaskSSDError

        threshold = (params or {}).get("score_threshold")
        try:
            images = images_from_input(model_input)
            if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
                raise MaskSSDError(f"score_threshold must be in [0, 1], not {threshold}")
        except (MaskSSDError, TypeError, ValueError) as e:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(e)) from None
        pred = self.predictor
        if threshold is not None or pred.thresholds:
            dets = pred.detect(images, threshold)
        else:  # every detection from the decode threshold up (e.g. for AP)
            dets = pred.predict(images)
        rows = [
            (i, *box, pred.class_names[label - 1], score)
            for i, d in enumerate(dets)
            for box, label, score in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist())
        ]
        frame = pd.DataFrame(rows, columns=COLUMNS)
        floats = dict.fromkeys(["x1", "y1", "x2", "y2", "score"], np.float64)
        return frame.astype({"image_index": "int64", "label": "str", **floats})


mlflow.models.set_model(MaskSSDModel())
