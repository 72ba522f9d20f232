"""``maskssd``: one command line for data, training, evaluation, studies, promotion and serving.

The CLI is the only layer that knows argparse and prints; the library returns results and logs through
:mod:`logging`, which the CLI shows on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from rich.markup import escape

from maskssd.cli.console import err
from maskssd.cli.parser import build_parser
from maskssd.errors import MaskSSDError
from maskssd.runtime import tune_cpu_allocator

__all__ = ["build_parser", "main"]


class _Messages(logging.Formatter):
    """Library log records as CLI lines: INFO as is, warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (``main`` may be called many times in one process)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def _configure_logging() -> None:
    """The library logs (``logging``); the CLI shows its ``maskssd.*`` messages on stderr, one line each: INFO
    from the main process, warnings and errors from every process of a distributed run (``RANK``)."""
    root = logging.getLogger("maskssd")
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_Messages())
        root.addHandler(handler)
    root.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    _configure_logging()
    tune_cpu_allocator()  # keep freed memory: ~1.8x faster CPU training steps (see maskssd.runtime)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except MaskSSDError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130
