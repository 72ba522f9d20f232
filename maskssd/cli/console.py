"""The CLI's consoles and cell formats, in a leaf module every command module imports (and none imports back):
``out`` for results (tables, one line per finished job), ``err`` for messages and errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Column", "err", "fit_table", "fmt_interval", "out"]

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


@dataclass
class Column:
    """A table column for :func:`fit_table`: ``priority`` 0 is always shown, higher ones while they fit;
    ``shrink`` columns (a run's name) give up width, down to ``min_width``, before a column is left out."""

    key: str
    header: str
    priority: int
    justify: str = "right"
    shrink: bool = False
    min_width: int = 10


def fit_table(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[dict[str, str]],
    width: int | None,
    wide: bool = False,
) -> tuple[Table, list[str]]:
    """A table of ``rows`` (cells as text) that fits ``width`` characters: the most important columns whole,
    numbers never cut, a name cut with an ellipsis; ``wide`` keeps every column. Returns the table and the
    headers of the columns left out (to say so). Headers wrap at spaces."""

    def natural(col: Column) -> int:
        words = max((len(w) for w in col.header.split()), default=0)
        return max([words, *(len(r.get(col.key, "")) for r in rows)])

    sep = 3  # SIMPLE_HEAD without edges: a space of padding either side of a column, a space between columns
    room = None if width is None else width + 1  # no divider before the first column
    chosen: list[Column] = []
    used = 0
    for col in sorted(columns, key=lambda c: c.priority):
        need = (min(col.min_width, natural(col)) if col.shrink else natural(col)) + sep
        if wide or room is None or col.priority == 0 or used + need <= room:
            chosen.append(col)
            used += need
    spare = (room or 0) - sum(natural(c) + sep for c in chosen)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
    for col in [c for c in columns if c in chosen]:  # the given order, not the priority order
        w = natural(col)
        if col.shrink and not wide and width is not None and spare < 0:
            w = max(col.min_width, w + spare)
        table.add_column(col.header, justify=col.justify, width=w)  # type: ignore[arg-type]
    for r in rows:  # a cell never wraps: a name too long ends in an ellipsis
        table.add_row(
            *[Text(r.get(c.key, ""), no_wrap=True, overflow="ellipsis") for c in columns if c in chosen]
        )
    return table, [c.header for c in columns if c not in chosen]
