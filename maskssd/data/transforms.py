"""SSD data augmentation on ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes``.

Training: photometric distortion, zoom-out expansion, IoU-constrained random crop, horizontal flip,
resize (each switchable, with its probability), as in the SSD paper and the reference paper's code.
Evaluation: resize only. Both end with a float image in [0, 1] and normalised xyxy boxes; the model
applies its own mean/std normalisation, so exported models take plain [0, 1] images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskssd.data import Sample

#: Fill for zoom-out canvases: the ImageNet mean, as in the SSD papers.
IMAGENET_MEAN_UINT8 = (124, 116, 104)


@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities and ranges of the SSD training augmentation (0 switches a step off)."""

    photometric_p: float = 0.5
    zoom_out_p: float = 0.5
    zoom_out_max: float = 4.0
    iou_crop_p: float = 1.0
    hflip_p: float = 0.5
    # with probability crop_keep_p, an image holding a face of crop_keep_labels (1-based) is cropped around
    # one of those faces, kept whole: the rare class seen larger and more often
    crop_keep_p: float = 0.0
    crop_keep_labels: tuple[int, ...] = ()


#: SSD's crop sampler (torchvision's ``RandomIoUCrop`` defaults): minimum IoU options (1.0: keep the image),
#: crop side ranges as a share of the image, aspect-ratio limits, trials per option.
IOU_OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
CROP_SCALE = (0.3, 1.0)
CROP_ASPECT = (0.5, 2.0)
CROP_TRIALS = 40


def sample_iou_crop(
    boxes: torch.Tensor, width: int, height: int, keep: torch.Tensor | None = None
) -> tuple[int, int, int, int, torch.Tensor] | None:
    """An SSD crop ``(left, top, w, h, kept)`` for xyxy pixel ``boxes``, or None (keep the whole image).

    The distribution of torchvision's ``RandomIoUCrop`` (an option drawn at random, then the first of up to 40
    random crops whose aspect ratio is in range, that holds a box centre, and whose IoU with one such box
    reaches the option), with each option's 40 trials drawn and checked as one batch instead of one by one:
    on small faces the high-IoU options rarely succeed, and the Python loop was most of a training sample's
    augmentation time. ``kept`` marks the boxes whose centre lies in the crop. ``keep`` (an xyxy box) must lie
    whole in the crop (a rare face the crop is made around)."""
    from torchvision.ops import box_iou

    boxes = boxes.float()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    lo, hi = CROP_SCALE
    while True:
        min_iou = IOU_OPTIONS[int(torch.randint(0, len(IOU_OPTIONS), (1,)))]
        if min_iou >= 1.0:
            return None
        r = lo + (hi - lo) * torch.rand(CROP_TRIALS, 2)
        new_w, new_h = (width * r[:, 0]).long(), (height * r[:, 1]).long()
        aspect = new_w / new_h.clamp(min=1)
        r = torch.rand(CROP_TRIALS, 2)
        left, top = ((width - new_w) * r[:, 0]).long(), ((height - new_h) * r[:, 1]).long()
        right, bottom = left + new_w, top + new_h
        inside = (
            (left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None])
        )  # (trials, boxes)
        iou = box_iou(torch.stack([left, top, right, bottom], 1).float(), boxes).masked_fill(~inside, -1.0)
        ok = (
            (aspect >= CROP_ASPECT[0])
            & (aspect <= CROP_ASPECT[1])
            & (new_w > 0)
            & (new_h > 0)
            & (iou.amax(1) >= min_iou)
        )
        if keep is not None:
            ok &= (left <= keep[0]) & (top <= keep[1]) & (right >= keep[2]) & (bottom >= keep[3])
        hits = ok.nonzero()
        if len(hits):
            t = int(hits[0, 0])
            return int(left[t]), int(top[t]), int(new_w[t]), int(new_h[t]), inside[t]


