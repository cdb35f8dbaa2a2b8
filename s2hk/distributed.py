"""Data-parallel training across processes (torch.distributed: gloo on CPU, nccl on GPU).

Every rank holds the whole two-path network. Per step each rank computes gradients on its shard of the
global batch; :func:`all_reduce_mean_` averages the weights' gradients and the masks' data gradient, so every
rank takes the same weight and mask step, keeps identical mask logits and importance ranks, and therefore
derives the identical hard architecture without exchanging it. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank", "world_size", "is_rank0", "local_rank", "all_reduce_mean_", "broadcast_",
           "init_from_env", "barrier", "shutdown", "shard_batch"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    """True in the process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_mean_(tensors: Iterable[Optional[Tensor]]) -> None:
    """Average ``tensors`` in place over all ranks with one collective (flattened); ``None`` entries skipped."""
    if not is_distributed():
        return
    present = [t for t in tensors if t is not None]
    if not present:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in present])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in present:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Copy ``tensors`` from rank ``src`` to every rank (start all ranks from identical weights and masks)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data, src)


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...);
    returns False (and does nothing) outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Destroy the default process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_batch(x, y: Tensor):
    """This rank's contiguous share of a global batch ``(x, y)`` (x may be a tuple of views)."""
    if not is_distributed():
        return x, y
    n, r = y.shape[0], dist.get_rank()
    per = n // dist.get_world_size()
    if per * dist.get_world_size() != n:
        raise ValueError(f"global batch of {n} does not split evenly over {dist.get_world_size()} ranks")
    sl = slice(r * per, (r + 1) * per)
    if isinstance(x, (tuple, list)):
        return tuple(t[sl] for t in x), y[sl]
    return x[sl], y[sl]
