"""What a run builds from its config: the data root (generated when synthetic), the splits' annotations (or a
cross-validation child's folds), datasets and loaders, the detector, the MultiBox loss, the deployable
checkpoint, the datasets' lineage and where checkpoints live locally. One place per config section."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from maskssd.data import DataReport, FaceMaskDataset, SeededSampler, collate, load_split, split_digest
from maskssd.data.folds import fold_digest, fold_split
from maskssd.data.sampling import no_single_last_batch
from maskssd.data.transforms import eval_transform, train_transform
from maskssd.data.voc import Annotation
from maskssd.errors import MaskSSDError
from maskssd.runtime import local_dir
from maskssd.ssd.checkpoint import FORMAT_VERSION
from maskssd.ssd.detector import SSDDetector
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.models import build_model
from maskssd.ssd.postprocess import DecodeSpec
from maskssd.training.config import ExperimentConfig
from maskssd.training.levers import augment_spec
from maskssd.training.tracker import DatasetInfo

__all__ = [
    "RunData",
    "build_datasets",
    "build_detector",
    "build_loader",
    "build_loss",
    "checkpoint_root",
    "dataset_infos",
    "datasets_of",
    "deploy_checkpoint",
    "resolve_data_root",
    "split_annotations",
]

log = logging.getLogger(__name__)


def resolve_data_root(cfg: ExperimentConfig) -> Path:
    """The dataset folder, generating the synthetic one on first use when the config asks for it."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.synthetic is not None:
        from maskssd.data.synth import ensure_synth

        syn = cfg.data.synthetic
        ensure_synth(
            root,
            syn.images,
            syn.seed,
            cfg.data.split_name,
            class_probs=tuple(syn.class_probs),
            face_size=tuple(syn.face_size),
            faces_per_image=tuple(syn.faces_per_image),
            image_size=tuple(syn.image_size),
            classes=tuple(cfg.class_names),
        )
    if not root.exists():
        raise MaskSSDError(f"data.root {root} does not exist (relative paths are read from {Path.cwd()})")
    return root


@dataclass
class RunData:
    """The annotations of a run's splits (train, val, the final split) and, for a cross-validation child,
    every fold's image ids."""

    splits: dict[str, list[Annotation]]
    folds: list[list[str]] | None = None


def split_annotations(cfg: ExperimentConfig, root: Path, report: DataReport | None = None) -> RunData:
    """The annotations of the run's splits; with ``data.fold`` the train and val images together, fold
    ``data.fold`` of ``data.folds`` (stratified, :mod:`maskssd.data.folds`) as val and the others as train."""
    report = report if report is not None else DataReport()
    d = cfg.data
    out: dict[str, list[Annotation]] = {}
    for split in ("train", "val", d.final_split):
        if split == "none" or split in out:
            continue
        anns = load_split(root, split, d.split_name, cfg.class_names, d.on_error, report)
        if not anns:
            raise MaskSSDError(f"split {d.split_name}/{split} of {root} is empty")
        out[split] = anns
    if not d.fold:
        return RunData(out)
    seen = {a.image_id for a in out["train"]}
    union = out["train"] + [a for a in out["val"] if a.image_id not in seen]
    out["train"], out["val"], folds = fold_split(union, d.folds, d.fold, d.fold_seed)
    return RunData(out, folds)


def build_datasets(
    cfg: ExperimentConfig, root: Path, input_size: int, report: DataReport | None = None
) -> dict[str, FaceMaskDataset]:
    """A dataset per split of :func:`split_annotations`, train with the config's augmentation."""
    return datasets_of(cfg, split_annotations(cfg, root, report).splits, input_size)


def datasets_of(
    cfg: ExperimentConfig, splits: Mapping[str, list[Annotation]], input_size: int
) -> dict[str, FaceMaskDataset]:
    counts = Counter(cfg.class_names[int(c) - 1] for a in splits.get("train", []) for c in a.labels)
    aug = augment_spec(cfg, counts)
    out = {}
    for split, anns in splits.items():
        tf = train_transform(input_size, aug) if split == "train" else eval_transform(input_size)
        out[split] = FaceMaskDataset(anns, tf, cfg.class_names, cfg.data.cache_images)
    return out


