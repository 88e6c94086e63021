"""Where a run executes: its device and its place in a group of processes.

One object, made once by the command that starts a search (from `run.device` and the
environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR), handed to the search
loop; no other module reads that environment. slt never launches processes itself: torchrun
(or `srun` running torchrun) does, and every process runs the same `slt search`.

In a group, every process holds the same scores (their gradients are summed across the
group after each step), so every process computes the same masks; BatchNorm running
statistics are averaged before anything is evaluated or written; only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slt.errors import ConfigError

# How long a collective may wait for a peer before the group gives up: a rank that died
# takes the others down (torchrun also stops them) instead of leaving them waiting forever.
TIMEOUT = datetime.timedelta(minutes=10)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`run.device` on this machine: auto is cuda when present; cuda:LOCAL_RANK in a group."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


@dataclass(frozen=True)
class Platform:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def local(cls, device: torch.device) -> Platform:
        return cls(device)

    @classmethod
    def from_env(cls, device_name: str) -> Platform:
        """This process's platform: alone, or one rank of the group torchrun started (NCCL
        on CUDA, gloo on the CPU). Joins the group on the way."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(resolve_device(device_name))
        rank = int(os.environ.get("RANK", "0"))
        device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=TIMEOUT)
        return cls(device, rank, world)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # --- collectives (no-ops alone) ---------------------------------------------------------

    def sum_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Sum every gradient over the group, in one flat buffer (one collective a step)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few numbers over the group (epoch totals)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def average_buffers(self, module: nn.Module) -> None:
        """Make BatchNorm running statistics the group's mean, so every rank evaluates and
        saves the same network."""
        if self.world == 1:
            return
        for name, buf in module.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                dist.all_reduce(buf)
                buf.div_(self.world)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a decision such as "skip this run")."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")
