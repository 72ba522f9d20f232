"""Checkpoint files: written atomically (a killed process never leaves a half-written file), read without running
code (:func:`maskssd.ssd.safe_load.safe_load`), and loadable into a ready-to-use detector.

A training checkpoint holds model, optimiser, scheduler, epoch, RNG states, the resolved config and what
rebuilds the model (``build_args``); a deployment checkpoint needs only the model part. Everything in them is
tensors and plain containers, so they load with ``torch.load(weights_only=True)``. Reading sits here, below
both training (which writes them) and deploy (which serves them).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from maskssd.errors import MaskSSDError
from maskssd.files import atomic_path
from maskssd.ssd.safe_load import safe_load

__all__ = [
    "FORMAT_VERSION",
    "atomic_save",
    "interrupts_deferred",
    "load",
    "load_detector",
    "safe_load",
    "with_thresholds",
]

log = logging.getLogger(__name__)

#: The ``"format"`` every checkpoint maskssd writes carries (training, deployment, imported SSD300).
FORMAT_VERSION = 1


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM during the block and deliver them right after it.

    An interrupt inside ``torch.save`` leaves its zip writer half-way; its clean-up then raises a
    RuntimeError that hides the KeyboardInterrupt, and the run would end as failed instead of interrupted.
    Elsewhere than in the main thread (where Python runs signal handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {
        s: h for s, h in previous.items() if h is not None
    }  # None: installed outside Python, left alone
    for s in previous:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):  # delivered now, to the handlers in force again
            signal.raise_signal(s)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``. Ctrl-C or
    SIGTERM during the write take effect once it is complete (:func:`interrupts_deferred`). The checkpoint is
    serialised in memory first, so a failed write (a full disk) raises the system's ``OSError`` (``ENOSPC``,
    ``EFBIG``), not the zip writer's; ``path`` is then left as it was."""
    path = Path(path)
    with interrupts_deferred():
        buf = io.BytesIO()
        torch.save(obj, buf)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a maskssd checkpoint (refuses files that are not one, with the reason), or a checkpoint of the
    reference paper's code (a tutorial-layout SSD300, see :func:`maskssd.ssd.ssd300.import_reference_checkpoint`)
    as one. Reads with :func:`safe_load`: a file that needs arbitrary Python objects is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise MaskSSDError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_load(path)
    except MaskSSDError:
        raise
    except Exception as e:  # truncated, not a torch file, ...
        raise MaskSSDError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "build_args" in ckpt:
        return ckpt
    from maskssd.ssd.ssd300 import import_reference_checkpoint

    imported = import_reference_checkpoint(ckpt, path)
    if imported is None:
        raise MaskSSDError(
            f"{path}: not a maskssd checkpoint (no model/build_args) nor an SSD300 of the reference "
            "paper's code (tutorial layout)"
        )
    log.info("note: %s", imported["import_note"])
    return {"format": FORMAT_VERSION, **imported}


def load_detector(
    source: str | Path | dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A detector in eval mode from a checkpoint file (or its loaded dict), and the checkpoint."""
    from maskssd.ssd.models import build_model

    ckpt = source if isinstance(source, dict) else load(source)
    args = dict(ckpt["build_args"])
    args["pretrained"] = False  # the weights come from the checkpoint
    args.pop("init_checkpoint", None)
    name = args.pop("name")
    model = build_model(name, **args)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def with_thresholds(src: str | Path, thresholds: dict[str, float], dst: str | Path) -> Path:
    """Write the checkpoint ``src`` to ``dst`` with per-class operating thresholds (``"thresholds"``: class
    name -> score), which :class:`maskssd.deploy.predictor.Predictor` applies by default; atomically."""
    ckpt = load(src)
    unknown = sorted(set(thresholds) - set(ckpt.get("class_names", ())))
    if unknown:
        raise MaskSSDError(f"thresholds for classes the model does not have: {', '.join(unknown)}")
    ckpt["thresholds"] = {str(k): float(v) for k, v in thresholds.items()}
    return atomic_save(ckpt, dst)
