"""Deployment: the predictor on raw images (PyTorch or ONNX Runtime, float or int8), inference rewrites
(BatchNorm folding), ONNX/TorchScript export and int8 quantisation, detection
on files, videos and cameras, the HTTP service, and the MLflow pyfunc model.

Names resolve lazily (:mod:`maskssd._lazy`): importing one loads only its module."""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {
    "Timing": "predictor",
    "BACKENDS": "model_ref",
    "Predictor": "predictor",
    "PredictorModule": "predictor",
    "resolve_checkpoint": "model_ref",
    "load_predictor": "predictor",
    "INPUT_NAME": "export",
    "OUTPUT_NAMES": "export",
    "EXPORT_VERSION": "export",
    "physical_cores": "export",
    "export_onnx": "export",
    "onnx_session_options": "export",
    "onnx_session": "export",
    "onnx_cache_path": "export",
    "onnx_session_for": "export",
    "export_torchscript": "export",
    "load_torchscript": "export",
    "verify_export": "export",
    "ExportReport": "export",
    "export_model": "export",
    "batchnorm_count": "optimize",
    "fold_batchnorm": "optimize",
    "static_same_padding": "optimize",
    "optimize_for_inference": "optimize",
    "QUANT_VERSION": "quantize",
    "Calibration": "quantize",
    "ImageCalibrationReader": "quantize",
    "Int8Report": "quantize",
    "calibration_files": "quantize",
    "calibration_key": "quantize",
    "calibration_set": "quantize",
    "carried": "quantize",
    "carry_calibration": "quantize",
    "cpu_flags": "cpu",
    "has_vnni": "cpu",
    "export_int8": "quantize",
    "head_nodes": "quantize",
    "shape_nodes": "quantize",
    "int8_cache_path": "quantize",
    "int8_session_for": "quantize",
    "quantize_onnx": "quantize",
    "InFlight": "inflight",
    "auto_in_flight": "inflight",
    "VIDEO_EXTENSIONS": "detect",
    "DetectSummary": "detect",
    "detect_source": "detect",
    "open_source": "video",
    "frames": "video",
    "FPSMeter": "video",
    "ClassSmoother": "video",
    "StreamSummary": "video",
    "stream": "video",
    "MONTAGE_INTERVAL_S": "serving",
    "MAX_MONTAGE_CAMERAS": "serving",
    "MAX_CAMERA_LABELS": "serving",
    "RequestError": "serving",
    "Metrics": "serving",
    "DetectionService": "serving",
    "create_app": "serving",
    "run_server": "serving",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
