"""Several processes (torchrun): the process group, each rank's share of every global batch, and the decisions
rank 0 makes for all of them."""
from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.distributed as dist

from errors import DataError


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a plain single-process run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Only rank 0 writes checkpoints, logs and plots."""
    return dist_info()[0] == 0


def init_distributed(device_name: str) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group, nccl on CUDA (one GPU per local rank) and gloo on
    CPU, and return this rank's device."""
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def shard(batches: Iterator[dict], rank: int, world: int) -> Iterator[dict]:
    """This rank's contiguous slice of each global batch (what DistributedSampler does with indices). Every rank
    draws the same global batches from the same seeded stream, so the ranks never see the same rows."""
    for batch in batches:
        rows = next(iter(batch.values())).size(0)
        if rows < world:  # a tail batch too small to give every rank a row: all ranks skip it alike
            continue
        yield {k: v.tensor_split(world)[rank] for k, v in batch.items()}


def rank0_says(flag: bool) -> bool:
    """Rank 0's decision (time budget, halt) for every rank, so that all of them stop at the same step."""
    if dist_info()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=comm_device())
    dist.broadcast(t, 0)
    return bool(t.item())


def mean_over_ranks(*values: float) -> list[float]:
    world = dist_info()[1]
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return (t / world).tolist()


def comm_device() -> torch.device:
    """Where collective tensors live: nccl only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_expert_parallel(num_experts: int, world: int) -> None:
    """expert_parallel=true shares each layer's experts out among the torchrun processes: there must be some."""
    if world == 1:
        raise DataError("--set expert_parallel=true: run under torchrun with 2+ processes "
                        "(torchrun --nproc_per_node=2 main.py --train ...)")
    if num_experts == 0 or num_experts % world:
        raise DataError(f"--set expert_parallel=true: num_experts={num_experts} must be a positive multiple of the "
                        f"{world} processes")
