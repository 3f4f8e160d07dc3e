"""Data-parallel training under ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them training runs as one ordinary process.
Rank 0 alone logs, evaluates and writes the run folder; the others only train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from cxr.runtime.errors import CxrError, CxrUsageError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun sets all three, even for one process (which then still runs DDP, as a 1-GPU dry run)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is visible, else the CPU."""
    if name not in ("cpu", "cuda", "auto"):
        raise CxrUsageError(f"--device must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrError("--device cuda: no CUDA GPU visible to PyTorch")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise CxrError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
            "use --nproc-per-node at most the GPU count"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str, timeout_s: int = 1800) -> DistContext:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU), or return a one-process context."""
    if not launched_by_torchrun():
        return DistContext(device=pick_device(device_name))
    if not dist.is_available():
        raise CxrError("this PyTorch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
        )
    return DistContext(dist.get_rank(), dist.get_world_size(), device, distributed=True)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
