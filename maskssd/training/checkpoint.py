"""Random-number state in training checkpoints: every generator a run draws from, stored as tensors and plain
numbers so that checkpoints load with ``weights_only=True``; restored on resume for an exact continuation.
(Writing and reading checkpoint files: :mod:`maskssd.ssd.checkpoint`.)"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """The torch, numpy, Python (and CUDA) RNG states as tensors and plain numbers, so that checkpoints
    load with ``weights_only=True`` (numpy's state holds an ndarray, which that unpickler refuses)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, tuple):  # checkpoints written before the state was stored as tensors
        np.random.set_state(n)
    else:
        np.random.set_state(
            ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
    p = state["python"]
    if isinstance(p, tuple):
        random.setstate(p)
    else:
        random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