class _IoUCropIfBoxes(torch.nn.Module):
    """SSD's IoU-constrained random crop (:func:`sample_iou_crop`) with probability ``p``; boxes whose centre
    falls outside the crop are dropped with their labels, images without boxes are left as they are."""

    def __init__(self, p: float, keep_p: float = 0.0, keep_labels: tuple[int, ...] = ()):
        super().__init__()
        self.p, self.keep_p, self.keep_labels = p, keep_p, tuple(keep_labels)
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_difficult)

    def _anchor(self, sample: Sample) -> torch.Tensor | None:
        """With probability ``keep_p``, one of the sample's faces of ``keep_labels`` (drawn at random)."""
        if self.keep_p <= 0 or not self.keep_labels:
            return None
        held = torch.isin(sample["labels"], torch.tensor(self.keep_labels)).nonzero().squeeze(1)
        if held.numel() == 0 or float(torch.rand(())) >= self.keep_p:
            return None
        k = int(held[int(torch.randint(0, held.numel(), (1,)))])
        return sample["boxes"].as_subclass(torch.Tensor)[k].float()

    def forward(self, sample: Sample) -> Sample:
        if sample["boxes"].shape[0] == 0 or self.p <= 0 or float(torch.rand(())) >= self.p:
            return sample
        h, w = sample["image"].shape[-2:]
        crop = sample_iou_crop(sample["boxes"].as_subclass(torch.Tensor), w, h, self._anchor(sample))
        if crop is None:
            return sample
        left, top, cw, ch, kept = crop
        out = dict(sample)
        out["image"] = v2.functional.crop(sample["image"], top, left, ch, cw)
        boxes = v2.functional.crop(sample["boxes"], top, left, ch, cw)
        boxes[~kept] = 0  # degenerate: removed by the sanitizer with their labels
        out["boxes"] = boxes
        return self.sanitize(out)


def _labels_and_difficult(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    return sample["labels"], sample["difficult"]


class _Finish(torch.nn.Module):
    """uint8 image -> float [0, 1]; pixel boxes -> normalised xyxy (clamped)."""

    def forward(self, sample: Sample) -> Sample:
        img = sample["image"]
        h, w = img.shape[-2:]
        boxes = sample["boxes"].as_subclass(torch.Tensor).float()
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        out = dict(sample)
        out["image"] = tv_tensors.Image(img.float().div_(255.0) if img.dtype == torch.uint8 else img.float())
        out["boxes"] = (boxes / scale).clamp_(0.0, 1.0)
        return out


def train_transform(size: int | tuple[int, int], spec: AugmentSpec = AugmentSpec()) -> v2.Compose:
    """The SSD training pipeline ending at ``size`` (an int gives a square)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    steps: list[torch.nn.Module] = []
    if spec.photometric_p > 0:
        steps.append(v2.RandomPhotometricDistort(p=spec.photometric_p))
    if spec.zoom_out_p > 0 and spec.zoom_out_max > 1:
        steps.append(
            v2.RandomZoomOut(
                fill={tv_tensors.Image: IMAGENET_MEAN_UINT8, "others": 0},
                side_range=(1.0, spec.zoom_out_max),
                p=spec.zoom_out_p,
            )
        )
    if spec.iou_crop_p > 0:
        steps.append(_IoUCropIfBoxes(spec.iou_crop_p, spec.crop_keep_p, spec.crop_keep_labels))
    if spec.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=spec.hflip_p))
    steps += [v2.Resize(hw, antialias=True), _Finish()]
    return v2.Compose(steps)


def eval_transform(size: int | tuple[int, int]) -> v2.Compose:
    """Resize to the model's input, nothing random."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return v2.Compose([v2.Resize(hw, antialias=True), _Finish()])


def to_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 ``(H, W, 3)`` array (RGB) as a ``(3, H, W)`` tensor view (no copy unless it is read-only); a
    ``(3, H, W)`` tensor as it is."""
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.array(image, copy=not image.flags.writeable, order="C")).permute(2, 0, 1)
    return image


def preprocess_images(images: list[torch.Tensor], size: int | tuple[int, int]) -> torch.Tensor:
    """Inference: uint8 (3, H, W) images -> a float batch (N, 3, h, w) in [0, 1], as :func:`eval_transform`.

    The batch keeps the resized images' memory layout: channels_last for views of ``(H, W, 3)`` arrays (camera
    frames), which is what the CPU model runs on, so no further copy is needed."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    out = [v2.functional.resize(img, list(hw), antialias=True)[None] for img in images]
    nhwc = out[0].is_contiguous(memory_format=torch.channels_last) and out[0].shape[1] > 1
    batch = out[0] if len(out) == 1 else torch.cat(out)
    layout = torch.channels_last if nhwc else torch.contiguous_format
    return batch.to(torch.float32, memory_format=layout, copy=True).div_(255.0)
