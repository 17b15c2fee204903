"""Process groups for commands launched by torchrun (which sets RANK / WORLD_SIZE / MASTER_ADDR)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["end_process_group", "is_main_process", "running_group", "start_process_group", "world_size"]


def _launched_distributed() -> bool:
    """True when this process is one of several ranks started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_process_group() -> bool:
    """Join the torchrun group (NCCL on CUDA, else gloo) unless one is running; True if this call joined it."""
    if not _launched_distributed() or running_group() is not None:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def running_group():
    """torch.distributed when a process group is running in this process, else None."""
    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    """Rank 0 of a running group, or the only process."""
    dist = running_group()
    return dist is None or dist.get_rank() == 0


def world_size() -> int:
    """Ranks in the running group (1 without one)."""
    dist = running_group()
    return 1 if dist is None else dist.get_world_size()


def end_process_group() -> None:
    """Wait for every rank, then tear the group down (a gloo group alive at exit can abort a rank)."""
    dist = running_group()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
