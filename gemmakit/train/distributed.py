"""Scale-out on PyTorch's own engine: `torchrun` starts the processes, FSDP2 (`fully_shard`) shards the model,
`torch.distributed.checkpoint` saves and restores sharded state. Nothing here launches processes or builds a
process group by hand; a plain `python` run (no `torchrun` environment) is the one-process special case.

The losses divide by the *global* number of target tokens (an all-reduce of the local counts), so one process
on a batch of N examples and k processes on N/k each compute the same loss and the same gradients.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init() -> World:
    """Join the process group `torchrun` describes (gloo on CPU, nccl with CUDA); one process otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group once every rank is done with it. Gloo's worker threads outlive the group and free
    the last collectives' buffers themselves, which needs the GIL: a rank whose interpreter is already tearing down
    then aborts ("terminate called without an active exception", pytorch/pytorch#179291), so before returning we
    release the GIL for a moment and let them finish."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.1)


def shard(task: nn.Module, blocks: list[nn.Module], world: World) -> nn.Module:
    """FSDP2: `fully_shard` each decoder block, then the root (which keeps the tied embedding and final norm,
    so the embedding and the LM head stay one parameter). Gradients are averaged over ranks by FSDP; our
    losses are pre-multiplied by the world size to turn that mean into the global sum they need.

    Methods named in the task's `fsdp_forward_methods` (e.g. GKD's student sampling) get FSDP's forward hooks
    too: only `forward` gathers the root's parameters otherwise, and the embedding would stay sharded."""
    if not world.distributed:
        return task
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(task, mesh=mesh)
    for name in getattr(task, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(task, name)
    return task


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (all-gathered); any other tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
