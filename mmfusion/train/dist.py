"""Distributed setup, read once from torchrun's environment into a small frozen :class:`Dist`.

World size 1 on a CPU is the same code path as 8 GPUs: nothing else in mmfusion reads ``RANK`` or
calls ``torch.distributed`` directly without a ``Dist`` in hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            from mmfusion.config import ConfigError

            raise ConfigError("device 'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_dist(device: str = "auto") -> Dist:
    """Read torchrun's environment once; start the process group (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not td.is_initialized():
        td.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def barrier(dist: Dist) -> None:
    if dist.enabled:
        td.barrier()


def all_reduce_sum(dist: Dist, value: float) -> float:
    if not dist.enabled:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=dist.device)
    td.all_reduce(tensor)
    return float(tensor.item())


def all_gather_object(dist: Dist, obj: object) -> list:
    if not dist.enabled:
        return [obj]
    out: list = [None] * dist.world_size
    td.all_gather_object(out, obj)
    return out


def broadcast_object(dist: Dist, obj: object) -> object:
    """Rank 0's ``obj`` on every rank (so all ranks agree on shard lists and step counts)."""
    if not dist.enabled:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile and DDP wrappers to reach the module whose state we save."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def shutdown(dist: Dist) -> None:
    if dist.enabled and td.is_initialized():
        td.destroy_process_group()
