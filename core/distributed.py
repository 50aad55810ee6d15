"""Several processes under torchrun (one machine or many): joining the group, each process's share of a batch, and
sums over the processes. With one process (no WORLD_SIZE) every function is a no-op, so nothing else changes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .errors import InputError


def process_group(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size): joins torchrun's group when WORLD_SIZE > 1 (NCCL for CUDA devices, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # this process's GPU: NCCL's collectives run on the current device
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), world


def local_device(device: torch.device) -> torch.device:
    """Under torchrun with CUDA, this process's own GPU (LOCAL_RANK); otherwise device itself."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def share(batch: int, rank: int, world: int) -> slice:
    """This process's equal share of a batch's sample indices; refuses a batch that does not split evenly."""
    if batch % world:
        raise InputError(f"batch: {batch} does not split over {world} processes; use a multiple of {world}")
    size = batch // world
    return slice(rank * size, (rank + 1) * size)


def all_reduce_gradients(params: Sequence[torch.Tensor], world: int, mean: bool) -> None:
    """Every gradient becomes the sum (or with mean, the mean) over the processes, in one flat all-reduce."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if mean:
        flat /= world
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


def reduce_value(value: float, world: int, largest: bool = False) -> float:
    """A number summed (or its largest value, with largest) over the processes."""
    if world == 1:
        return value
    import torch.distributed as dist

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM)
    return float(total.item())
