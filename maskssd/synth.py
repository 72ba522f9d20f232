"""Synthetic face-mask scenes: the embedded default dataset for machines without the real one.

:func:`generate` draws cartoon-like "photos" of people and writes them in the Kaggle VOC layout of the
real face-mask dataset (``images/*.png`` + ``annotations/*.xml`` with the same XML structure), plus a
stratified split ``splits/NAME/{train,val,test}.txt`` made with :func:`maskssd.data.stratified_split`.
:func:`ensure_synth` generates only when no complete dataset with the same parameters is there; the
quickstart configs call it on first use.

What a scene looks like
-----------------------
* A background of gradients, low-frequency colour noise and random shapes (shelves, windows,
  furniture, blurred lights), with a floor band sometimes.
* 1-6 people (``faces_per_image``), each a head on a neck and shoulders (sometimes the body is left
  out, as for faces in a crowd). Faces of one image share a scale (a group photo) with some spread; the
  face height is log-uniform in ``face_size`` (fraction of the image height). Faces do not overlap
  (IoU < 0.1) and lie fully inside the image.
* A face: skin-toned head (several skin tones) with ears, hair (short, long, cap, hood or bald),
  eyebrows, eyes, nose, mouth, sometimes a beard or glasses, a small yaw (features shifted to one side)
  and roll (a few degrees). Drawn at 2x (4x for tiny faces) and downscaled: anti-aliased.
* The class decides the mask, drawn like the real ones (surgical light blue/white with pleats, cloth
  black/grey/colour with a seam, or KN95 white), with straps to the ears:

  - ``with_mask`` (``classes[0]``): the mask covers nose *and* mouth, from just below the eyes to the chin;
  - ``without_mask`` (``classes[1]``): no mask; nose and mouth visible;
  - ``mask_weared_incorrect`` (``classes[2]``): the same masks pulled *below the nose* (nose and nostrils
    visible, mouth and chin covered), or in a quarter of the cases down on the chin (mouth visible too).

* The box annotates the face like the real data: forehead (hairline) to chin, ear to ear (the
  visible face for hoods). It is measured on the drawn face, rotation included, in integer pixels.

Classes are drawn per face with ``class_probs`` (by default the real imbalance: 80 / 17 / 3 %).
So that the stratified split can give every split every class, after the scenes are planned each
class with a non-zero probability is made present in at least ``ceil(1 / min(split_ratios))`` images
(7 with the default ratios; fewer if there are fewer images) by relabelling faces of the most frequent
class where chance left it short. :attr:`SynthSummary.forced_faces` counts them: 0 on most seeds with
200 images, a few with 30 (the rarest class is ~3 % of the faces). Classes with probability 0 stay absent.

Everything is deterministic per ``seed`` (``numpy`` Generators seeded from it, no global RNG): same
seed, byte-identical annotations and identical image pixels.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from maskssd.data import DEFAULT_CLASSES, SPLITS, load_annotations, stratified_split, write_split
from maskssd.errors import DataError

#: Bumped whenever the drawing changes, so :func:`ensure_synth` regenerates old datasets.
SYNTH_VERSION = 1
GENERATOR = "maskssd.synth"
MARKER = ".synth.json"
README_TITLE = "# Synthetic face-mask dataset (maskssd.synth)"
PREFIX = "synth_"

# appearance kinds, by class position
_MASK, _NONE, _INCORRECT = 0, 1, 2
_MAX_FACE_IOU = 0.1

RGB = tuple[int, int, int]

_SKIN: tuple[RGB, ...] = (
    (255, 224, 196), (246, 206, 176), (241, 194, 150), (234, 182, 128), (224, 172, 105),
    (198, 134, 66), (170, 110, 70), (141, 85, 36), (110, 70, 45), (92, 58, 36),
)
_HAIR: tuple[RGB, ...] = (
    (18, 15, 14), (28, 22, 20), (45, 30, 22), (70, 45, 28), (100, 68, 40), (150, 110, 65),
    (205, 175, 115), (165, 160, 155), (120, 50, 25),
)
_IRIS: tuple[RGB, ...] = ((50, 32, 20), (80, 55, 35), (60, 95, 140), (75, 110, 70), (25, 20, 18))
_SURGICAL: tuple[RGB, ...] = (
    (160, 205, 235), (140, 192, 228), (190, 222, 240), (238, 240, 242), (225, 232, 236),
    (170, 222, 205), (242, 200, 212),
)
_CLOTH: tuple[RGB, ...] = (
    (26, 26, 30), (35, 35, 40), (95, 95, 100), (130, 130, 135), (35, 45, 90), (200, 182, 150),
    (150, 35, 45), (60, 110, 70), (230, 225, 215),
)
_KN95: tuple[RGB, ...] = ((236, 236, 230), (245, 245, 242), (215, 215, 210))


@dataclass
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    images: int
    boxes: dict[str, int]  # per class name
    split_name: str
    forced_faces: int = 0  # faces relabelled so that every class is in every split
    split_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class _Face:
    box: tuple[float, float, float, float]  # planned face box, pixels xyxy (before the roll)
    kind: int  # class index


@dataclass
class _Plan:
    width: int
    height: int
    faces: list[_Face]


# ---------------------------------------------------------------------------------------- parameters
def _params(n_images: int, seed: int, class_probs: Sequence[float], faces_per_image: tuple[int, int],
            image_size: tuple[int, int], face_size: tuple[float, float], split_name: str,
            split_ratios: Sequence[float], classes: Sequence[str]) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "version": SYNTH_VERSION,
        "n_images": int(n_images),
        "seed": int(seed),
        "class_probs": [float(p) for p in class_probs],
        "faces_per_image": [int(v) for v in faces_per_image],
        "image_size": [int(v) for v in image_size],
        "face_size": [float(v) for v in face_size],
        "split_name": str(split_name),
        "split_ratios": [float(r) for r in split_ratios],
        "classes": [str(c) for c in classes],
    }


def _validate(p: dict[str, Any]) -> None:
    if p["n_images"] < 1:
        raise ValueError(f"n_images must be >= 1, got {p['n_images']}")
    if p["seed"] < 0:
        raise ValueError(f"seed must be >= 0, got {p['seed']}")
    classes = p["classes"]
    if len(classes) not in (2, 3) or len(set(classes)) != len(classes) or not all(classes):
        raise ValueError("classes must be 2 or 3 distinct names (with mask, without mask[, mask worn "
                         f"incorrectly]), got {classes}")
    probs = p["class_probs"]
    if len(probs) != len(classes) or any(not math.isfinite(x) or x < 0 for x in probs) or sum(probs) <= 0:
        raise ValueError(f"class_probs must be {len(classes)} non-negative numbers with a positive sum, "
                         f"got {probs}")
    lo, hi = p["faces_per_image"]
    if not 1 <= lo <= hi <= 50:
        raise ValueError(f"faces_per_image must be (min, max) with 1 <= min <= max <= 50, got {(lo, hi)}")
    lo, hi = p["image_size"]
    if not 64 <= lo <= hi <= 4096:
        raise ValueError(f"image_size must be (min, max) long side with 64 <= min <= max <= 4096, got {(lo, hi)}")
    lo, hi = p["face_size"]
    if not 0 < lo <= hi <= 0.8:
        raise ValueError(f"face_size must be (min, max) fractions with 0 < min <= max <= 0.8, got {(lo, hi)}")
    ratios = p["split_ratios"]
    if len(ratios) != len(SPLITS) or any(r <= 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split_ratios must be {len(SPLITS)} positive numbers summing to 1, got {ratios}")
    name = p["split_name"]
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"split_name must be a plain directory name, got {name!r}")


# -------------------------------------------------------------------------------------------- planning
def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area over the area of ``b``."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((b[2] - b[0]) * (b[3] - b[1]))


def _hair_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """The face box grown by what is drawn around a face (hair, hood)."""
    w, h = box[2] - box[0], box[3] - box[1]
    return (box[0] - 0.15 * w, box[1] - 0.3 * h, box[2] + 0.15 * w, box[3] + 0.05 * h)


def _body_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    w, h = box[2] - box[0], box[3] - box[1]
    cx = (box[0] + box[2]) / 2
    return (cx - 1.25 * w, box[3] - 0.3 * h, cx + 1.25 * w, box[3] + 4.0 * h)


def _plan_image(rng: np.random.Generator, p: dict[str, Any], probs: np.ndarray) -> _Plan:
    lo, hi = p["image_size"]
    long_side = int(rng.integers(lo, hi + 1))
    short_side = max(48, round(long_side * rng.uniform(0.56, 0.9)))
    w, h = (short_side, long_side) if rng.random() < 0.2 else (long_side, short_side)
    k = int(rng.integers(p["faces_per_image"][0], p["faces_per_image"][1] + 1))
    f_lo, f_hi = p["face_size"]
    base = math.exp(rng.uniform(math.log(f_lo), math.log(f_hi)))
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(k):
        for _attempt in range(40):
            frac = float(np.clip(base * math.exp(rng.normal(0.0, 0.25)), f_lo, f_hi))
            fh = max(10.0, frac * h)
            fw = fh * rng.uniform(0.74, 0.9)
            margin = max(2.0, 0.05 * fh)  # room for the roll
            if fw + 2 * margin > w or fh + 2 * margin > h:
                scale = min((w - 2 * margin) / fw, (h - 2 * margin) / fh)
                fw, fh = fw * scale, fh * scale
            x1 = rng.uniform(margin, w - margin - fw)
            y1 = rng.uniform(margin, h - margin - fh)
            box = (x1, y1, x1 + fw, y1 + fh)
            if all(_iou(box, b) < _MAX_FACE_IOU * 0.8 and _overlap(_hair_box(box), b) < 0.2
                   and _overlap(_hair_box(b), box) < 0.2 for b in boxes):
                boxes.append(box)
                break
    kinds = rng.choice(len(probs), size=len(boxes), p=probs)
    faces = [_Face(b, int(c)) for b, c in zip(boxes, kinds, strict=True)]
    faces.sort(key=lambda f: f.box[3] - f.box[1])  # far (small) first, near (large) painted last
    return _Plan(w, h, faces)


def _force_every_class(rng: np.random.Generator, plans: list[_Plan], probs: np.ndarray, need: int) -> int:
    """Relabel faces so each class with p > 0 is in >= ``need`` images (if enough faces). Returns how many."""
    forced = 0
    n_cls = len(probs)
    for c in sorted((c for c in range(n_cls) if probs[c] > 0), key=lambda c: probs[c]):
        while True:
            per_image = [Counter(f.kind for f in plan.faces) for plan in plans]
            image_count = Counter(k for cnt in per_image for k in cnt)
            if image_count[c] >= need:
                break
            candidates = [
                (i, j) for i, plan in enumerate(plans) if c not in per_image[i]
                for j, f in enumerate(plan.faces)
                if per_image[i][f.kind] > 1 or image_count[f.kind] > need
            ]
            if not candidates:
                break
            # prefer relabelling the most frequent class
            top = max(image_count[plans[i].faces[j].kind] for i, j in candidates)
            candidates = [(i, j) for i, j in candidates if image_count[plans[i].faces[j].kind] == top]
            i, j = candidates[int(rng.integers(len(candidates)))]
            plans[i].faces[j].kind = c
            forced += 1
    return forced


# --------------------------------------------------------------------------------------------- drawing
def _clip8(v: float) -> int:
    return 0 if v < 0 else 255 if v > 255 else int(v)


def _jitter(rng: np.random.Generator, color: Sequence[int], amount: float) -> RGB:
    noise = rng.normal(0, amount, 3)
    return (_clip8(color[0] + noise[0]), _clip8(color[1] + noise[1]), _clip8(color[2] + noise[2]))


def _scale(color: Sequence[int], k: float) -> RGB:
    return (_clip8(color[0] * k), _clip8(color[1] * k), _clip8(color[2] * k))


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _random_color(rng: np.random.Generator) -> RGB:
    style = rng.random()
    if style < 0.35:  # muted / indoor
        base = rng.uniform(90, 235)
        return _jitter(rng, (base, base * rng.uniform(0.85, 1.05), base * rng.uniform(0.7, 1.0)), 12)
    if style < 0.55:  # dark
        return _jitter(rng, (rng.uniform(15, 80),) * 3, 15)
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    c1, c2 = np.array(_random_color(rng), np.float32), np.array(_random_color(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :] * math.cos(angle)
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None] * math.sin(angle)
    t = xs + ys
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    arr = c1 + t[..., None] * (c2 - c1)
    # low-frequency colour blotches
    gw, gh = int(rng.integers(3, 12)), int(rng.integers(3, 10))
    blot = rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)
    blot_img = Image.fromarray(blot, "RGB").resize((w, h), Image.BICUBIC)
    arr += (np.asarray(blot_img, np.float32) - 128.0) * rng.uniform(0.05, 0.35)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img, "RGBA")
    if rng.random() < 0.5:  # floor
        y0 = rng.uniform(0.55, 0.85) * h
        d.rectangle((0, y0, w, h), fill=_random_color(rng) + (int(rng.integers(150, 256)),))
    for _ in range(int(rng.integers(3, 16))):
        kind = rng.random()
        col = _random_color(rng)
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        bw, bh = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.6) * h
        if kind < 0.35:  # shelves, cupboards, windows, doors
            d.rectangle((x0, y0, x0 + bw, y0 + bh), fill=col,
                        outline=_scale(col, 0.6) if rng.random() < 0.5 else None, width=int(rng.integers(1, 4)))
            if rng.random() < 0.5:
                n = int(rng.integers(1, 5))
                for s in range(1, n + 1):
                    yy = y0 + bh * s / (n + 1)
                    d.line((x0, yy, x0 + bw, yy), fill=_scale(col, 0.55), width=max(1, int(bh * 0.03)))
                    for _item in range(int(rng.integers(0, 5))):  # things on the shelf
                        ix = x0 + rng.uniform(0, 0.9) * bw
                        iw, ih = rng.uniform(0.03, 0.12) * bw, rng.uniform(0.05, 0.8) * bh / (n + 1)
                        d.rectangle((ix, yy - ih, ix + iw, yy), fill=_random_color(rng))
        elif kind < 0.55:
            d.ellipse((x0, y0, x0 + bw, y0 + bh), fill=col)
        elif kind < 0.7:
            pts = [(x0 + rng.uniform(0, 1) * bw, y0 + rng.uniform(0, 1) * bh) for _ in range(int(rng.integers(3, 7)))]
            d.polygon(pts, fill=col)
        elif kind < 0.85:
            d.line((x0, y0, x0 + rng.uniform(-1, 1) * bw, y0 + rng.uniform(-1, 1) * bh), fill=col,
                   width=int(rng.integers(2, 12)))
        else:  # out-of-focus lights
            for _light in range(int(rng.integers(3, 10))):
                r = rng.uniform(0.01, 0.05) * w
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
                d.ellipse((cx - r, cy - r, cx + r, cy + r),
                          fill=_jitter(rng, (250, 235, 200), 20) + (int(rng.integers(60, 160)),))
    if rng.random() < 0.6:
        img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.5, 2.5))))
    return img


@dataclass
class _Look:
    """Everything random about one person, drawn before anything is painted."""

    skin: RGB
    hair: RGB
    hair_style: str  # bald, short, long, cap, hood
    hairline: float
    hood: RGB
    cap: RGB
    iris: RGB
    yaw: float
    roll: float
    eye_y: float
    nose_len: float
    mouth_gap: float
    mouth_style: str
    beard: bool
    glasses: bool
    glasses_color: RGB
    mask_type: str  # surgical, cloth, kn95
    mask: RGB
    strap: RGB
    incorrect_style: str  # nose, chin
    mask_top: float
    mask_bottom: float
    body: bool
    clothes: RGB
    shade: float


def _look(rng: np.random.Generator, kind: int) -> _Look:
    skin = _jitter(rng, _SKIN[int(rng.integers(len(_SKIN)))], 6)
    hair = _jitter(rng, _HAIR[int(rng.integers(len(_HAIR)))], 6)
    hair_style = str(rng.choice(["bald", "short", "long", "cap", "hood"], p=[0.08, 0.47, 0.3, 0.08, 0.07]))
    mask_type = str(rng.choice(["surgical", "cloth", "kn95"], p=[0.6, 0.3, 0.1]))
    if mask_type == "surgical":
        mask = _jitter(rng, _SURGICAL[int(rng.integers(len(_SURGICAL)))], 5)
        strap = _jitter(rng, (240, 240, 240), 5)
    elif mask_type == "cloth":
        mask = _jitter(rng, _CLOTH[int(rng.integers(len(_CLOTH)))], 8)
        strap = _scale(mask, 0.85)
    else:
        mask = _jitter(rng, _KN95[int(rng.integers(len(_KN95)))], 4)
        strap = _jitter(rng, (235, 235, 235), 5)
    eye_y = rng.uniform(0.38, 0.43)
    nose_len = rng.uniform(0.18, 0.22)
    mouth_gap = rng.uniform(0.11, 0.15)
    incorrect_style = "chin" if rng.random() < 0.25 else "nose"
    nose_y = eye_y + nose_len
    if kind == _MASK:
        top, bottom = eye_y + rng.uniform(0.075, 0.11), rng.uniform(0.96, 1.04)
    elif kind == _INCORRECT and incorrect_style == "nose":
        top, bottom = nose_y + rng.uniform(0.015, 0.04), rng.uniform(1.05, 1.13)
    else:
        top, bottom = nose_y + mouth_gap + rng.uniform(0.06, 0.09), rng.uniform(1.13, 1.2)
    return _Look(
        skin=skin, hair=hair, hair_style=hair_style, hairline=rng.uniform(0.06, 0.2),
        hood=_random_color(rng), cap=_random_color(rng), iris=_IRIS[int(rng.integers(len(_IRIS)))],
        yaw=float(np.clip(rng.normal(0, 0.3), -0.6, 0.6)), roll=float(np.clip(rng.normal(0, 5), -12, 12)),
        eye_y=eye_y, nose_len=nose_len, mouth_gap=mouth_gap,
        mouth_style=str(rng.choice(["closed", "smile", "open"], p=[0.5, 0.35, 0.15])),
        beard=bool(rng.random() < 0.12), glasses=bool(rng.random() < 0.12),
        glasses_color=_jitter(rng, (30, 30, 30), 20) if rng.random() < 0.7 else _random_color(rng),
        mask_type=mask_type, mask=mask, strap=strap, incorrect_style=incorrect_style,
        mask_top=top, mask_bottom=bottom, body=bool(rng.random() < 0.85), clothes=_random_color(rng),
        shade=rng.uniform(0.0, 0.12),
    )


def _draw_body(d: ImageDraw.ImageDraw, box: tuple[float, float, float, float], look: _Look) -> None:
    x1, y1, x2, y2 = box
    fw, fh = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2
    neck = _scale(look.skin, 0.82)
    d.rectangle((cx - 0.19 * fw, y2 - 0.3 * fh, cx + 0.19 * fw, y2 + 0.45 * fh), fill=neck)
    top = y2 + 0.28 * fh
    half = fw * 1.25
    d.rounded_rectangle((cx - half, top, cx + half, top + 3.5 * fh), radius=max(1.0, 0.45 * fw), fill=look.clothes)
    # collar
    d.polygon([(cx - 0.3 * fw, top), (cx + 0.3 * fw, top), (cx, top + 0.35 * fh)], fill=neck)
    d.line((cx, top + 0.5 * fh, cx, top + 3.5 * fh), fill=_scale(look.clothes, 0.75), width=max(1, int(fw * 0.04)))


class _Patch:
    """A face drawn at ``ss`` x: colour, alpha, and the face region that defines the box."""

    def __init__(self, fw: float, fh: float, ss: int):
        self.ss = ss
        self.U, self.V = fw * ss, fh * ss
        # the face box spans u, v in [0, 1]; the patch spans u in [-0.45, 1.45], v in [-0.5, 1.5]
        self.ox = ss * math.ceil(0.45 * fw)
        self.oy = ss * math.ceil(0.5 * fh)
        W = self.ox + ss * math.ceil(1.45 * fw)
        H = self.oy + ss * math.ceil(1.5 * fh)
        self.vis = Image.new("RGB", (W, H))
        self.alpha = Image.new("L", (W, H), 0)
        self.region = Image.new("L", (W, H), 0)
        self.dv = ImageDraw.Draw(self.vis, "RGBA")
        self.da = ImageDraw.Draw(self.alpha)
        self.dr = ImageDraw.Draw(self.region)

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return (self.ox + u * self.U, self.oy + v * self.V)

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        x0, y0 = self.pt(min(u0, u1), min(v0, v1))
        x1, y1 = self.pt(max(u0, u1), max(v0, v1))
        return (x0, y0, x1, y1)

    def w(self, frac: float) -> int:
        """A line width of ``frac`` of the face height (at least one patch pixel)."""
        return max(1, int(round(frac * self.V)))

    # shapes: ``solid`` also marks alpha (the shape may leave the head's silhouette)
    def ellipse(self, u0, v0, u1, v1, fill, solid=False, outline=None, width=1, region=False) -> None:
        r = self.rect(u0, v0, u1, v1)
        self.dv.ellipse(r, fill=fill, outline=outline, width=width)
        if solid:
            self.da.ellipse(r, fill=255)
        if region:
            self.dr.ellipse(r, fill=255)

    def chord(self, u0, v0, u1, v1, start, end, fill, solid=False) -> None:
        r = self.rect(u0, v0, u1, v1)
        self.dv.chord(r, start, end, fill=fill)
        if solid:
            self.da.chord(r, start, end, fill=255)

    def polygon(self, pts, fill, solid=False, outline=None, width=1) -> None:
        xy = [self.pt(u, v) for u, v in pts]
        self.dv.polygon(xy, fill=fill, outline=outline, width=width)
        if solid:
            self.da.polygon(xy, fill=255)

    def line(self, pts, fill, width, solid=False) -> None:
        xy = [self.pt(u, v) for u, v in pts]
        self.dv.line(xy, fill=fill, width=width, joint="curve")
        if solid:
            self.da.line(xy, fill=255, width=width, joint="curve")

    def rounded(self, u0, v0, u1, v1, radius, fill, solid=False) -> None:
        r = self.rect(u0, v0, u1, v1)
        self.dv.rounded_rectangle(r, radius=radius * self.U, fill=fill)
        if solid:
            self.da.rounded_rectangle(r, radius=radius * self.U, fill=255)


def _head_halfwidth(v: float) -> float:
    """Half-width (in face widths) of the head ellipse (u 0.06..0.94, v -0.15..1.0) at height ``v``."""
    t = (v - 0.425) / 0.575
    return 0.44 * math.sqrt(max(0.0, 1.0 - t * t))


def _draw_mask(p: _Patch, look: _Look, cx: float) -> None:
    top, bottom = look.mask_top, look.mask_bottom
    mh = bottom - top
    half = max(_head_halfwidth(top), 0.3) + 0.03
    lower_v = top + 0.62 * mh
    lower_half = max(_head_halfwidth(min(lower_v, 0.97)), 0.24) + 0.03
    peak = 0.035 if look.mask_top < look.eye_y + 0.15 else 0.01  # over the nose
    outline = _scale(look.mask, 0.78)
    ear_y = look.eye_y + 0.06
    lw = p.w(0.022)
    # straps to the ears (drawn first: the mask covers their ends)
    for side in (-1, 1):
        ear_u = 0.5 + side * 0.47
        p.line([(cx + side * half, top + 0.05), (ear_u, ear_y)], look.strap, lw, solid=True)
        p.line([(cx + side * lower_half, lower_v), (ear_u - side * 0.01, ear_y + 0.13)], look.strap, lw, solid=True)
    if look.mask_type == "kn95":
        pts = [(cx - half, top + 0.07), (cx, top - peak), (cx + half, top + 0.07),
               (cx + lower_half, lower_v), (cx + 0.12, bottom - 0.04), (cx, bottom),
               (cx - 0.12, bottom - 0.04), (cx - lower_half, lower_v)]
    else:
        pts = [(cx - half, top + 0.04), (cx - half * 0.5, top), (cx, top - peak), (cx + half * 0.5, top),
               (cx + half, top + 0.04), (cx + lower_half, lower_v), (cx + lower_half * 0.75, bottom - 0.07),
               (cx + 0.12, bottom - 0.015), (cx, bottom), (cx - 0.12, bottom - 0.015),
               (cx - lower_half * 0.75, bottom - 0.07), (cx - lower_half, lower_v)]
    p.polygon(pts, look.mask, solid=True, outline=outline, width=p.w(0.012))
    if look.mask_type == "surgical":
        pleat = _scale(look.mask, 0.82) + (200,)
        for k in (0.28, 0.5, 0.72):
            v = top + k * mh * 0.85
            hw = half + (lower_half - half) * min(1.0, (v - top) / (lower_v - top))
            p.line([(cx - hw + 0.02, v), (cx + hw - 0.02, v + 0.005)], pleat, p.w(0.013))
        p.line([(cx - 0.12, top + 0.015), (cx + 0.12, top + 0.015)], _scale(look.mask, 0.7), p.w(0.012))
    elif look.mask_type == "cloth":
        p.line([(cx, top - peak + 0.01), (cx, bottom - 0.01)], _scale(look.mask, 0.7), p.w(0.012))
    else:
        p.line([(cx, top - peak + 0.01), (cx, bottom - 0.01)], _scale(look.mask, 0.8), p.w(0.01))
        p.polygon([(cx, top - peak), (cx + half, top + 0.07), (cx + lower_half, lower_v), (cx, bottom)],
                  (0, 0, 0, 22))


def _draw_face(look: _Look, kind: int, fw: float, fh: float, ss: int) -> _Patch:
    p = _Patch(fw, fh, ss)
    skin, hair = look.skin, look.hair
    yaw = look.yaw
    cx = 0.5 + 0.1 * yaw
    eye_y, nose_y = look.eye_y, look.eye_y + look.nose_len
    mouth_y = nose_y + look.mouth_gap
    hood = look.hair_style == "hood"

    # behind the head
    if hood:
        p.ellipse(-0.14, -0.32, 1.14, 1.22, look.hood, solid=True)
    if look.hair_style == "long":
        p.rounded(-0.04, -0.1, 1.04, 1.3, 0.35, hair, solid=True)
    # ears
    if not hood:
        ear = _scale(skin, 0.93)
        lw_ear = 0.12 * min(1.3, max(0.3, 1 + 0.6 * yaw))  # the far ear hides behind the cheek
        rw_ear = 0.12 * min(1.3, max(0.3, 1 - 0.6 * yaw))
        p.ellipse(0.12 - lw_ear, eye_y - 0.04, 0.16, eye_y + 0.2, ear, solid=True, region=True)
        p.ellipse(0.84, eye_y - 0.04, 0.88 + rw_ear, eye_y + 0.2, ear, solid=True, region=True)
        p.ellipse(0.12 - lw_ear * 0.6, eye_y, 0.12, eye_y + 0.15, _scale(skin, 0.8))
        p.ellipse(0.88, eye_y, 0.88 + rw_ear * 0.6, eye_y + 0.15, _scale(skin, 0.8))
    # head
    if hood:
        p.ellipse(0.1, 0.02, 0.9, 1.0, skin, solid=True, region=True)
    else:
        p.ellipse(0.06, -0.15, 0.94, 1.0, skin, solid=True, region=True)
    if look.shade > 0:  # light from one side
        shade = (0, 0, 0, int(255 * look.shade))
        if yaw >= 0:
            p.chord(0.06, -0.15, 0.94, 1.0, 115, 245, shade)
        else:
            p.chord(0.06, -0.15, 0.94, 1.0, 295, 65, shade)
    # hair on top
    hl = look.hairline
    if look.hair_style in ("short", "long"):
        p.chord(0.02, -0.24, 0.98, 2 * hl + 0.24, 180, 360, hair, solid=True)
        p.ellipse(0.04, hl - 0.05, 0.16, eye_y - 0.02, hair)  # temples
        p.ellipse(0.84, hl - 0.05, 0.96, eye_y - 0.02, hair)
        p.ellipse(0.2 + 0.1 * yaw, hl - 0.06, 0.8 + 0.1 * yaw, hl + 0.06, hair)  # fringe
    elif look.hair_style == "cap":
        p.chord(0.02, -0.3, 0.98, 0.3, 180, 360, look.cap, solid=True)
        p.rounded(0.06 + 0.08 * yaw, -0.03, 0.94 + 0.08 * yaw, 0.07, 0.04, _scale(look.cap, 0.75), solid=True)
    # clip the face region to the forehead (v >= 0): the box goes forehead to chin, ear to ear
    p.dr.rectangle((0, 0, p.region.width, p.oy - 1), fill=0)

    # beard (hidden under a mask where there is one)
    if look.beard:
        p.chord(0.1, 0.45, 0.9, 1.03, 0, 180, hair + (235,))
        p.ellipse(cx - 0.16, nose_y + 0.02, cx + 0.16, nose_y + 0.08, hair)
    # eyebrows and eyes
    dx = 0.18 * (1 - 0.2 * abs(yaw))
    brow = _scale(hair, 0.9) if look.hair_style != "bald" else _scale(skin, 0.45)
    for side in (-1, 1):
        ex = cx + side * dx
        p.line([(ex - side * 0.09, eye_y - 0.065), (ex, eye_y - 0.09), (ex + side * 0.08, eye_y - 0.07)],
               brow, p.w(0.03))
        p.ellipse(ex - 0.075, eye_y - 0.035, ex + 0.075, eye_y + 0.035, (240, 238, 232))
        ix = ex + 0.02 * yaw
        p.ellipse(ix - 0.037, eye_y - 0.035, ix + 0.037, eye_y + 0.035, look.iris)
        p.ellipse(ix - 0.016, eye_y - 0.016, ix + 0.016, eye_y + 0.016, (10, 10, 10))
        p.line([(ex - 0.08, eye_y - 0.03), (ex + 0.08, eye_y - 0.03)], _scale(skin, 0.55), p.w(0.01))
        if look.glasses:
            p.ellipse(ex - 0.12, eye_y - 0.08, ex + 0.12, eye_y + 0.08, None, outline=look.glasses_color,
                      width=p.w(0.02))
    if look.glasses:
        p.line([(cx - dx + 0.12, eye_y - 0.01), (cx + dx - 0.12, eye_y - 0.01)], look.glasses_color, p.w(0.02))
        p.line([(cx - dx - 0.12, eye_y - 0.01), (0.08, eye_y)], look.glasses_color, p.w(0.02))
        p.line([(cx + dx + 0.12, eye_y - 0.01), (0.92, eye_y)], look.glasses_color, p.w(0.02))
    # nose
    tip = cx + 0.035 * yaw
    nose_dark = _scale(skin, 0.8)
    p.polygon([(cx, eye_y + 0.02), (tip - 0.075, nose_y), (tip + 0.075, nose_y)], _scale(skin, 0.9))
    p.line([(cx + 0.03 * (1 if yaw >= 0 else -1), eye_y + 0.03), (tip + 0.05 * (1 if yaw >= 0 else -1), nose_y - 0.02)],
           nose_dark, p.w(0.014))
    p.ellipse(tip - 0.085, nose_y - 0.04, tip + 0.085, nose_y + 0.015, _scale(skin, 0.92))
    for side in (-1, 1):
        p.ellipse(tip + side * 0.045 - 0.022, nose_y - 0.015, tip + side * 0.045 + 0.022, nose_y + 0.01,
                  _scale(skin, 0.45))
    # mouth
    lips = _mix(skin, (175, 60, 65), 0.45)
    mx = cx + 0.03 * yaw
    if look.mouth_style == "open":
        p.ellipse(mx - 0.11, mouth_y - 0.035, mx + 0.11, mouth_y + 0.05, lips)
        p.ellipse(mx - 0.08, mouth_y - 0.015, mx + 0.08, mouth_y + 0.03, (60, 20, 25))
    elif look.mouth_style == "smile":
        p.chord(mx - 0.13, mouth_y - 0.06, mx + 0.13, mouth_y + 0.05, 0, 180, lips)
        p.line([(mx - 0.12, mouth_y - 0.005), (mx + 0.12, mouth_y - 0.005)], _scale(lips, 0.55), p.w(0.012))
    else:
        p.ellipse(mx - 0.12, mouth_y - 0.03, mx + 0.12, mouth_y + 0.03, lips)
        p.line([(mx - 0.12, mouth_y), (mx + 0.12, mouth_y)], _scale(lips, 0.55), p.w(0.014))
    # mask
    if kind in (_MASK, _INCORRECT):
        _draw_mask(p, look, cx)
    return p


def _paste_face(img: Image.Image, p: _Patch, look: _Look, box: tuple[float, float, float, float]
                ) -> tuple[int, int, int, int] | None:
    """Composite the patch onto ``img`` at the face box; return the drawn face's box (image pixels)."""
    ss = p.ss
    vis, alpha, region = p.vis, p.alpha, p.region
    ox, oy = p.ox, p.oy
    # only the drawn part of the patch (plus room for the roll) is worth rotating and compositing
    bbox = alpha.getbbox()
    if bbox is None:
        return None
    rolled = abs(look.roll) > 0.5
    m = int(0.25 * max(bbox[2] - bbox[0], bbox[3] - bbox[1])) + ss if rolled else ss
    left, top = max(0, (bbox[0] - m) // ss * ss), max(0, (bbox[1] - m) // ss * ss)
    right, bottom = min(vis.width, -(-(bbox[2] + m) // ss) * ss), min(vis.height, -(-(bbox[3] + m) // ss) * ss)
    cut = (left, top, right, bottom)
    vis, alpha, region = vis.crop(cut), alpha.crop(cut), region.crop(cut)
    ox, oy = ox - left, oy - top
    if rolled:
        center = (ox + p.U / 2, oy + p.V / 2)
        rgba = vis.convert("RGBA")
        rgba.putalpha(alpha)
        rgba = rgba.rotate(look.roll, Image.BILINEAR, center=center)
        alpha = rgba.getchannel("A")
        vis = rgba.convert("RGB")
        region = region.rotate(look.roll, Image.NEAREST, center=center)
    px = int(round(box[0])) - ox // ss
    py = int(round(box[1])) - oy // ss
    small_w, small_h = vis.width // ss, vis.height // ss
    crop = img.crop((px, py, px + small_w, py + small_h)).resize(vis.size, Image.NEAREST)
    crop.paste(vis, (0, 0), alpha)
    img.paste(crop.reduce(ss), (px, py))
    bbox = region.reduce(ss).point(lambda v: 255 if v >= 128 else 0).getbbox()
    if bbox is None:
        return None
    x1, y1, x2, y2 = bbox[0] + px, bbox[1] + py, bbox[2] + px, bbox[3] + py
    x1, y1 = max(0, x1), max(0, y1)
    x2, y2 = min(img.width, x2), min(img.height, y2)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return (x1, y1, x2, y2)


def _render(plan: _Plan, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, tuple[int, int, int, int]]]]:
    img = _background(rng, plan.width, plan.height)
    looks = [_look(rng, f.kind) for f in plan.faces]
    d = ImageDraw.Draw(img)
    objects = []
    drawn: list[tuple[float, float, float, float]] = []
    for f, look in zip(plan.faces, looks, strict=True):  # far to near: a body never covers a face drawn before it
        if look.body and not any(_overlap(_body_box(f.box), _hair_box(b)) > 0 for b in drawn):
            _draw_body(d, f.box, look)
        fw, fh = f.box[2] - f.box[0], f.box[3] - f.box[1]
        ss = 4 if fh < 28 else 2
        patch = _draw_face(look, f.kind, fw, fh, ss)
        b = _paste_face(img, patch, look, f.box)
        drawn.append(f.box)
        if b is not None:
            objects.append((f.kind, b))
    # camera: colour cast, blur, sensor noise
    arr = np.asarray(img, np.float32)
    gain = rng.uniform(0.85, 1.12) * rng.uniform(0.93, 1.07, 3).astype(np.float32)
    arr = arr * gain + rng.uniform(-12, 12)
    if rng.random() < 0.5:  # noise is what makes a PNG slow to write: half the images only
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(1.0, 5.0)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0))))
    return img, objects


