"""What the parser modules share: the help formatter and the ``--model`` option."""

from __future__ import annotations

import argparse

__all__ = ["formatter", "model_arg"]


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=110)


def model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint FILE, runs:/RUN_ID/model, or models:/NAME@ALIAS (e.g. models:/maskssd-face-mask@champion)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI or mlruns/)",
    )
