"""Compiled CPU kernels (numba) for the SSD loops that tensor code cannot make sparse.

On a CPU the batched tensor versions in :mod:`maskssd.ssd.loss` and :mod:`maskssd.ssd.postprocess` are memory-bound:
they compute the IoU of every object with every prior, the loss of every negative and the softmax of every
prior, although only a few percent of those matter. These kernels visit only what can matter, with bounds
that keep the result exact:

- :class:`PriorMatcher` (:mod:`.matching`) matches objects to priors (the tutorial's rule, ties included), visiting per object
  only the priors whose IoU can reach the threshold or the object's best overlap;
- :func:`hard_negatives` (:mod:`.mining`) picks each image's hardest negatives from cheap bounds on their loss, computing the
  exact loss only for the candidates those bounds cannot rule out;
- :func:`detect` (:mod:`.nms`) decodes, filters, runs greedy NMS and keeps the top-k of each image in one pass.

The torch versions stay for other devices and as the tests' cross-check. Kernels compile on first use and
are cached next to this file (numba's cache; ``NUMBA_CACHE_DIR`` moves it). They release the GIL and divide
as IEEE floats do (0/0 is NaN, as in torch). They run on one thread: numba's parallel loops (a second OpenMP
runtime whose idle workers spin) starved PyTorch's threads, and Python worker threads took ~2 ms to wake on
these VMs, more than the work they would share.

Names resolve lazily (:mod:`maskssd._lazy`), so the switch and the compile lock (:mod:`._lock`) load without
numba.
"""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {"ENABLED": "_common", "PriorMatcher": "matching", "detect": "nms", "hard_negatives": "mining"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
