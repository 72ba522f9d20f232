"""The CLI's consoles and cell formats, in a leaf module every command module imports (and none imports back):
``out`` for results (tables, one line per finished job), ``err`` for messages and errors."""

from __future__ import annotations

import math

from rich.console import Console

__all__ = ["err", "fmt_interval", "out"]

out = Console()
err = Console(stderr=True)


def fmt_interval(
    value: float, low: float | None = None, high: float | None = None, signed: bool = False
) -> str:
    """``66.5 [61.0, 71.9]`` (percent); the value alone without an interval; ``-`` for nan."""
    if value is None or math.isnan(value):
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    text = f.format(100 * value)
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return text
    return f"{text} [{f.format(100 * low)}, {f.format(100 * high)}]"
