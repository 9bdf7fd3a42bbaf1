"""Data-parallel training on one node, for `torchrun --nproc-per-node=N` (one process per GPU;
on CPU it uses gloo, which is how the tests exercise it).

Every process draws the same shuffled order and trains on its own slice of it; DDP averages
the gradients. Only rank 0 writes logs, checkpoints and outputs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def torchrun_command(module: str, args: list[str], processes: int | str, nodes: dict[str, str] | None = None) -> list[str]:
    """`python -m module args` under torchrun, `processes` per node: on this node alone, or as one of several
    nodes (`nodes`: torchrun's nnodes, node-rank, master-addr and master-port)."""
    placement = [f"--{option}={value}" for option, value in nodes.items()] if nodes else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *placement, f"--nproc-per-node={processes}", "-m", module, *args]


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world), device


def wrap(model: nn.Module, processes: Processes, device: torch.device) -> nn.Module:
    if processes.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(order: torch.Tensor, processes: Processes) -> torch.Tensor:
    """This process's slice of the epoch; equal lengths, so no process waits on a missing step."""
    usable = len(order) - len(order) % processes.world
    return order[processes.rank : usable : processes.world]


def sync_buffers(model: nn.Module, processes: Processes) -> None:
    """Give every process rank 0's BatchNorm statistics, so validation (and early stopping) agree."""
    if processes.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def teardown(processes: Processes) -> None:
    if processes.world > 1:
        dist.destroy_process_group()
