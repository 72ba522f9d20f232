"""Detection settings, in a module of their own (no torch) so configs and the CLI can name the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DISPLAY_THRESHOLD", "DecodeSpec"]

#: The operating threshold: what ``detect``, ``serve`` and the pyfunc show when neither the request nor the
#: model (per-class thresholds fitted on validation) says otherwise, and where the error analysis counts recall
#: and false boxes; AP is computed from ``DecodeSpec.min_score`` up.
DISPLAY_THRESHOLD = 0.4


@dataclass(frozen=True)
class DecodeSpec:
    """Detection settings; the defaults are the reference paper's evaluation protocol."""

    min_score: float = 0.01
    max_overlap: float = 0.45
    top_k: int = 200
    class_agnostic: bool = False
    pre_nms_top_k: int | None = None  # per image, before NMS; None keeps every candidate (the paper's code)

    @classmethod
    def from_config(cls, section: Any) -> DecodeSpec:
        """From a config's ``[eval]`` section (anything with these attributes; ``pre_nms_top_k = 0`` is None)."""
        return cls(
            min_score=section.min_score,
            max_overlap=section.max_overlap,
            top_k=section.top_k,
            class_agnostic=section.class_agnostic,
            pre_nms_top_k=section.pre_nms_top_k or None,
        )
