"""Shared helpers of the benchmark scripts: median wall time and a rich table with ratios vs a baseline row."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


def median_time(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs, after ``warmup`` untimed runs."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_threads_arg(parser: argparse.ArgumentParser, allocator: bool = True) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice). On a busy machine 1 gives stable "
        "numbers: multi-threaded ops then wait for a second, descheduled worker thread",
    )
    if allocator:
        parser.add_argument(
            "--default-allocator",
            action="store_true",
            help="keep glibc's allocator defaults; by default both sides run with the allocator "
            "setting every maskssd command makes (maskssd.runtime.tune_cpu_allocator)",
        )


def set_threads(threads: int | None, default_allocator: bool = True) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    if not default_allocator:
        from maskssd.runtime import tune_cpu_allocator

        tune_cpu_allocator()


def machine() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"


def print_table(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    extra_columns: Sequence[str] = (),
    console: Console | None = None,
) -> None:
    """Print one row per case: ``name``, ``seconds`` (a median), optional ``baseline`` (the name of the row to
    compare with; the row's speed-up is ``baseline time / row time``), ``note`` and any ``extra_columns``
    (already formatted values). Rows without a baseline are marked as baselines if another row refers to them."""
    by_name = {r["name"]: r for r in rows}
    referenced = {r.get("baseline") for r in rows}
    table = Table(title=title, title_justify="left")
    table.add_column("case")
    table.add_column("median ms", justify="right")
    for col in extra_columns:
        table.add_column(col, justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("vs baseline")
    table.add_column("notes")
    for r in rows:
        base = r.get("baseline")
        if base is not None:
            ratio, against = f"{by_name[base]['seconds'] / r['seconds']:.1f}x", base
        else:
            ratio, against = ("1.0x", "(baseline)") if r["name"] in referenced else ("", "")
        table.add_row(
            r["name"],
            f"{r['seconds'] * 1e3:.2f}",
            *[str(r.get(c, "")) for c in extra_columns],
            ratio,
            against,
            str(r.get("note", "")),
        )
    (console or Console(width=max(Console().width, 200))).print(table)
