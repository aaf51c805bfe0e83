"""torch.distributed from ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): NCCL with one GPU per process, gloo on CPUs; one process without
those variables."""
import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

__all__ = ["DEVICES", "DistEnv", "init_distributed", "all_reduce_sums"]

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this process started the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistEnv:
    """Joins the process group that ``torchrun`` describes (if any) and picks the device.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=rank, world_size=world_size)
        owns = True
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        owns_group=owns,
    )


def all_reduce_sums(sums: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Sums over all processes of each value (the same keys, in the same order, on every process)."""
    if not (dist.is_available() and dist.is_initialized()) or not sums:
        return dict(sums)
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))
