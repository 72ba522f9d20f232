"""The detector core: default boxes and box coding, backbones, SSD models, the MultiBox loss, decoding
and NMS, and the compiled CPU kernels behind the last two.

Names resolve lazily (:mod:`maskssd._lazy`): importing one loads only its module."""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {
    "VARIANCES": "priors",
    "PriorSpec": "priors",
    "xyxy_to_cxcywh": "priors",
    "cxcywh_to_xyxy": "priors",
    "encode": "priors",
    "decode": "priors",
    "box_iou": "priors",
    "PriorIoU": "priors",
    "BNMode": "backbones",
    "cached_torchvision_weights": "backbones",
    "efficientnet_lite0_file": "backbones",
    "freeze": "backbones",
    "set_bn_eval": "backbones",
    "Backbone": "backbones",
    "VGG16Base": "backbones",
    "EfficientNetLite0Features": "backbones",
    "MobileNetV3Features": "backbones",
    "conv_bn": "backbones",
    "TinyBackbone": "backbones",
    "IMAGENET_MEAN": "models",
    "IMAGENET_STD": "models",
    "SSDDetector": "models",
    "AuxiliaryConvolutions": "models",
    "PredictionConvolutions": "models",
    "SSD300VGG16": "models",
    "load_reference_checkpoint": "models",
    "SSDLite": "models",
    "register_model": "models",
    "list_models": "models",
    "build_model": "models",
    "ssd300_vgg16": "models",
    "ssdlite_effnet_lite0": "models",
    "ssdlite_mobilenet_v3": "models",
    "tiny": "models",
    "LossOutput": "loss",
    "MultiBoxLoss": "loss",
    "DecodeSpec": "decode_spec",
    "softmax_last": "postprocess",
    "Detections": "postprocess",
    "postprocess": "postprocess",
    "postprocess_tensors": "postprocess",
    "grouped_nms": "postprocess",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
