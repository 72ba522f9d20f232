"""Frames in flight: detect on a stream with several frames in the model at once, each on its own ONNX
Runtime session with its share of the cores, results in frame order.

One call on a 2-core CPU leaves its two threads waiting on each other (the small depthwise convolutions and
the stride-4 map's layers split poorly, and preprocessing and decoding run between calls); two one-thread
calls on two frames keep both cores busy. A frame's latency grows, the frames per second a camera gets grow
more (``benchmarks/realtime_decode.py --in-flight``). PyTorch backends run one frame at a time: their threads
belong to the process.
"""

from __future__ import annotations

import collections
import queue
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from maskssd.deploy.export import physical_cores
from maskssd.deploy.predictor import Predictor, Timing
from maskssd.errors import MaskSSDError
from maskssd.ssd.postprocess import Detections


def auto_in_flight(predictor: Predictor) -> int:
    """Frames in flight by default: one per physical core (at most 2, more buys latency, not speed) for an
    ONNX Runtime predictor on a CPU, else 1."""
    if predictor.onnx_session is None:
        return 1
    return max(1, min(2, physical_cores()))


class InFlight:
    """``workers`` replicas of ``predictor`` (each with cores/workers threads) taking frames in turn.

    A context manager (its worker threads). Each worker's PyTorch threads (preprocessing and decoding) are its
    share of the cores too; the process's count is put back on exit. ``workers == 1`` is the predictor itself,
    one frame at a time."""

    def __init__(self, predictor: Predictor, workers: int):
        if workers < 1:
            raise MaskSSDError(f"frames in flight must be at least 1, not {workers}")
        if workers > 1 and predictor.onnx_session is None:
            raise MaskSSDError(
                f"{workers} frames in flight need an ONNX Runtime backend (--backend onnx or onnx-int8);"
                f" the {predictor.backend} backend takes one frame at a time"
            )
        self.workers, self.predictor = workers, predictor
        self.threads = max(1, physical_cores() // workers)
        self._replicas = (
            [predictor.replica(self.threads) for _ in range(workers)] if workers > 1 else [predictor]
        )
        self._free: queue.SimpleQueue[Predictor] = queue.SimpleQueue()
        for r in self._replicas:
            self._free.put(r)
        self._pool: ThreadPoolExecutor | None = None
        self._torch_threads = torch.get_num_threads()

    def __enter__(self) -> InFlight:
        if self.workers > 1:  # each worker's PyTorch threads (OpenMP's count is per thread) are its share
            self._pool = ThreadPoolExecutor(
                self.workers,
                thread_name_prefix="maskssd-inflight",
                initializer=torch.set_num_threads,
                initargs=(self.threads,),
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            torch.set_num_threads(self._torch_threads)

    def _detect(self, frame: np.ndarray, threshold: float | None) -> tuple[Detections, Timing]:
        pred = self._free.get()
        try:
            return pred.detect([frame], threshold)[0], pred.last_timing
        finally:
            self._free.put(pred)

    def detect(
        self, frames: Iterable[tuple[Any, np.ndarray]], threshold: float | None = None
    ) -> Iterator[tuple[Any, Detections, Timing]]:
        """``(key, frame)`` pairs in, ``(key, detections, timing)`` out in the same order, at most ``workers``
        frames read ahead of the one returned (a live camera is not drained into memory)."""
        if self._pool is None:
            for key, frame in frames:
                yield key, *self._detect(frame, threshold)
            return
        pending: collections.deque[tuple[Any, Future]] = collections.deque()
        for key, frame in frames:
            pending.append((key, self._pool.submit(self._detect, frame, threshold)))
            if len(pending) >= self.workers:
                k, fut = pending.popleft()
                yield k, *fut.result()
        while pending:
            k, fut = pending.popleft()
            yield k, *fut.result()
