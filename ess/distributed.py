"""Many processes under torchrun: the process group, this process's rank, and sums across ranks.

`torchrun --nproc_per_node N -m ess train ...` starts N processes with RANK, LOCAL_RANK
and WORLD_SIZE in their environment. `process_group()` joins them for the length of a
command (nccl on CUDA, each process on its cuda:LOCAL_RANK; gloo on the CPU). A process
started without torchrun, or as its only process, is a world of one with no process
group, and every function here then does nothing more than its one-process case.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from segkit.errors import InputError
from ess.device import pick_device


def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """The processes in this process's group: 1 outside a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, 0..world_size()-1: as torchrun numbered it (RANK), 0 without torchrun."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes a run's files and prints its summary."""
    return rank() == 0


@contextlib.contextmanager
def process_group(device_name: str = "auto") -> Iterator[torch.device]:
    """Yield this process's device, inside the process group of its torchrun launch if it has one.

    Under torchrun `auto` and `cuda` mean cuda:LOCAL_RANK. A process group that already
    exists (the caller made it) is used and left open; one made here is destroyed on the way out.
    """
    launched = launched_world_size()
    device = pick_device(device_name, local_rank=int(os.environ.get("LOCAL_RANK", "0")) if launched > 1 else None)
    if launched == 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where tensors must be for a collective: the process's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks, on `tensor`'s device; `tensor` itself in one process."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks, as a Python float (the scalar's value in one process)."""
    return all_reduce_sum(value.detach().float()).item() / world_size()


def shard(count: int) -> range:
    """This rank's items of 0..count-1: every world_size()-th one, from rank()."""
    return range(rank(), count, world_size())


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` in a process group (its BatchNorm layers made SyncBatchNorm
    with `sync_bn`); `model` itself in one process. The wrapper shares `model`'s parameters.

    DDP averages the ranks' gradients, so a rank's loss must be scaled to make that average
    the gradient of the global loss (see ess.train.loss_normalizer).
    """
    if world_size() == 1:
        return model
    if sync_bn and device.type != "cuda":
        raise InputError(None, "--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameter objects
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
