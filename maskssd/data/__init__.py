"""Datasets: Pascal VOC parsing and layouts, split lists, images, the torch Dataset and sampler, SSD
transforms, and synthetic face-mask scenes.

Names resolve lazily (:mod:`maskssd._lazy`): importing one loads only its module."""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {
    "IMAGE_EXTENSIONS": "images",
    "MAX_IMAGE_PIXELS": "images",
    "read_image_size": "images",
    "load_image": "images",
    "decode_image_bytes": "images",
    "ImageCache": "image_cache",
    "shared_image_cache": "image_cache",
    "DEFAULT_CLASSES": "voc",
    "SPLITS": "voc",
    "OnError": "voc",
    "Annotation": "voc",
    "DataReport": "voc",
    "VOCLayout": "voc",
    "natural_key": "voc",
    "parse_voc_xml": "voc",
    "load_annotations": "voc",
    "load_split": "voc",
    "stratified_split": "voc",
    "split_digest": "voc",
    "write_split": "voc",
    "voc_xml": "voc",
    "import_dataset": "convert",
    "ImportSummary": "convert",
    "SIZE_BINS": "voc",
    "box_size_histogram": "voc",
    "relative_area_quantiles": "voc",
    "class_counts": "voc",
    "Batch": "dataset",
    "Sample": "dataset",
    "Transform": "dataset",
    "FaceMaskDataset": "dataset",
    "collate": "dataset",
    "sample_seed": "dataset",
    "SeededSampler": "dataset",
    "RepeatFactorSampler": "sampling",
    "repeat_factors": "sampling",
    "epoch_batches": "sampling",
    "CopyPaste": "copy_paste",
    "FaceCrop": "copy_paste",
    "build_face_bank": "copy_paste",
    "IMAGENET_MEAN_UINT8": "transforms",
    "AugmentSpec": "transforms",
    "train_transform": "transforms",
    "eval_transform": "transforms",
    "preprocess_images": "transforms",
    "to_chw": "transforms",
    "SYNTH_VERSION": "synth",
    "GENERATOR": "synth",
    "MARKER": "synth",
    "README_TITLE": "synth",
    "PREFIX": "synth",
    "SynthSummary": "synth",
    "generate": "synth",
    "is_complete": "synth",
    "ensure_synth": "synth",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
