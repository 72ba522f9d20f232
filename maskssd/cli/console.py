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


class TrainBar:
    """The training progress bar (rich), as the engine's :class:`~maskssd.training.engine.TrainProgress`: one
    bar per run (a ``--seeds`` parent starts it once per seed)."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def start(self, total_steps: int, first_epoch: int, epochs: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        self._bar = Progress(*columns, console=err, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(
            "train", total=total_steps, epoch=first_epoch, epochs=epochs, loss=0.0
        )

    def advance(self, steps: int, epoch: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, epoch=epoch, loss=loss)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
