"""Drawing synthetic face-mask scenes: people, faces and masks on a background (see :mod:`maskssd.data.synth`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from maskssd.data.synth_style import INCORRECT, MASK, NONE, Look, background, make_look, mix, scale

__all__ = [
    "INCORRECT",
    "MASK",
    "MAX_FACE_IOU",
    "NONE",
    "Face",
    "Plan",
    "body_box",
    "hair_box",
    "iou",
    "overlap",
    "render",
]

MAX_FACE_IOU = 0.1


@dataclass
class Face:
    box: tuple[float, float, float, float]  # planned face box, pixels xyxy (before the roll)
    kind: int  # class index


@dataclass
class Plan:
    width: int
    height: int
    faces: list[Face]


# -------------------------------------------------------------------------------------------- geometry
def iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area over the area of ``b``."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((b[2] - b[0]) * (b[3] - b[1]))


def hair_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """The face box grown by what is drawn around a face (hair, hood)."""
    w, h = box[2] - box[0], box[3] - box[1]
    return (box[0] - 0.15 * w, box[1] - 0.3 * h, box[2] + 0.15 * w, box[3] + 0.05 * h)


def body_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    w, h = box[2] - box[0], box[3] - box[1]
    cx = (box[0] + box[2]) / 2
    return (cx - 1.25 * w, box[3] - 0.3 * h, cx + 1.25 * w, box[3] + 4.0 * h)


# --------------------------------------------------------------------------------------------- drawing
def _draw_body(d: ImageDraw.ImageDraw, box: tuple[float, float, float, float], look: Look) -> None:
    x1, y1, x2, y2 = box
    fw, fh = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2
    neck = scale(look.skin, 0.82)
    d.rectangle((cx - 0.19 * fw, y2 - 0.3 * fh, cx + 0.19 * fw, y2 + 0.45 * fh), fill=neck)
    top = y2 + 0.28 * fh
    half = fw * 1.25
    d.rounded_rectangle(
        (cx - half, top, cx + half, top + 3.5 * fh), radius=max(1.0, 0.45 * fw), fill=look.clothes
    )
    # collar
    d.polygon([(cx - 0.3 * fw, top), (cx + 0.3 * fw, top), (cx, top + 0.35 * fh)], fill=neck)
    d.line(
        (cx, top + 0.5 * fh, cx, top + 3.5 * fh),
        fill=scale(look.clothes, 0.75),
        width=max(1, int(fw * 0.04)),
    )


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


def _draw_mask(p: _Patch, look: Look, cx: float) -> None:
    top, bottom = look.mask_top, look.mask_bottom
    mh = bottom - top
    half = max(_head_halfwidth(top), 0.3) + 0.03
    lower_v = top + 0.62 * mh
    lower_half = max(_head_halfwidth(min(lower_v, 0.97)), 0.24) + 0.03
    peak = 0.035 if look.mask_top < look.eye_y + 0.15 else 0.01  # over the nose
    outline = scale(look.mask, 0.78)
    ear_y = look.eye_y + 0.06
    lw = p.w(0.022)
    # straps to the ears (drawn first: the mask covers their ends)
    for side in (-1, 1):
        ear_u = 0.5 + side * 0.47
        p.line([(cx + side * half, top + 0.05), (ear_u, ear_y)], look.strap, lw, solid=True)
        p.line(
            [(cx + side * lower_half, lower_v), (ear_u - side * 0.01, ear_y + 0.13)],
            look.strap,
            lw,
            solid=True,
        )
    if look.mask_type == "kn95":
        pts = [
            (cx - half, top + 0.07),
            (cx, top - peak),
            (cx + half, top + 0.07),
            (cx + lower_half, lower_v),
            (cx + 0.12, bottom - 0.04),
            (cx, bottom),
            (cx - 0.12, bottom - 0.04),
            (cx - lower_half, lower_v),
        ]
    else:
        pts = [
            (cx - half, top + 0.04),
            (cx - half * 0.5, top),
            (cx, top - peak),
            (cx + half * 0.5, top),
            (cx + half, top + 0.04),
            (cx + lower_half, lower_v),
            (cx + lower_half * 0.75, bottom - 0.07),
            (cx + 0.12, bottom - 0.015),
            (cx, bottom),
            (cx - 0.12, bottom - 0.015),
            (cx - lower_half * 0.75, bottom - 0.07),
            (cx - lower_half, lower_v),
        ]
    p.polygon(pts, look.mask, solid=True, outline=outline, width=p.w(0.012))
    if look.mask_type == "surgical":
        pleat = scale(look.mask, 0.82) + (200,)
        for k in (0.28, 0.5, 0.72):
            v = top + k * mh * 0.85
            hw = half + (lower_half - half) * min(1.0, (v - top) / (lower_v - top))
            p.line([(cx - hw + 0.02, v), (cx + hw - 0.02, v + 0.005)], pleat, p.w(0.013))
        p.line([(cx - 0.12, top + 0.015), (cx + 0.12, top + 0.015)], scale(look.mask, 0.7), p.w(0.012))
    elif look.mask_type == "cloth":
        p.line([(cx, top - peak + 0.01), (cx, bottom - 0.01)], scale(look.mask, 0.7), p.w(0.012))
    else:
        p.line([(cx, top - peak + 0.01), (cx, bottom - 0.01)], scale(look.mask, 0.8), p.w(0.01))
        p.polygon(
            [(cx, top - peak), (cx + half, top + 0.07), (cx + lower_half, lower_v), (cx, bottom)],
            (0, 0, 0, 22),
        )


def _draw_head(p: _Patch, look: Look) -> None:
    """Hood or long hair behind, ears, the head with its shading, hair or cap on top; clipped to the forehead."""
    skin, hair = look.skin, look.hair
    yaw = look.yaw
    eye_y = look.eye_y
    hood = look.hair_style == "hood"

    # behind the head
    if hood:
        p.ellipse(-0.14, -0.32, 1.14, 1.22, look.hood, solid=True)
    if look.hair_style == "long":
        p.rounded(-0.04, -0.1, 1.04, 1.3, 0.35, hair, solid=True)
    # ears
    if not hood:
        ear = scale(skin, 0.93)
        lw_ear = 0.12 * min(1.3, max(0.3, 1 + 0.6 * yaw))  # the far ear hides behind the cheek
        rw_ear = 0.12 * min(1.3, max(0.3, 1 - 0.6 * yaw))
        p.ellipse(0.12 - lw_ear, eye_y - 0.04, 0.16, eye_y + 0.2, ear, solid=True, region=True)
        p.ellipse(0.84, eye_y - 0.04, 0.88 + rw_ear, eye_y + 0.2, ear, solid=True, region=True)
        p.ellipse(0.12 - lw_ear * 0.6, eye_y, 0.12, eye_y + 0.15, scale(skin, 0.8))
        p.ellipse(0.88, eye_y, 0.88 + rw_ear * 0.6, eye_y + 0.15, scale(skin, 0.8))
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
        p.rounded(0.06 + 0.08 * yaw, -0.03, 0.94 + 0.08 * yaw, 0.07, 0.04, scale(look.cap, 0.75), solid=True)
    # clip the face region to the forehead (v >= 0): the box goes forehead to chin, ear to ear
    p.dr.rectangle((0, 0, p.region.width, p.oy - 1), fill=0)


def _draw_features(p: _Patch, look: Look, cx: float, eye_y: float, nose_y: float) -> None:
    """Beard, eyebrows, eyes (and glasses), nose."""
    skin, hair, yaw = look.skin, look.hair, look.yaw
    # beard (hidden under a mask where there is one)
    if look.beard:
        p.chord(0.1, 0.45, 0.9, 1.03, 0, 180, hair + (235,))
        p.ellipse(cx - 0.16, nose_y + 0.02, cx + 0.16, nose_y + 0.08, hair)
    # eyebrows and eyes
    dx = 0.18 * (1 - 0.2 * abs(yaw))
    brow = scale(hair, 0.9) if look.hair_style != "bald" else scale(skin, 0.45)
    for side in (-1, 1):
        ex = cx + side * dx
        p.line(
            [(ex - side * 0.09, eye_y - 0.065), (ex, eye_y - 0.09), (ex + side * 0.08, eye_y - 0.07)],
            brow,
            p.w(0.03),
        )
        p.ellipse(ex - 0.075, eye_y - 0.035, ex + 0.075, eye_y + 0.035, (240, 238, 232))
        ix = ex + 0.02 * yaw
        p.ellipse(ix - 0.037, eye_y - 0.035, ix + 0.037, eye_y + 0.035, look.iris)
        p.ellipse(ix - 0.016, eye_y - 0.016, ix + 0.016, eye_y + 0.016, (10, 10, 10))
        p.line([(ex - 0.08, eye_y - 0.03), (ex + 0.08, eye_y - 0.03)], scale(skin, 0.55), p.w(0.01))
        if look.glasses:
            p.ellipse(
                ex - 0.12,
                eye_y - 0.08,
                ex + 0.12,
                eye_y + 0.08,
                None,
                outline=look.glasses_color,
                width=p.w(0.02),
            )
    if look.glasses:
        p.line(
            [(cx - dx + 0.12, eye_y - 0.01), (cx + dx - 0.12, eye_y - 0.01)], look.glasses_color, p.w(0.02)
        )
        p.line([(cx - dx - 0.12, eye_y - 0.01), (0.08, eye_y)], look.glasses_color, p.w(0.02))
        p.line([(cx + dx + 0.12, eye_y - 0.01), (0.92, eye_y)], look.glasses_color, p.w(0.02))
    # nose
    tip = cx + 0.035 * yaw
    nose_dark = scale(skin, 0.8)
    p.polygon([(cx, eye_y + 0.02), (tip - 0.075, nose_y), (tip + 0.075, nose_y)], scale(skin, 0.9))
    p.line(
        [
            (cx + 0.03 * (1 if yaw >= 0 else -1), eye_y + 0.03),
            (tip + 0.05 * (1 if yaw >= 0 else -1), nose_y - 0.02),
        ],
        nose_dark,
        p.w(0.014),
    )
    p.ellipse(tip - 0.085, nose_y - 0.04, tip + 0.085, nose_y + 0.015, scale(skin, 0.92))
    for side in (-1, 1):
        p.ellipse(
            tip + side * 0.045 - 0.022,
            nose_y - 0.015,
            tip + side * 0.045 + 0.022,
            nose_y + 0.01,
            scale(skin, 0.45),
        )


def _draw_mouth(p: _Patch, look: Look, cx: float, mouth_y: float) -> None:
    skin, yaw = look.skin, look.yaw
    lips = mix(skin, (175, 60, 65), 0.45)
    mx = cx + 0.03 * yaw
    if look.mouth_style == "open":
        p.ellipse(mx - 0.11, mouth_y - 0.035, mx + 0.11, mouth_y + 0.05, lips)
        p.ellipse(mx - 0.08, mouth_y - 0.015, mx + 0.08, mouth_y + 0.03, (60, 20, 25))
    elif look.mouth_style == "smile":
        p.chord(mx - 0.13, mouth_y - 0.06, mx + 0.13, mouth_y + 0.05, 0, 180, lips)
        p.line([(mx - 0.12, mouth_y - 0.005), (mx + 0.12, mouth_y - 0.005)], scale(lips, 0.55), p.w(0.012))
    else:
        p.ellipse(mx - 0.12, mouth_y - 0.03, mx + 0.12, mouth_y + 0.03, lips)
        p.line([(mx - 0.12, mouth_y), (mx + 0.12, mouth_y)], scale(lips, 0.55), p.w(0.014))


def _draw_face(look: Look, kind: int, fw: float, fh: float, ss: int) -> _Patch:
    p = _Patch(fw, fh, ss)
    cx = 0.5 + 0.1 * look.yaw
    eye_y, nose_y = look.eye_y, look.eye_y + look.nose_len
    _draw_head(p, look)
    _draw_features(p, look, cx, eye_y, nose_y)
    _draw_mouth(p, look, cx, nose_y + look.mouth_gap)
    if kind in (MASK, INCORRECT):
        _draw_mask(p, look, cx)
    return p


def _paste_face(
    img: Image.Image, p: _Patch, look: Look, box: tuple[float, float, float, float]
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
    right, bottom = (
        min(vis.width, -(-(bbox[2] + m) // ss) * ss),
        min(vis.height, -(-(bbox[3] + m) // ss) * ss),
    )
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


def render(
    plan: Plan, rng: np.random.Generator
) -> tuple[Image.Image, list[tuple[int, tuple[int, int, int, int]]]]:
    img = background(rng, plan.width, plan.height)
    looks = [make_look(rng, f.kind) for f in plan.faces]
    d = ImageDraw.Draw(img)
    objects = []
    drawn: list[tuple[float, float, float, float]] = []
    for f, look in zip(
        plan.faces, looks, strict=True
    ):  # far to near: a body never covers a face drawn before it
        if look.body and not any(overlap(body_box(f.box), hair_box(b)) > 0 for b in drawn):
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
