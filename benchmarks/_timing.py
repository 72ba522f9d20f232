"""Shared helpers of the benchmark scripts: median wall time, a rich table with ratios vs a baseline row, the
machine named beside every table (CPU model, what it has, what PyTorch ran on), the AVX2 emulation of a second
kind of CPU (``--isa avx2``: PyTorch and oneDNN held to AVX2 in a child process) and ``--record FILE``: the
tables printed, as a record ``maskssd docs`` renders (:mod:`maskssd.provenance`)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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
    """One line naming where the numbers come from: CPU model, what PyTorch runs on, threads (the load is the
    record's, taken once when it is written)."""
    from maskssd.provenance import machine as describe

    m = describe(load=False)
    isa = m.get("isa", "?") + (f" (emulated: {m.get('emulated_by', '?')})" if m.get("emulated") else "")
    return f"{m['cpu']} ({m['cpu_has']}), PyTorch {isa}, {torch.get_num_threads()} threads, torch {torch.__version__}"


#: Every table printed in this process, for ``--record``.
PRINTED: list[dict[str, Any]] = []


def add_record_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--record", metavar="FILE.json", help="also write the tables as a record (maskssd docs renders it)"
    )


def save_record(path: str | None, benchmark: str, extra: dict[str, Any] | None = None) -> None:
    """``--record FILE``: every table printed, with the machine, the commit and the command."""
    if not path:
        return
    from maskssd.provenance import make_record, write_record

    doc = {"benchmark": benchmark, "tables": PRINTED, **(extra or {})}
    print(f"record written to {write_record(path, make_record('benchmark', doc, title=benchmark))}")


def record_rich(table: Any) -> Any:
    """Keep a rich ``Table`` as printed (its title, columns and cells) for :func:`save_record`; returns it."""
    cols = [str(c.header) for c in table.columns]
    rows = list(zip(*[[str(cell) for cell in c.cells] for c in table.columns]))
    record_table(str(table.title or ""), cols, rows)
    return table


def record_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Keep a table (as printed) for :func:`save_record`."""
    PRINTED.append(
        {
            "title": title,
            "columns": list(columns),
            "rows": [dict(zip(columns, map(str, r), strict=True)) for r in rows],
        }
    )


def in_child(module: str, argv: Sequence[str], env: Mapping[str, str], out_flag: str = "--child-json") -> Any:
    """Run ``python -m module argv`` with ``env`` added (AVX2 emulation must be set before torch loads) and
    return the JSON it wrote to ``out_flag FILE``."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", module, *argv, out_flag, str(out)]
        subprocess.run(cmd, env={**os.environ, **env}, check=True)
        return json.loads(out.read_text())


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
    cols = ["case", "median ms", *extra_columns, "speed-up", "vs baseline", "notes"]
    record_table(title, cols, [[str(c) for c in row] for row in zip(*[col.cells for col in table.columns])])
