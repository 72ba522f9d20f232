"""Drawing detections with the reference paper's colours (with_mask green, mask_weared_incorrect yellow,
without_mask red)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from maskssd.ssd.postprocess import Detections

CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "with_mask": (0, 200, 0),
    "mask_weared_incorrect": (255, 215, 0),
    "without_mask": (230, 0, 0),
}
_FALLBACK = [(0, 128, 255), (255, 0, 255), (0, 255, 255), (255, 128, 0)]


def colour_of(name: str, index: int = 0) -> tuple[int, int, int]:
    return CLASS_COLOURS.get(name, _FALLBACK[index % len(_FALLBACK)])


def draw_detections(
    image: Image.Image | np.ndarray,
    dets: Detections,
    class_names: Sequence[str],
    min_score: float = 0.3,
    text: str | None = None,
) -> Image.Image:
    """A copy of ``image`` with boxes (pixels) above ``min_score``, labels and an optional caption."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image.copy()
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 250))
    for box, label, score in zip(dets.boxes.tolist(), dets.labels.tolist(), dets.scores.tolist()):
        if score < min_score:
            continue
        name = class_names[label - 1]
        colour = colour_of(name, label)
        draw.rectangle(box, outline=colour, width=width)
        caption = f"{name} {score:.2f}"
        tw = draw.textlength(caption)
        y = max(box[1] - 11, 0)
        draw.rectangle([box[0], y, box[0] + tw + 4, y + 11], fill=colour)
        draw.text((box[0] + 2, y), caption, fill=(0, 0, 0))
    if text:
        tw = draw.textlength(text)
        draw.rectangle([0, 0, tw + 8, 14], fill=(0, 0, 0))
        draw.text((4, 1), text, fill=(255, 255, 255))
    return img


def montage(
    frames: Sequence[Image.Image], names: Sequence[str], tile: tuple[int, int] = (480, 360)
) -> Image.Image:
    """A grid of camera frames (the paper's central-server view), each captioned with its camera name."""
    n = max(len(frames), 1)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = Image.new("RGB", (cols * tile[0], rows * tile[1]), (32, 32, 32))
    draw = ImageDraw.Draw(out)
    for i, (frame, name) in enumerate(zip(frames, names)):
        x, y = (i % cols) * tile[0], (i // cols) * tile[1]
        f = frame.copy()
        f.thumbnail(tile)
        out.paste(f, (x, y))
        draw.rectangle([x, y + tile[1] - 14, x + draw.textlength(name) + 8, y + tile[1]], fill=(0, 0, 0))
        draw.text((x + 4, y + tile[1] - 13), name, fill=(255, 255, 255))
    return out


#: Outline of objects a model missed in :func:`draw_review`.
MISSED_COLOUR = (255, 0, 255)


def draw_review(
    image: Image.Image | np.ndarray,
    dets: Detections,
    class_names: Sequence[str],
    *,
    min_score: float,
    false_detections: Sequence[int] = (),
    missed_boxes: Sequence[Sequence[float]] = (),
    missed_labels: Sequence[int] = (),
    text: str | None = None,
) -> Image.Image:
    """An error review: detections above ``min_score`` (false ones captioned ``FP``, by index into ``dets``) and
    the missed objects outlined in magenta (``missed <class>``)."""
    img = draw_detections(image, dets, class_names, min_score=min_score, text=text)
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 250))
    boxes = dets.boxes.tolist()
    for k in false_detections:
        box = boxes[k]
        draw.line([box[0], box[1], box[2], box[3]], fill=(255, 255, 255), width=width)
        draw.text((box[0] + 2, box[3] - 11), "FP", fill=(255, 255, 255))
    for box, label in zip(missed_boxes, missed_labels):
        draw.rectangle(list(box), outline=MISSED_COLOUR, width=width)
        caption = f"missed {class_names[int(label) - 1]}"
        y = min(box[3] + 1, img.size[1] - 11)
        draw.rectangle([box[0], y, box[0] + draw.textlength(caption) + 4, y + 11], fill=MISSED_COLOUR)
        draw.text((box[0] + 2, y), caption, fill=(0, 0, 0))
    return img
