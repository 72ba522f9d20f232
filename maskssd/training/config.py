"""Experiment configs: TOML files validated on load, ``--set section.key=value`` overrides, dotted params.

Every error names the key and the file (and the line where the key is written). Unknown keys, wrong types
(strict: a string is not a number) and impossible values are all refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maskssd.data import DEFAULT_CLASSES
from maskssd.errors import ConfigError
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD, DecodeSpec

#: Steps of the EMA's decay warm-up: short enough for a 50-epoch CPU run (~1,900 steps); YOLOv5's 2000 is
#: for ~10^5 steps.
EMA_WARMUP_STEPS = 200.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ExperimentSection(_Section):
    name: str = "maskssd"  # MLflow experiment name; a config file that names none logs into its file's name
    seed: int = 0  # every random draw of a run derives from it (weights, sampling, augmentation)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    description: str = ""  # shown as the run's note in the MLflow UI
    tags: dict[str, str] = Field(default_factory=dict)  # extra MLflow tags of every run

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v


class SynthSection(_Section):
    """A synthetic dataset generated at ``data.root`` on first use (see :mod:`maskssd.synth`)."""

    images: int = Field(300, ge=10)
    seed: int = 0
    class_probs: list[float] = Field(
        default_factory=lambda: [0.80, 0.17, 0.03], min_length=1
    )  # the real imbalance
    face_size: list[float] = Field(default_factory=lambda: [0.06, 0.35], min_length=2, max_length=2)
    faces_per_image: list[int] = Field(default_factory=lambda: [1, 6], min_length=2, max_length=2)
    image_size: list[int] = Field(default_factory=lambda: [256, 480], min_length=2, max_length=2)  # long side


class DataSection(_Section):
    root: str  # the dataset folder (VOC or Kaggle layout); relative to the config file
    split_name: str = "paper"  # the split list under splits/ (paper, default, main)
    classes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CLASSES), min_length=1
    )  # class names, in label order (background is 0, not listed)
    synthetic: SynthSection | None = None  # generate a synthetic dataset at ``root`` on first use
    on_error: Literal["raise", "skip"] = (
        "raise"  # a malformed annotation or image: raise (stop, naming it) or skip (count it)
    )
    batch_size: int = Field(16, ge=1)  # training images per step
    eval_batch_size: int = Field(32, ge=1)  # images per evaluation batch
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes (0: in the training process)
    cache_images: bool = True  # decode each image once per process and keep it (memory for speed)
    final_split: Literal["val", "test", "none"] = (
        "test"  # the split the selected checkpoint is scored on once at the end (none: no test)
    )
    # repeat-factor sampling (LVIS): images with classes in under this fraction of images repeat; 0 = off
    repeat_factor_threshold: float = Field(0.0, ge=0, le=1)
    # cross-validation (maskssd train --folds K): the train and val images together in `folds` folds,
    # stratified on the classes each image holds (maskssd.data.folds); a run with `fold` = k trains on the
    # others and validates on fold k. folds 0 = the split list's own train and val; fold 0 = no fold (a parent)
    folds: int = Field(0, ge=0)
    fold: int = Field(
        0, ge=0
    )  # the fold a cross-validation child validates on (set by maskssd train --folds)
    fold_seed: int = 0  # the folds' seed, independent of experiment.seed: every seed sees the same folds

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or "background" in v:
            raise ValueError("class names must be unique and may not be 'background'")
        return v


class AugmentSection(_Section):
    photometric_p: float = Field(0.5, ge=0, le=1)  # probability of SSD's photometric distortion
    zoom_out_p: float = Field(
        0.5, ge=0, le=1
    )  # probability of zooming out (the image on a larger mean-coloured canvas)
    zoom_out_max: float = Field(4.0, ge=1)  # the canvas's largest side ratio
    iou_crop_p: float = Field(1.0, ge=0, le=1)  # probability of SSD's IoU-constrained random crop
    hflip_p: float = Field(0.5, ge=0, le=1)  # probability of a horizontal flip
    # copy-paste of faces of copy_paste_classes (default: the rarest in the training split), before the above
    copy_paste_p: float = Field(0.0, ge=0, le=1)  # probability per training image; 0 = off
    copy_paste_classes: list[str] = Field(
        default_factory=list
    )  # classes whose faces are pasted (default: the rarest)
    copy_paste_max: int = Field(2, ge=1)  # faces pasted per image, at most
    copy_paste_scale: list[float] = Field(
        default_factory=lambda: [0.8, 1.25], min_length=2, max_length=2
    )  # the pasted face's random scale range
    # "hard" pastes the crop as it is; "feather" blends its margin into the image (alpha ramps from the face
    # box to the crop's edge), so the detector cannot learn the paste's hard edges instead of the face
    copy_paste_blend: Literal["hard", "feather"] = "hard"
    # crops around a rare face: with probability crop_keep_p, the IoU crop of an image holding a face of
    # crop_keep_classes (default: the rarest class in the training split) must keep one such face whole
    crop_keep_p: float = Field(0.0, ge=0, le=1)
    crop_keep_classes: list[str] = Field(
        default_factory=list
    )  # classes a kept crop is made around (default: the rarest)

    @field_validator("copy_paste_scale")
    @classmethod
    def _scale_range(cls, v: list[float]) -> list[float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("needs 0 < low <= high")
        return v


class ModelSection(_Section):
    name: str = "tiny"  # a registered model (maskssd models)
    input_size: int | None = Field(
        None, ge=32, le=2048
    )  # the square input side in pixels (default: the model's)
    pretrained: bool = False  # start from ImageNet (or the paper's VOC) weights, read offline
    init_checkpoint: str = (
        ""  # a tutorial-layout SSD300 checkpoint (the paper's VOC start); relative to the config file
    )
    freeze_stages: int = Field(0, ge=0)  # backbone stages kept frozen
    bn_mode: Literal["train", "frozen", "frozen_stages"] | None = (
        None  # BatchNorm in training mode, frozen, or frozen in the frozen stages
    )
    min_scale: float | None = Field(
        None, gt=0, le=1
    )  # the smallest default-box scale (the first feature map's)
    max_scale: float | None = Field(None, gt=0, le=1.5)  # the largest default-box scale
    scales: list[float] | None = None  # one per feature map; overrides min_scale/max_scale
    aspect_ratios: list[float] | None = None  # default-box aspect ratios besides 1
    extra_channels: list[int] | None = None  # channels of the extra layers after the backbone
    width: int | None = Field(None, ge=4)  # tiny model only
    # a feature pyramid over the backbone maps before the heads (SSDLite models): none | fpn | pan (fpn + bottom-up)
    neck: Literal["none", "fpn", "pan"] = "none"
    neck_channels: int | None = Field(None, ge=8)  # channels of every neck level (the model's default: 64)
    stride4: bool = False  # also predict on the stride-4 stage (through the neck): one more map, scales + 1

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from maskssd.ssd.models import list_models

        if v not in list_models():
            raise ValueError(f"unknown model {v!r}; known: {', '.join(list_models())}")
        return v

    @model_validator(mode="after")
    def _scales(self) -> ModelSection:
        if self.min_scale and self.max_scale and self.min_scale >= self.max_scale:
            raise ValueError("min_scale must be below max_scale")
        if self.aspect_ratios and any(r <= 0 or r == 1 for r in self.aspect_ratios):
            raise ValueError("aspect_ratios lists the ratios besides 1, each > 0")
        if self.neck == "none" and (self.stride4 or self.neck_channels is not None):
            raise ValueError('stride4 and neck_channels need a neck: set neck = "fpn" or "pan"')
        return self

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`maskssd.ssd.models.build_model` (unset values keep the model's default)."""
        kw = self.model_dump(exclude={"name"}, exclude_none=True)
        if not kw.get("init_checkpoint"):
            kw.pop("init_checkpoint", None)
        # off by default: left out, so configs without a neck build (and record) exactly what they did before
        if kw.get("neck") == "none":
            kw.pop("neck")
        if not kw.get("stride4"):
            kw.pop("stride4", None)
        return kw


