"""What the kernels share: the on/off switch and the numeric constants of their bounds."""

from __future__ import annotations

import os

import numpy as np

#: ``MASKSSD_CPU_KERNELS=0`` makes the CPU run the tensor code instead (diagnostics; same results).
ENABLED = os.environ.get("MASKSSD_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_F32 = np.float32
_SLACK = 1e-6  # bounds are widened by this much: float rounding can never make a bound exclude a winner
_HUGE = 1e30  # stands for NaN and infinite ranking keys, so that selection arithmetic stays finite