# ---------------------------------------------------------------------------------------------- writing
def _xml(filename: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    lines = [
        "<annotation>",
        "    <folder>images</folder>",
        f"    <filename>{filename}</filename>",
        "    <size>",
        f"        <width>{w}</width>",
        f"        <height>{h}</height>",
        "        <depth>3</depth>",
        "    </size>",
        "    <segmented>0</segmented>",
    ]
    for name, (x1, y1, x2, y2) in objects:
        lines += [
            "    <object>",
            f"        <name>{name}</name>",
            "        <pose>Unspecified</pose>",
            "        <truncated>0</truncated>",
            "        <occluded>0</occluded>",
            "        <difficult>0</difficult>",
            "        <bndbox>",
            f"            <xmin>{x1}</xmin>",
            f"            <ymin>{y1}</ymin>",
            f"            <xmax>{x2}</xmax>",
            f"            <ymax>{y2}</ymax>",
            "        </bndbox>",
            "    </object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def _is_synth_dir(root: Path) -> bool:
    if _read_marker(root) is not None:
        return True
    try:
        with open(root / "README.md", encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == README_TITLE
    except OSError:
        return False


def _readme(p: dict[str, Any], boxes: dict[str, int], forced: int, faces_images: dict[str, int],
            split_sizes: dict[str, int]) -> str:
    counts = "\n".join(f"| `{name}` | {boxes[name]} | {faces_images[name]} |" for name in p["classes"])
    return f"""{README_TITLE}

**Synthetic data, not photographs.** Generated by `maskssd.synth.generate` (generator version
{p['version']}) as the default dataset for machines without the real face-mask dataset: cartoon-like
scenes of people with and without masks, in the same Kaggle VOC layout (`images/`, `annotations/`,
`splits/{p['split_name']}/`). Do not report results on it as results on real data.

- seed: {p['seed']}
- images: {p['n_images']}
- faces: {sum(boxes.values())} ({forced} relabelled so that every class is in every split)
- class probabilities: {', '.join(f'{c}={x:g}' for c, x in zip(p['classes'], p['class_probs'], strict=True))}
- faces per image: {p['faces_per_image'][0]}-{p['faces_per_image'][1]}; image long side:
  {p['image_size'][0]}-{p['image_size'][1]} px; face height: {p['face_size'][0]:g}-{p['face_size'][1]:g}
  of the image height
- split `{p['split_name']}`: ratios {', '.join(f'{r:g}' for r in p['split_ratios'])} (stratified):
  {', '.join(f'{s} {n} images' for s, n in split_sizes.items())}

| class | boxes | images |
|---|---|---|
{counts}

Regenerate with `maskssd.synth.generate` and the parameters recorded in `{MARKER}`, which is
written last and marks the dataset complete.
"""


def generate(
    out: str | Path,
    n_images: int = 200,
    seed: int = 0,
    class_probs: Sequence[float] = (0.80, 0.17, 0.03),
    faces_per_image: tuple[int, int] = (1, 6),
    image_size: tuple[int, int] = (256, 480),
    face_size: tuple[float, float] = (0.06, 0.35),
    split_name: str = "default",
    split_ratios: Sequence[float] = (0.7, 0.15, 0.15),
    classes: Sequence[str] = DEFAULT_CLASSES,
    *,
    workers: int | None = None,
) -> SynthSummary:
    """Write ``n_images`` synthetic scenes to ``out`` (Kaggle VOC layout) with a stratified split.

    ``class_probs`` is per face, by class position (with mask, without mask, mask worn incorrectly).
    Refuses (:class:`DataError`) a non-empty ``out`` that is not a synthetic dataset; an earlier synthetic
    dataset there is overwritten (its extra ``synth_*`` files removed). ``workers`` threads draw and
    save the images (default: the CPU count, at most 4); the output does not depend on it.
    """
    params = _params(n_images, seed, class_probs, faces_per_image, image_size, face_size, split_name,
                     split_ratios, classes)
    _validate(params)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DataError("output path exists and is not a directory", root)
    if root.is_dir() and any(root.iterdir()) and not _is_synth_dir(root):
        raise DataError("refusing to write a synthetic dataset into a non-empty directory that is not one "
                        f"(no {MARKER} or synthetic README.md); choose an empty or new directory", root)
    probs = np.asarray(params["class_probs"], dtype=np.float64)
    probs = probs / probs.sum()
    classes = params["classes"]

    # plan every scene first (sizes, face boxes, classes), so the class guarantee can be applied
    plan_rng = np.random.default_rng([params["seed"], 0])
    plans = [_plan_image(plan_rng, params, probs) for _ in range(params["n_images"])]
    # the stratified split gives a class to every split once it is in >= 1 / min(ratio) images
    need = min(params["n_images"], math.ceil(1.0 / min(params["split_ratios"]) - 1e-9))
    forced = _force_every_class(plan_rng, plans, probs, need)

    # start: forget completeness, remove what an earlier generation left that this one will not write
    old = _read_marker(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    # the README's first line marks the directory as ours from the start (an interrupted run is redone)
    _write_text(root / "README.md", f"{README_TITLE}\n\nSynthetic data: generation in progress or interrupted.\n")
    images_dir, ann_dir = root / "images", root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"{PREFIX}{i:05d}" for i in range(params["n_images"])]
    keep = set(ids)
    for d, ext in ((images_dir, ".png"), (ann_dir, ".xml")):
        for f in d.glob(f"{PREFIX}*{ext}"):
            if f.stem not in keep:
                f.unlink()
        for f in d.glob(f".{PREFIX}*.tmp"):  # left by an interrupted generation
            f.unlink()
    if old is not None and isinstance(old.get("split_name"), str) and old["split_name"] != split_name:
        old_split = root / "splits" / old["split_name"]
        if old_split.is_dir() and "/" not in old["split_name"] and old["split_name"] not in (".", ".."):
            for s in SPLITS:
                (old_split / f"{s}.txt").unlink(missing_ok=True)
            try:
                old_split.rmdir()
            except OSError:
                pass

    def make(i: int) -> list[str]:
        image_id, plan = ids[i], plans[i]
        img, objects = _render(plan, np.random.default_rng([params["seed"], 1, i]))
        filename = f"{image_id}.png"
        tmp = images_dir / f".{filename}.tmp"
        img.save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, images_dir / filename)
        named = [(classes[k], b) for k, b in objects]
        _write_text(ann_dir / f"{image_id}.xml", _xml(filename, plan.width, plan.height, named))
        return [name for name, _ in named]

    # PIL releases the GIL while encoding, resampling and blurring: two threads use two cores
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_workers = max(1, min(workers, 4, len(ids)))
    drawn: Counter[str] = Counter()  # faces per class, as written
    image_counts: Counter[str] = Counter()  # images holding each class
    if n_workers == 1:
        results = [make(i) for i in range(len(ids))]
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            results = list(pool.map(make, range(len(ids))))
    for names in results:
        drawn.update(names)
        image_counts.update(set(names))

    anns = load_annotations(root, ids, classes)
    per_split = stratified_split(anns, params["split_ratios"], seed=params["seed"], num_classes=len(classes))
    write_split(root, params["split_name"], per_split)
    summary = SynthSummary(root=root, images=len(ids), boxes={c: drawn.get(c, 0) for c in classes},
                           split_name=params["split_name"], forced_faces=forced,
                           split_sizes={s: len(x) for s, x in zip(SPLITS, per_split, strict=True)})
    _write_text(root / "README.md", _readme(params, summary.boxes, forced,
                                            {c: image_counts.get(c, 0) for c in classes}, summary.split_sizes))
    marker = dict(params, boxes=summary.boxes, forced_faces=forced, split_sizes=summary.split_sizes)
    _write_text(root / MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return summary


def _defaults_of(fn: Any) -> dict[str, Any]:
    import inspect

    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if k not in ("out", "n_images", "seed", "split_name", "workers")}


#: The other parameters of :func:`generate` and their defaults (what ``options`` may hold).
_GENERATE_DEFAULTS = _defaults_of(generate)


def is_complete(out: str | Path, n_images: int = 200, seed: int = 0, split_name: str = "default",
                **options: Any) -> bool:
    """True when ``out`` holds a complete synthetic dataset made with these parameters."""
    root = Path(out)
    kwargs = _GENERATE_DEFAULTS | options
    want = _params(n_images, seed, kwargs["class_probs"], kwargs["faces_per_image"], kwargs["image_size"],
                   kwargs["face_size"], split_name, kwargs["split_ratios"], kwargs["classes"])
    marker = _read_marker(root)
    if marker is None or {k: marker.get(k) for k in want} != want:
        return False
    if not all((root / "splits" / split_name / f"{s}.txt").is_file() for s in SPLITS):
        return False
    for i in range(n_images):
        stem = f"{PREFIX}{i:05d}"
        if not (root / "images" / f"{stem}.png").is_file() or not (root / "annotations" / f"{stem}.xml").is_file():
            return False
    return True


def ensure_synth(out: str | Path, n_images: int = 200, seed: int = 0, split_name: str = "default",
                 **options: Any) -> Path:
    """Generate the synthetic dataset at ``out`` unless a complete one with these parameters is there.

    Completeness is the ``.synth.json`` marker (written last, after every image and the split) with the
    same parameters, plus the files it promises; an interrupted generation is redone. ``options`` are
    the other :func:`generate` parameters. Returns ``out`` as a :class:`Path`.
    """
    unknown = set(options) - set(_GENERATE_DEFAULTS) - {"workers"}
    if unknown:
        raise TypeError(f"ensure_synth() got unexpected options: {', '.join(sorted(unknown))}")
    root = Path(out)
    if not is_complete(root, n_images, seed, split_name, **options):
        generate(root, n_images=n_images, seed=seed, split_name=split_name, **options)
    return root