def build_loader(
    ds: FaceMaskDataset,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    rank: int = 0,
    world: int = 1,
    pin: bool = False,
    sampler: SeededSampler | None = None,
) -> torch.utils.data.DataLoader:
    """Training loaders (``shuffle``) pad shards to equal length like ``DistributedSampler``; evaluation loaders
    shard without padding, so every image is evaluated exactly once across ranks. ``sampler`` replaces the
    default one (repeat-factor sampling, progressive sizes)."""
    if sampler is None:
        sampler = SeededSampler(len(ds), seed, shuffle, rank, world, pad=shuffle)
        if shuffle:  # BatchNorm cannot train on a last batch of one image: pad it with one more
            sampler.num_samples = no_single_last_batch(sampler.num_samples, batch_size)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=workers > 0,
        drop_last=False,
    )


def build_detector(cfg: ExperimentConfig) -> SSDDetector:
    torch.manual_seed(cfg.experiment.seed)
    kwargs = cfg.model.build_kwargs()
    if kwargs.get("init_checkpoint"):  # its class heads, where they fit, are mapped onto our classes by name
        kwargs["class_names"] = list(cfg.class_names)
    model = build_model(cfg.model.name, num_classes=len(cfg.class_names) + 1, **kwargs)
    model.build_args.pop("class_names", None)  # rebuilding needs no init checkpoint, hence no class mapping
    init = getattr(model, "init_report", None)
    if init:
        log.info(
            "model.init_checkpoint: %d tensors loaded, %d dropped%s",
            len(init["loaded"]),
            len(init["dropped"]),
            f"; {init['class_order']}" if init.get("class_order") else "",
        )
    return model


def build_loss(
    cfg: ExperimentConfig,
    model: SSDDetector,
    box_counts: Mapping[str, int] | None = None,
    *,
    priors: torch.Tensor | None = None,
) -> MultiBoxLoss:
    """The config's MultiBox loss over the model's default boxes (or ``priors``: another input size's)."""
    ls = cfg.loss
    return MultiBoxLoss(
        model.priors_cxcy if priors is None else priors,
        threshold=ls.threshold,
        neg_pos_ratio=ls.neg_pos_ratio,
        alpha=ls.alpha,
        class_weights=cfg.class_weight_list(box_counts),
        loc_loss=ls.loc_loss,
        focal_gamma=ls.focal_gamma,
        label_smoothing=ls.label_smoothing,
    )


def deploy_checkpoint(
    ckpt: Mapping[str, Any],
    cfg: ExperimentConfig,
    thresholds: Mapping[str, float] | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The part of a training checkpoint a deployed model needs: weights, how to rebuild, classes, decoding,
    the per-class operating thresholds (fitted on validation) where known, and ``calibration``: a few training
    images for int8 (:func:`maskssd.data.calibration.embed_calibration`), so the model quantises anywhere."""
    out = {
        "format": FORMAT_VERSION,
        "model": ckpt["model"],
        "build_args": ckpt["build_args"],
        "class_names": list(cfg.class_names),
        "decode": asdict(DecodeSpec.from_config(cfg.eval)),
        "epoch": ckpt["epoch"],
        "config": cfg.model_dump(mode="json"),
    }
    if thresholds:
        out["thresholds"] = {str(k): float(v) for k, v in thresholds.items()}
    if calibration:
        out["calibration"] = dict(calibration)
    return out


def dataset_infos(
    cfg: ExperimentConfig,
    root: Path,
    datasets: Mapping[str, FaceMaskDataset],
    folds: Sequence[Sequence[str]] | None = None,
) -> dict[str, DatasetInfo]:
    """Each split a run uses, as lineage: named ``ROOT_NAME/SPLIT_NAME/SPLIT`` (a cross-validation child's train
    and val ``ROOT_NAME/SPLIT_NAME/foldKofN/SPLIT``), its digest the split hash (the folds' hash), its source the
    data root, its profile the images and boxes per class."""
    root = root.resolve()
    d = cfg.data
    split_hash = split_digest(root, d.split_name)
    fold_hash = fold_digest(folds, d.fold_seed) if folds else None
    out = {}
    for split, ds in datasets.items():
        in_folds = fold_hash is not None and split in ("train", "val")
        name = f"{root.name}/{d.split_name}/" + (f"fold{d.fold}of{d.folds}/{split}" if in_folds else split)
        profile = {"images": len(ds), "boxes": dict(ds.class_box_counts())}
        out[split] = DatasetInfo(name, fold_hash if in_folds else split_hash, str(root), split, profile)
    return out


def checkpoint_root() -> Path:
    """Where runs keep their local checkpoints (``$MASKSSD_CHECKPOINT_DIR``, else the project's
    ``mlruns/checkpoints``)."""
    return Path(os.environ.get("MASKSSD_CHECKPOINT_DIR") or local_dir() / "checkpoints")
