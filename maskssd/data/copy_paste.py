"""Copy-paste of rare-class faces (a dataset-level augmentation; cf. Ghiasi et al., 2021, with boxes).

A bank of face crops (each face of the chosen classes with a small margin) is built once from the training
annotations. A training sample is then given, with probability ``p``, up to ``max_faces`` faces from the bank:
each scaled by a random factor, flipped at random, and pasted at a random place where its box overlaps no
existing box much (IoU < ``max_iou``) and its patch covers at most ``max_cover`` of any existing box. The
pasted boxes and labels are added to the sample. ``blend="feather"`` fades each crop's margin into the
image instead of pasting a rectangle with hard edges. It runs on the raw sample, before the SSD augmentation, and
draws from the sample's seed only (:meth:`maskssd.data.dataset.FaceMaskDataset.__getitem__`), so a sample is
the same in every worker, rank and resumed run; it leaves the torch RNG (the transform's) untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maskssd.data.dataset import FaceMaskDataset, Sample

__all__ = ["CopyPaste", "FaceCrop", "build_face_bank", "feathered"]


@dataclass(frozen=True)
class FaceCrop:
    """One face with its margin: ``pixels`` (3, h, w) uint8; ``box`` the face in the crop's pixels (xyxy)."""

    pixels: torch.Tensor
    box: tuple[float, float, float, float]
    label: int
    difficult: bool
    source: str  # the image id it was cut from


def build_face_bank(
    dataset: FaceMaskDataset, labels: Sequence[int], margin: float = 0.1, min_size: float = 2.0
) -> list[FaceCrop]:
    """Crops of every face whose label is in ``labels`` (1-based), with ``margin`` x its size on each side
    (clipped to the image); faces under ``min_size`` pixels are left out. Reads each image once."""
    wanted = set(int(c) for c in labels)
    bank: list[FaceCrop] = []
    for i, ann in enumerate(dataset.annotations):
        picks = [k for k, c in enumerate(ann.labels.tolist()) if c in wanted]
        if not picks:
            continue
        img = dataset._image_tensor(i)
        h, w = img.shape[-2:]
        for k in picks:
            x1, y1, x2, y2 = (float(v) for v in ann.boxes[k])
            bw, bh = x2 - x1, y2 - y1
            if bw < min_size or bh < min_size:
                continue
            cx1, cy1 = max(0, math.floor(x1 - margin * bw)), max(0, math.floor(y1 - margin * bh))
            cx2, cy2 = min(w, math.ceil(x2 + margin * bw)), min(h, math.ceil(y2 + margin * bh))
            bank.append(
                FaceCrop(
                    img[:, cy1:cy2, cx1:cx2].clone(),
                    (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1),
                    int(ann.labels[k]),
                    bool(ann.difficult[k]),
                    ann.image_id,
                )
            )
    return bank


