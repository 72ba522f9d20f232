"""The MLflow pyfunc model (logged as code): uint8 images ``(N, H, W, 3)`` in, one row per detection out."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class MaskSSDModel(mlflow.pyfunc.PythonModel):
    """Wraps a :class:`maskssd.predictor.Predictor` built from the model's ``checkpoint`` artifact."""

    def load_context(self, context: Any) -> None:
        from maskssd.deploy.predictor import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow reads these hints)
        import pandas as pd

        images = model_input["images"] if isinstance(model_input, dict) else model_input
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim == 3:
            images = images[None]
        dets = self.predictor.predict(list(images))
        rows = []
        for i, d in enumerate(dets):
            for box, label, score in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist()):
                rows.append(
                    {
                        "image_index": i,
                        "x1": box[0],
                        "y1": box[1],
                        "x2": box[2],
                        "y2": box[3],
                        "label": self.predictor.class_names[label - 1],
                        "score": score,
                    }
                )
        columns = ["image_index", "x1", "y1", "x2", "y2", "label", "score"]
        return pd.DataFrame(rows, columns=columns).astype({"image_index": "int64", "label": "str"})


mlflow.models.set_model(MaskSSDModel())
