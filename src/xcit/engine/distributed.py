"""Process-group setup for `torchrun` (gloo on CPU, nccl on CUDA) and the collectives training needs."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError('train.device asks for CUDA, but no CUDA device is available')
        if device.index is None:
            device = torch.device('cuda', local_rank)
    return device


def init_distributed(device_name: str = 'auto', timeout_s: int = 1800) -> DistEnv:
    """Read torchrun's environment; one process without it."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world_size, local_rank, device)


@contextlib.contextmanager
def distributed_session(device_name: str = 'auto'):
    """The process group of a `torchrun` launch (or one process) for the duration of a run."""
    env = init_distributed(device_name)
    try:
        yield env
        # a gloo rank that tears its group down while rank 0 still writes checkpoints aborts the process
        barrier(env)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks in place (through the device when the backend needs it there)."""
    if env.distributed:
        buffer = t.to(env.device)
        dist.all_reduce(buffer)
        t.copy_(buffer)
    return t


def all_gather_union(names: set[str], env: DistEnv) -> set[str]:
    """The union of every rank's set of names."""
    if not env.distributed:
        return set(names)
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, sorted(names))
    return {name for part in gathered for name in part}


def average_batchnorm_buffers(model: nn.Module, env: DistEnv) -> None:
    """Average BatchNorm running statistics over ranks, which DDP leaves per-rank (timm's `--dist-bn reduce`)."""
    if not env.distributed:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer.div_(env.world_size)


def all_gather_cat(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's rows of `tensor` (sizes may differ), concatenated in rank order, on the CPU."""
    if not env.distributed:
        return tensor.cpu()
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, tensor.cpu())
    return torch.cat(gathered)
