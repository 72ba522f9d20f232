"""Frames in flight: several calls in the model at once, each on a replica of the predictor with its own ONNX
Runtime session and its share of the cores.

One call on a 2-core CPU leaves its two threads waiting on each other (the small depthwise convolutions and
the stride-4 map's layers split poorly, and preprocessing and decoding run between calls); two one-thread
calls on two frames keep both cores busy. A frame's latency grows, the frames per second a camera gets grow
more (``benchmarks/realtime_decode.py --in-flight``). :class:`ModelPool` holds the replicas and their threads
(``maskssd serve --model-workers``); :class:`InFlight` streams frames through one, results in frame order
(``maskssd detect`` on a video). PyTorch backends run one call at a time: their threads belong to the process.
"""

from __future__ import annotations

import collections
import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from maskssd.deploy.export import physical_cores
from maskssd.deploy.predictor import Predictor, Timing
from maskssd.errors import MaskSSDError
from maskssd.ssd.postprocess import Detections

T = TypeVar("T")


def auto_in_flight(predictor: Any) -> int:
    """Calls in flight by default: one per physical core (at most 2: more buys latency, not speed) for an
    ONNX Runtime predictor, else 1."""
    if getattr(predictor, "onnx_session", None) is None:
        return 1
    return max(1, min(2, physical_cores()))


def check_workers(predictor: Any, workers: int) -> None:
    """Refuse, saying why, a number of calls in flight this predictor cannot take."""
    if workers < 1:
        raise MaskSSDError(f"calls in flight must be at least 1, not {workers}")
    if workers > 1 and getattr(predictor, "onnx_session", None) is None:
        raise MaskSSDError(
            f"{workers} calls in flight need an ONNX Runtime backend (--backend onnx or onnx-int8);"
            f" the {getattr(predictor, 'backend', 'torch')} backend takes one at a time"
        )


class ModelPool:
    """``workers`` replicas of ``predictor`` (each with cores/workers threads) and the worker threads that call
    them: :meth:`call` takes a free replica. One worker is the predictor itself on one thread. :meth:`close`
    puts the process's PyTorch thread count back."""

    def __init__(self, predictor: Any, workers: int = 1, name: str = "maskssd-model"):
        check_workers(predictor, workers)
        self.workers = workers
        self.threads = max(1, physical_cores() // workers)
        self.replicas = (
            [predictor.replica(self.threads) for _ in range(workers)] if workers > 1 else [predictor]
        )
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for r in self.replicas:
            self._free.put(r)
        self._torch_threads = torch.get_num_threads()
        # each worker's PyTorch threads (preprocessing, decoding; OpenMP's count is per thread) are its share
        init = {"initializer": torch.set_num_threads, "initargs": (self.threads,)} if workers > 1 else {}
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=name, **init)

    def call(self, fn: Callable[[Any], T]) -> T:
        """``fn(replica)`` on a free replica (waits for one); in the caller's thread, normally a worker's."""
        pred = self._free.get()
        try:
            return fn(pred)
        finally:
            self._free.put(pred)

    def submit(self, fn: Callable[[Any], T]) -> Future[T]:
        return self.executor.submit(self.call, fn)

    def close(self, cancel: bool = False) -> None:
        self.executor.shutdown(wait=True, cancel_futures=cancel)
        if self.workers > 1:
            torch.set_num_threads(self._torch_threads)


class InFlight:
    """Frames through a :class:`ModelPool` of ``workers`` replicas, results in the order the frames came.

    A context manager (the pool's threads); ``workers == 1`` is the predictor itself, one frame at a time."""

    def __init__(self, predictor: Predictor, workers: int):
        self.predictor, self.workers = predictor, workers
        self.pool = ModelPool(predictor, workers, name="maskssd-inflight")
        self.threads = self.pool.threads

    def __enter__(self) -> InFlight:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.close()

    def detect(
        self, frames: Iterable[tuple[Any, np.ndarray]], threshold: float | None = None
    ) -> Iterator[tuple[Any, Detections, Timing]]:
        """``(key, frame)`` pairs in, ``(key, detections, timing)`` out in the same order, at most ``workers``
        frames read ahead of the one returned (a live camera is not drained into memory)."""

        def one(frame: np.ndarray) -> Callable[[Predictor], tuple[Detections, Timing]]:
            return lambda pred: (pred.detect([frame], threshold)[0], pred.last_timing)

        pending: collections.deque[tuple[Any, Future]] = collections.deque()
        for key, frame in frames:
            pending.append((key, self.pool.submit(one(frame))))
            if len(pending) >= self.workers:
                k, fut = pending.popleft()
                yield k, *fut.result()
        while pending:
            k, fut = pending.popleft()
            yield k, *fut.result()
