"""Process-group set-up for ``torchrun``: DistributedDataParallel over gloo (CPU) or NCCL (CUDA)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, and the device it trains on."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` samples (``count`` must divide evenly)."""
        if count % self.size:
            raise ValueError(f"a batch of {count} does not split evenly over {self.size} processes")
        per = count // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over processes."""
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.size
        return value


def setup(device: str = "auto") -> World:
    """Join the process group that ``torchrun`` describes in the environment, or run alone."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available; allowed here: 'cpu' or 'auto'")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return World(rank, size, torch.device("cuda", local_rank))
    return World(rank, size, torch.device("cpu"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DistributedDataParallel when there are several processes, the module itself otherwise."""
    if world.size == 1:
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(models: list[nn.Module], skip: bool) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce) when ``skip``: every micro-batch but the last."""
    with contextlib.ExitStack() as stack:
        if skip:
            for m in models:
                if isinstance(m, nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        yield
