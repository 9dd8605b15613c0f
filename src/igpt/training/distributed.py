"""torchrun's environment for pretraining: rank, world size and device (`Dist`), the run directory's lock
(`RunLock`), and the check that the global batch splits evenly over processes and accumulation."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from igpt.checks import check_device
from igpt.errors import IgptError
from igpt.files import lock_or_refuse


def check_batch_split(batch_size: int, world: int, grad_accum: int) -> None:
    """The global batch must split evenly over processes and accumulation steps."""
    if batch_size % (world * grad_accum):
        raise IgptError(
            f"--batch-size {batch_size} must divide by processes x --grad-accum = {world * grad_accum}"
        )


class Dist:
    """torchrun's environment: rank, world size, local device."""

    def __init__(self, device: str, timeout: timedelta | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if device == "cuda":  # checked first, on every rank, so no rank waits for one that failed
            check_device(device)
            if self.local_rank >= torch.cuda.device_count():
                raise IgptError(f"local rank {self.local_rank}, but only {torch.cuda.device_count()} GPU(s)")
            self.device = f"cuda:{self.local_rank}"
        if self.world > 1:
            backend = "nccl" if device == "cuda" else "gloo"
            if device == "cuda":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend, timeout=timeout)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def check_same_settings(env: Dist, mine: dict[str, Any]) -> None:
    """Under torchrun: refuse, on every rank, processes launched with different settings."""
    seen: list[Any] = [None] * env.world
    dist.all_gather_object(seen, mine)
    if any(x != seen[0] for x in seen):
        bad = next(i for i, x in enumerate(seen) if x != seen[0])
        raise IgptError(
            f"the processes were given different settings (rank 0 and rank {bad}); "
            "launch every rank with the same command"
        )


class _Refused:
    """An IgptError's line, as rank 0 tells it to the other ranks."""

    def __init__(self, line: str):
        self.line = line


def rank0_decides(env: Dist, decide: Callable[[], Any]) -> Any:
    """`decide()` run on rank 0 alone and its result told to every rank; where it refuses (IgptError), every
    rank raises the same line, so none waits for a rank that gave up."""
    msg: list[Any] = [None]
    if env.main:
        try:
            msg = [decide()]
        except IgptError as e:
            msg = [_Refused(str(e))]
    if env.world > 1:
        dist.broadcast_object_list(msg, src=0)
    if isinstance(msg[0], _Refused):
        raise IgptError(msg[0].line)
    return msg[0]


class RunLock:
    """An exclusive flock on RUN/.lock: the kernel drops it when the process dies, so a stale lock file
    left by a killed run never blocks a resume."""

    def __init__(self, run: Path):
        self.fd = lock_or_refuse(run / ".lock", f"another igpt process is training {run}")

    def release(self) -> None:
        os.close(self.fd)  # closing the only descriptor drops the flock