def feathered(patch: torch.Tensor, under: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """``patch`` blended into ``under`` (both (3, h, w) uint8): opaque over the face ``box`` (patch pixels),
    its margin fading linearly to the image at the patch's edges, so no hard seam is left to learn."""
    h, w = patch.shape[-2:]
    x1, y1, x2, y2 = box
    xs, ys = torch.arange(w, dtype=torch.float32) + 0.5, torch.arange(h, dtype=torch.float32) + 0.5

    def ramp(v: torch.Tensor, lo: float, hi: float, size: int) -> torch.Tensor:
        left = (v / max(lo, 1.0)).clamp(max=1.0)  # 0 at the patch edge, 1 at the face
        right = ((size - v) / max(size - hi, 1.0)).clamp(max=1.0)
        return torch.minimum(left, right).clamp(min=0.0)

    alpha = ramp(ys, y1, y2, h)[:, None] * ramp(xs, x1, x2, w)[None, :]
    mixed = alpha * patch.float() + (1.0 - alpha) * under.float()
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def _fits(box: np.ndarray, patch: np.ndarray, boxes: np.ndarray, max_iou: float, max_cover: float) -> bool:
    """``box`` overlaps every one of ``boxes`` by IoU < max_iou, and ``patch`` covers <= max_cover of each."""
    if boxes.shape[0] == 0:
        return True
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def inter(r: np.ndarray) -> np.ndarray:
        iw = np.clip(np.minimum(r[2], boxes[:, 2]) - np.maximum(r[0], boxes[:, 0]), 0, None)
        ih = np.clip(np.minimum(r[3], boxes[:, 3]) - np.maximum(r[1], boxes[:, 1]), 0, None)
        return iw * ih

    i = inter(box)
    iou = i / np.maximum((box[2] - box[0]) * (box[3] - box[1]) + area - i, 1e-9)
    cover = inter(patch) / np.maximum(area, 1e-9)
    return bool((iou < max_iou).all() and (cover <= max_cover).all())


class CopyPaste:
    """``(raw sample, seed) -> sample`` with faces from ``bank`` pasted in (see the module docstring)."""

    def __init__(
        self,
        bank: Sequence[FaceCrop],
        p: float,
        max_faces: int = 2,
        scale: tuple[float, float] = (0.8, 1.25),
        flip_p: float = 0.5,
        max_iou: float = 0.1,
        max_cover: float = 0.3,
        tries: int = 10,
        blend: str = "hard",
    ):
        if not bank:
            raise ValueError("copy-paste needs at least one face in its bank")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be 0 < low <= high, got {scale}")
        self.bank, self.p, self.max_faces, self.scale = list(bank), p, max_faces, scale
        self.flip_p, self.max_iou, self.max_cover, self.tries = flip_p, max_iou, max_cover, tries
        if blend not in ("hard", "feather"):
            raise ValueError(f"blend must be 'hard' or 'feather', got {blend!r}")
        self.blend = blend

    def _patch(self, crop: FaceCrop, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """The crop scaled and maybe flipped, and its face box in the patch's pixels."""
        from torchvision.transforms.v2 import functional as F

        h, w = crop.pixels.shape[-2:]
        s = rng.uniform(*self.scale)
        ph, pw = max(1, round(h * s)), max(1, round(w * s))
        pixels = crop.pixels
        if (ph, pw) != (h, w):
            pixels = F.resize(pixels, [ph, pw], antialias=True)
        x1, y1, x2, y2 = crop.box
        box = np.array([x1 * pw / w, y1 * ph / h, x2 * pw / w, y2 * ph / h])
        if rng.random() < self.flip_p:
            pixels = pixels.flip(-1)
            box = np.array([pw - box[2], box[1], pw - box[0], box[3]])
        return pixels, box

    def __call__(self, sample: Sample, seed: int) -> Sample:
        rng = np.random.default_rng([int(seed) % (2**63), 0xC0B1])
        if self.p <= 0 or rng.random() >= self.p:
            return sample
        from torchvision import tv_tensors

        image = sample["image"].as_subclass(torch.Tensor)
        H, W = image.shape[-2:]
        boxes = sample["boxes"].as_subclass(torch.Tensor).numpy().astype(np.float64).reshape(-1, 4)
        added: list[tuple[np.ndarray, FaceCrop]] = []
        out = None
        for _ in range(int(rng.integers(1, self.max_faces + 1))):
            crop = self.bank[int(rng.integers(len(self.bank)))]
            pixels, box = self._patch(crop, rng)
            ph, pw = pixels.shape[-2:]
            if ph > H or pw > W:
                continue
            for _ in range(self.tries):
                ox, oy = int(rng.integers(0, W - pw + 1)), int(rng.integers(0, H - ph + 1))
                placed = box + [ox, oy, ox, oy]
                if _fits(placed, np.array([ox, oy, ox + pw, oy + ph]), boxes, self.max_iou, self.max_cover):
                    out = image.clone() if out is None else out
                    region = out[:, oy : oy + ph, ox : ox + pw]
                    region.copy_(pixels if self.blend == "hard" else feathered(pixels, region, box))
                    boxes = np.concatenate([boxes, placed[None]])
                    added.append((placed, crop))
                    break
        if not added:
            return sample
        res = dict(sample)
        res["image"] = tv_tensors.Image(out)
        res["boxes"] = tv_tensors.BoundingBoxes(
            torch.from_numpy(boxes.astype(np.float32)), format="XYXY", canvas_size=(H, W)
        )
        res["labels"] = torch.cat([sample["labels"], torch.tensor([c.label for _, c in added])])
        res["difficult"] = torch.cat(
            [sample["difficult"], torch.tensor([c.difficult for _, c in added], dtype=torch.bool)]
        )
        return res
