"""The look of synthetic scenes: palettes (skin, hair, masks), colour helpers, backgrounds, and a person's
randomly drawn appearance (:class:`Look`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# appearance kinds, by class position
MASK, NONE, INCORRECT = 0, 1, 2

RGB = tuple[int, int, int]

SKIN: tuple[RGB, ...] = (
    (255, 224, 196),
    (246, 206, 176),
    (241, 194, 150),
    (234, 182, 128),
    (224, 172, 105),
    (198, 134, 66),
    (170, 110, 70),
    (141, 85, 36),
    (110, 70, 45),
    (92, 58, 36),
)
HAIR: tuple[RGB, ...] = (
    (18, 15, 14),
    (28, 22, 20),
    (45, 30, 22),
    (70, 45, 28),
    (100, 68, 40),
    (150, 110, 65),
    (205, 175, 115),
    (165, 160, 155),
    (120, 50, 25),
)
IRIS: tuple[RGB, ...] = ((50, 32, 20), (80, 55, 35), (60, 95, 140), (75, 110, 70), (25, 20, 18))
SURGICAL: tuple[RGB, ...] = (
    (160, 205, 235),
    (140, 192, 228),
    (190, 222, 240),
    (238, 240, 242),
    (225, 232, 236),
    (170, 222, 205),
    (242, 200, 212),
)
CLOTH: tuple[RGB, ...] = (
    (26, 26, 30),
    (35, 35, 40),
    (95, 95, 100),
    (130, 130, 135),
    (35, 45, 90),
    (200, 182, 150),
    (150, 35, 45),
    (60, 110, 70),
    (230, 225, 215),
)
KN95: tuple[RGB, ...] = ((236, 236, 230), (245, 245, 242), (215, 215, 210))


def clip8(v: float) -> int:
    return 0 if v < 0 else 255 if v > 255 else int(v)


def jitter(rng: np.random.Generator, color: Sequence[int], amount: float) -> RGB:
    noise = rng.normal(0, amount, 3)
    return (clip8(color[0] + noise[0]), clip8(color[1] + noise[1]), clip8(color[2] + noise[2]))


def scale(color: Sequence[int], k: float) -> RGB:
    return (clip8(color[0] * k), clip8(color[1] * k), clip8(color[2] * k))


def mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def random_color(rng: np.random.Generator) -> RGB:
    style = rng.random()
    if style < 0.35:  # muted / indoor
        base = rng.uniform(90, 235)
        return jitter(rng, (base, base * rng.uniform(0.85, 1.05), base * rng.uniform(0.7, 1.0)), 12)
    if style < 0.55:  # dark
        return jitter(rng, (rng.uniform(15, 80),) * 3, 15)
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    c1, c2 = np.array(random_color(rng), np.float32), np.array(random_color(rng), np.float32)
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
        d.rectangle((0, y0, w, h), fill=random_color(rng) + (int(rng.integers(150, 256)),))
    for _ in range(int(rng.integers(3, 16))):
        kind = rng.random()
        col = random_color(rng)
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        bw, bh = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.6) * h
        if kind < 0.35:  # shelves, cupboards, windows, doors
            d.rectangle(
                (x0, y0, x0 + bw, y0 + bh),
                fill=col,
                outline=scale(col, 0.6) if rng.random() < 0.5 else None,
                width=int(rng.integers(1, 4)),
            )
            if rng.random() < 0.5:
                n = int(rng.integers(1, 5))
                for s in range(1, n + 1):
                    yy = y0 + bh * s / (n + 1)
                    d.line((x0, yy, x0 + bw, yy), fill=scale(col, 0.55), width=max(1, int(bh * 0.03)))
                    for _item in range(int(rng.integers(0, 5))):  # things on the shelf
                        ix = x0 + rng.uniform(0, 0.9) * bw
                        iw, ih = rng.uniform(0.03, 0.12) * bw, rng.uniform(0.05, 0.8) * bh / (n + 1)
                        d.rectangle((ix, yy - ih, ix + iw, yy), fill=random_color(rng))
        elif kind < 0.55:
            d.ellipse((x0, y0, x0 + bw, y0 + bh), fill=col)
        elif kind < 0.7:
            pts = [
                (x0 + rng.uniform(0, 1) * bw, y0 + rng.uniform(0, 1) * bh)
                for _ in range(int(rng.integers(3, 7)))
            ]
            d.polygon(pts, fill=col)
        elif kind < 0.85:
            d.line(
                (x0, y0, x0 + rng.uniform(-1, 1) * bw, y0 + rng.uniform(-1, 1) * bh),
                fill=col,
                width=int(rng.integers(2, 12)),
            )
        else:  # out-of-focus lights
            for _light in range(int(rng.integers(3, 10))):
                r = rng.uniform(0.01, 0.05) * w
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
                d.ellipse(
                    (cx - r, cy - r, cx + r, cy + r),
                    fill=jitter(rng, (250, 235, 200), 20) + (int(rng.integers(60, 160)),),
                )
    if rng.random() < 0.6:
        img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.5, 2.5))))
    return img


@dataclass
class Look:
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


def make_look(rng: np.random.Generator, kind: int) -> Look:
    skin = jitter(rng, SKIN[int(rng.integers(len(SKIN)))], 6)
    hair = jitter(rng, HAIR[int(rng.integers(len(HAIR)))], 6)
    hair_style = str(rng.choice(["bald", "short", "long", "cap", "hood"], p=[0.08, 0.47, 0.3, 0.08, 0.07]))
    mask_type = str(rng.choice(["surgical", "cloth", "kn95"], p=[0.6, 0.3, 0.1]))
    if mask_type == "surgical":
        mask = jitter(rng, SURGICAL[int(rng.integers(len(SURGICAL)))], 5)
        strap = jitter(rng, (240, 240, 240), 5)
    elif mask_type == "cloth":
        mask = jitter(rng, CLOTH[int(rng.integers(len(CLOTH)))], 8)
        strap = scale(mask, 0.85)
    else:
        mask = jitter(rng, KN95[int(rng.integers(len(KN95)))], 4)
        strap = jitter(rng, (235, 235, 235), 5)
    eye_y = rng.uniform(0.38, 0.43)
    nose_len = rng.uniform(0.18, 0.22)
    mouth_gap = rng.uniform(0.11, 0.15)
    incorrect_style = "chin" if rng.random() < 0.25 else "nose"
    nose_y = eye_y + nose_len
    if kind == MASK:
        top, bottom = eye_y + rng.uniform(0.075, 0.11), rng.uniform(0.96, 1.04)
    elif kind == INCORRECT and incorrect_style == "nose":
        top, bottom = nose_y + rng.uniform(0.015, 0.04), rng.uniform(1.05, 1.13)
    else:
        top, bottom = nose_y + mouth_gap + rng.uniform(0.06, 0.09), rng.uniform(1.13, 1.2)
    return Look(
        skin=skin,
        hair=hair,
        hair_style=hair_style,
        hairline=rng.uniform(0.06, 0.2),
        hood=random_color(rng),
        cap=random_color(rng),
        iris=IRIS[int(rng.integers(len(IRIS)))],
        yaw=float(np.clip(rng.normal(0, 0.3), -0.6, 0.6)),
        roll=float(np.clip(rng.normal(0, 5), -12, 12)),
        eye_y=eye_y,
        nose_len=nose_len,
        mouth_gap=mouth_gap,
        mouth_style=str(rng.choice(["closed", "smile", "open"], p=[0.5, 0.35, 0.15])),
        beard=bool(rng.random() < 0.12),
        glasses=bool(rng.random() < 0.12),
        glasses_color=jitter(rng, (30, 30, 30), 20) if rng.random() < 0.7 else random_color(rng),
        mask_type=mask_type,
        mask=mask,
        strap=strap,
        incorrect_style=incorrect_style,
        mask_top=top,
        mask_bottom=bottom,
        body=bool(rng.random() < 0.85),
        clothes=random_color(rng),
        shade=rng.uniform(0.0, 0.12),
    )
