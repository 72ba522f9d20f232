"""Data-parallel training on ``torch.distributed``: process group set-up from torchrun's environment, helpers
for reducing metrics and gathering evaluation records, and the ``--nproc`` launcher.

``torchrun --nproc-per-node N -m maskssd train CONFIG`` (or ``maskssd train CONFIG --nproc N``) runs N
processes: NCCL on GPUs, gloo on CPU. ``data.batch_size`` is per process. Only rank 0 talks to MLflow and
writes checkpoints; evaluation is gathered across ranks, so mAP equals the single-process value.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """What torchrun (or any launcher setting RANK/WORLD_SIZE) says about this process."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(
            int(env.get("RANK", "0")),
            world,
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )


def setup(info: DistInfo, device_name: str) -> torch.device:
    """Join the process group (NCCL for CUDA, gloo otherwise) and pick this rank's device."""
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
        # share the cores: N processes with N x (all cores) threads would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in one process)."""
    if active():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``maskssd ARGV`` under torchrun with ``nproc`` processes on this machine (``--nproc`` dropped from
    ``argv``); the exit status of torchrun."""
    cleaned: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "maskssd",
        *cleaned,
    ]
    return subprocess.call(cmd)
