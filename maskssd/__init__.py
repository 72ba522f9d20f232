"""maskssd: real-time face-mask detection with SSD, tracked in MLflow, tuned with Optuna."""

__version__ = "0.1.0"