class LossSection(_Section):
    threshold: float = Field(0.5, gt=0, le=1)  # IoU above which a prior matches an object
    neg_pos_ratio: float = Field(
        3.0, ge=0
    )  # hard negatives per positive in the confidence loss (the paper: 2)
    alpha: float = Field(1.0, ge=0)  # weight of the localisation loss (the paper: 2)
    class_weights: dict[str, float] = Field(
        default_factory=dict
    )  # by class name; "background" too; unset = 1
    # classes not in class_weights get (most frequent class's boxes / this class's boxes) ** exponent; 0 = off
    class_weight_exponent: float = Field(0.0, ge=0, le=2)
    loc_loss: Literal["l1", "smooth_l1"] = "l1"  # the paper's code uses L1; SSD's paper smooth L1
    focal_gamma: float = Field(0.0, ge=0)  # focal loss's gamma on the confidence loss (0: cross-entropy)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing
    # class-balanced weights (Cui et al. 2019): (1 - beta) / (1 - beta ** boxes), most frequent class = 1; 0 = off
    class_balance_beta: float = Field(0.0, ge=0, lt=1)

    @field_validator("class_weights")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if not w > 0:
                raise ValueError(f"weight of {k!r} must be > 0, got {w}")
        return v


class OptimSection(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"  # the optimiser
    lr: float = Field(1e-3, gt=0)  # the peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float = Field(5e-4, ge=0)  # L2 weight decay (decoupled for AdamW)
    bias_lr_mult: float = Field(1.0, gt=0)  # the paper's code: 2
    grad_clip: float = Field(0.0, ge=0)  # max gradient norm; 0 = off


class ScheduleSection(_Section):
    name: Literal["constant", "multistep", "cosine", "onecycle", "cosine_restarts"] = (
        "constant"  # the learning-rate schedule
    )
    decay_lr_at: list[int] = Field(default_factory=list)  # epochs (multistep)
    decay_lr_to: float = Field(0.1, gt=0, le=1)  # factor applied at each of decay_lr_at
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor, as a fraction of lr
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up from warmup_start_ratio * lr
    warmup_start_ratio: float = Field(
        0.001, gt=0, le=1
    )  # the warm-up's first learning rate, as a share of optim.lr
    pct_start: float = Field(
        0.3, gt=0, lt=1
    )  # onecycle: the share of training rising from warmup_start_ratio
    restart_epochs: float = Field(10.0, gt=0)  # cosine_restarts: the first period, in epochs
    restart_mult: float = Field(1.0, ge=1)  # cosine_restarts: each period this many times the previous one


class TrainSection(_Section):
    epochs: int = Field(10, ge=1)  # passes over the training images
    eval_every: int = Field(1, ge=1)  # epochs between mAP evaluations (the loss on val is every epoch)
    # the last checkpoint is written locally every epoch, and kept with the run (MLflow) every save_every epochs
    save_every: int = Field(1, ge=1)
    # optimiser steps between reads of the loss from the device (progress bar, non-finite check); nanoGPT's
    # log interval: the loop does not wait on the device in between
    log_every: int = Field(20, ge=1)
    best_metric: Literal["val_map", "val_loss"] = "val_map"  # the paper: val_loss
    best_after_epoch: int = Field(0, ge=0)  # the paper: 40
    amp: bool = True  # mixed precision, used on GPU only
    channels_last: bool = False  # NHWC memory format: faster depthwise convolutions on CPU (and tensor cores)
    sync_bn: bool = False  # distributed runs: BatchNorm statistics over all processes' batches
    log_images: int = Field(4, ge=0)  # annotated validation images logged at the end
    system_metrics: bool = False  # sample CPU/memory/disk/network (GPU) into the run as system/* (MLflow)
    cpu_bf16: bool = (
        False  # bfloat16 autocast of forward + loss on CPUs with bf16 instructions (AVX512-BF16, AMX)
    )
    # an exponential moving average of the weights, evaluated and checkpointed; 0 = off (e.g. 0.9998)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # decay * (1 - exp(-updates / this)); 0 = no warm-up
    ema_warmup_steps: float = Field(EMA_WARMUP_STEPS, ge=0)
    # progressive resizing: training input sizes stepped through over the first progressive_until of the
    # epochs; the last is the model's input_size (validation and the epochs after)
    progressive_sizes: list[int] = Field(default_factory=list)
    progressive_until: float = Field(0.6, gt=0, le=1)  # the share of epochs the progressive sizes take

    @field_validator("progressive_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if v and (len(v) < 2 or any(s < 32 for s in v)):
            raise ValueError("needs two sizes or more (the last is the model's input_size), each >= 32")
        return v


class EvalSection(_Section):
    """Detection settings for evaluation; defaults are :class:`DecodeSpec`'s (the paper's protocol)."""

    min_score: float = Field(
        DecodeSpec.min_score, ge=0, lt=1
    )  # detections under this score are dropped before NMS (the paper: 0.01)
    max_overlap: float = Field(DecodeSpec.max_overlap, gt=0, le=1)  # NMS IoU (the paper: 0.45)
    top_k: int = Field(DecodeSpec.top_k, ge=1)  # detections kept per image (the paper: 200)
    class_agnostic: bool = (
        DecodeSpec.class_agnostic
    )  # NMS across classes: one class per face (the paper's suggested fix)
    pre_nms_top_k: int = Field(0, ge=0)  # 0 = keep every candidate (the paper's code)
    coco: bool = True  # COCO AP (pycocotools, slow) in the final report
    coco_curves: bool = False  # ... and at every evaluation epoch too (a val/map_coco curve)
    # the final evaluation's uncertainty and error analysis (maskssd.evaluation.bootstrap, .analysis)
    bootstrap: int = Field(1000, ge=0)  # image resamples for the AP intervals; 0 = no intervals
    bootstrap_seed: int | None = None  # None: experiment.seed
    bootstrap_ci: float = Field(0.95, gt=0, lt=1)  # interval level
    operating_threshold: float = Field(DISPLAY_THRESHOLD, gt=0, lt=1)  # recall / false boxes counted here
    worst_images: int = Field(8, ge=0)  # validation images with the most errors, drawn as artifacts
    tta_hflip: bool = False  # also predict on the mirrored images, merged before NMS (maskssd.ssd.tta)


class ExperimentConfig(_Section):
    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    data: DataSection
    augment: AugmentSection = Field(default_factory=AugmentSection)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    # ----------------------------------------------------------------------------------- helpers
    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.data.classes)

    def class_weight_list(self, box_counts: Mapping[str, int] | None = None) -> list[float] | None:
        """Cross-entropy weights by class index (background first), or None when all are 1.

        Explicit ``loss.class_weights`` win; other classes get ``(max count / count) ** class_weight_exponent``
        from the training split's ``box_counts`` when the exponent is set, or the class-balanced weight
        ``(1 - beta) / (1 - beta ** count)`` relative to the most frequent class's when ``class_balance_beta``
        is.
        """
        w, exp, beta = self.loss.class_weights, self.loss.class_weight_exponent, self.loss.class_balance_beta
        if not w and ((exp == 0 and beta == 0) or not box_counts):
            return None

        def balanced(n: int) -> float:  # the inverse effective number of samples (Cui et al. 2019)
            return (1.0 - beta) / (1.0 - beta**n)

        def weight(c: str) -> float:
            if c in w:
                return w[c]
            if exp and box_counts and box_counts.get(c):
                return (max(box_counts.values()) / box_counts[c]) ** exp
            if beta and box_counts and box_counts.get(c):
                return balanced(box_counts[c]) / balanced(max(box_counts.values()))
            return 1.0

        return [w.get("background", 1.0)] + [weight(c) for c in self.data.classes]

    def flat(self) -> dict[str, Any]:
        """Every effective value under a dotted name (``loss.alpha``), for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        """A short hash of the effective config (lineage tag ``config_hash``): what the run computes, so its
        words (``experiment.description``, ``experiment.tags``) are left out: rewording a config's note does
        not make its runs a different recipe."""
        words = {"experiment": {"description", "tags"}}
        blob = json.dumps(self.model_dump(mode="json", exclude=words), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_toml(self) -> str:
        return dump_toml(self.model_dump(mode="json", exclude_none=True))


# ----------------------------------------------------------------------------------------- loading
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"section.key": value}``; an empty table becomes ``"{}"``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = "{}" if isinstance(v, Mapping) else v
    return out


def parse_value(raw: str) -> Any:
    """A ``--set`` value in TOML syntax (``2``, ``1e-3``, ``true``, ``[1, 2]``, ``"x"``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(
    data: dict[str, Any], overrides: Mapping[str, Any] | Iterable[str], source: str = "--set"
) -> dict[str, Any]:
    """Set dotted keys in a nested dict: ``{"loss.alpha": 2}`` or ``["loss.alpha=2"]``."""
    items: list[tuple[str, Any]]
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for s in overrides:
            if "=" not in s:
                raise ConfigError(f"override {s!r} is not of the form section.key=value", source)
            k, v = s.split("=", 1)
            items.append((k.strip(), parse_value(v.strip())))
    for key, value in items:
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot set {key}: {p} is a value, not a section", source, key)
            node = nxt
        node[parts[-1]] = value
    return data


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The line where a dotted key is written in a TOML text (best effort)."""
    if not text or not loc:
        return None
    section, key = (".".join(str(p) for p in loc[:-1]), str(loc[-1])) if len(loc) > 1 else ("", str(loc[0]))
    current = ""
    key_re = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    sec_re = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
    fallback = None
    for i, line in enumerate(text.splitlines(), 1):
        m = sec_re.match(line)
        if m:
            current = m.group(1)
            if current == ".".join(str(p) for p in loc):
                fallback = i
            continue
        if key_re.match(line):
            if current == section or (section.startswith(current + ".") if current else False):
                return i
            if fallback is None and section.endswith(current):
                fallback = i
        elif (
            section
            and current == section.split(".")[0]
            and re.match(rf"^\s*{re.escape(section.split('.', 1)[-1])}\s*=", line)
        ):
            fallback = fallback or i
    return fallback


def _cross_checks(cfg: ExperimentConfig) -> tuple[str, str] | None:
    """Checks that involve two sections: (key, message) of the first failure."""
    from maskssd.ssd.models import model_keywords

    allowed = model_keywords(cfg.model.name)
    for key in cfg.model.build_kwargs():
        if key not in allowed:
            return (
                f"model.{key}",
                f"model {cfg.model.name!r} takes no {key!r}; its keywords: {', '.join(allowed)}",
            )
    known = {"background", *cfg.data.classes}
    unknown = sorted(set(cfg.loss.class_weights) - known)
    if unknown:
        return "loss.class_weights", f"unknown classes {unknown}; known: {sorted(known)}"
    if any(e < 1 or e > cfg.train.epochs for e in cfg.schedule.decay_lr_at):
        return "schedule.decay_lr_at", f"epochs must lie in [1, train.epochs = {cfg.train.epochs}]"
    if cfg.schedule.warmup_epochs >= cfg.train.epochs:
        return "schedule.warmup_epochs", "warm-up must end before the last epoch"
    d = cfg.data
    if d.folds == 1 or d.fold > d.folds:
        return "data.fold", f"needs data.folds >= 2 and data.fold <= data.folds (got {d.fold} of {d.folds})"
    return _lever_checks(cfg, known)


def _lever_checks(cfg: ExperimentConfig, known: set[str]) -> tuple[str, str] | None:
    """Cross-checks of the training levers (sampling, copy-paste, class balance, schedules, sizes)."""
    for key in ("copy_paste_classes", "crop_keep_classes"):
        unknown = sorted(set(getattr(cfg.augment, key)) - (known - {"background"}))
        if unknown:
            return f"augment.{key}", f"unknown classes {unknown}; known: {list(cfg.data.classes)}"
    if cfg.loss.class_balance_beta and cfg.loss.class_weight_exponent:
        return "loss.class_balance_beta", "set class_balance_beta or class_weight_exponent, not both"
    if cfg.schedule.name == "onecycle" and cfg.schedule.warmup_epochs:
        return "schedule.warmup_epochs", "onecycle warms up by itself (pct_start): leave warmup_epochs at 0"
    sizes, size = cfg.train.progressive_sizes, cfg.model.input_size
    if sizes and size is not None and sizes[-1] != size:
        return "train.progressive_sizes", f"the last size must be model.input_size ({size}), got {sizes[-1]}"
    return None


def config_error(e: ValidationError, path: str | Path | None, text: str = "") -> ConfigError:
    """The first error of a pydantic validation as a ConfigError naming the key, the file and the line."""
    err = e.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc) if loc else None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and err["type"] not in ("value_error",):
        msg = f"{msg} (got {err['input']!r})"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return ConfigError(msg + more, path, key, _line_of(text, loc))


def validate(data: dict[str, Any], path: str | Path | None = None, text: str = "") -> ExperimentConfig:
    """Validate a config dict; the first error names the key, the file and the line."""
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise config_error(e, path, text) from None
    problem = _cross_checks(cfg)
    if problem is None:
        return cfg
    key, msg = problem
    raise ConfigError(msg, path, key, _line_of(text, tuple(key.split("."))))


def read_toml(path: str | Path, what: str = "config file") -> tuple[dict[str, Any], str]:
    """A TOML file's data and text; a missing file or a syntax error is a ConfigError with its line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found", path)
    text = path.read_text()
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path, None, toml_error_line(e, text)) from None


#: Config keys that name a file or folder: a relative one is relative to the config file that says it.
PATH_KEYS = ("data.root", "model.init_checkpoint")


def read_config(path: str | Path, what: str = "config file") -> tuple[dict[str, Any], str]:
    """An experiment TOML's data with its relative paths re-expressed from the working directory, and its
    experiment named after the file (``experiments/x.toml`` logs into ``x``) when it names none."""
    data, text = read_toml(path, what)
    rebase_paths(data, Path(path).parent, Path.cwd())
    experiment = data.setdefault("experiment", {})
    if isinstance(experiment, dict):
        experiment.setdefault("name", Path(path).stem)
    return data, text


def rebase_paths(data: dict[str, Any], src_dir: str | Path, dst_dir: str | Path) -> dict[str, Any]:
    """The relative :data:`PATH_KEYS` of ``data``, written from ``src_dir``, re-expressed from ``dst_dir`` (so a
    config can be read from any working directory, and a config written elsewhere still points at its data)."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = data.get(section)
        value = node.get(name) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            target = os.path.normpath(os.path.join(os.path.abspath(src_dir), value))
            node[name] = os.path.relpath(target, os.path.abspath(dst_dir))  # type: ignore[index]
    return data


def load_config(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment TOML (``--set`` paths stay relative to the working
    directory: only the file's own paths are relative to the file)."""
    data, text = read_config(path)
    apply_overrides(data, overrides)
    return validate(data, path, text)


def toml_error_line(e: tomllib.TOMLDecodeError, text: str) -> int | None:
    """The line of a TOML syntax error (Python 3.11 keeps it only in the message)."""
    if getattr(e, "lineno", None):
        return e.lineno  # type: ignore[attr-defined]
    m = re.search(r"at line (\d+)", str(e))
    if m:
        return int(m.group(1))
    return text.count("\n") + 1 if "end of document" in str(e) else None


def dump_toml(d: Mapping[str, Any]) -> str:
    """A resolved config as TOML (``tomli-w``): top-level scalars first, then one table per section."""
    import tomli_w

    return tomli_w.dumps(_toml_ready(d))


def _toml_ready(v: Any) -> Any:
    """JSON-like values TOML can hold: None dropped from tables, tuples as lists."""
    if isinstance(v, Mapping):
        return {str(k): _toml_ready(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_toml_ready(x) for x in v]
    return v
