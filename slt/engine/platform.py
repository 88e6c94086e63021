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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slt.errors import ConfigError, SltError, first_line

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
class GroupEnv:
    """This process's place in a group, as the launcher's environment states it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    """`env[name]` as an integer >= minimum; None when unset."""
    text = env.get(name)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise SltError(f"the environment variable {name}={text!r} is not a whole number "
                       "(torchrun sets it; unset it to run alone)") from None
    if value < minimum:
        raise SltError(f"the environment variable {name}={text!r} must be at least {minimum}"
                       " (torchrun sets it; unset it to run alone)")
    return value


def group_env(env: Mapping[str, str] | None = None) -> GroupEnv:
    """RANK, WORLD_SIZE and LOCAL_RANK (of `env`, default os.environ) checked before any
    group is joined: a stray or inconsistent variable is one line naming it, never a
    traceback from the rendezvous, a hang waiting for a peer that cannot exist, or a
    "rank 1" that runs alone and writes as if it were rank 0. RANK=0 or WORLD_SIZE=1 on
    its own states "alone" and is accepted."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", 0)
    if world is None and local:
        raise SltError(f"the environment variable LOCAL_RANK={local} is set but WORLD_SIZE "
                       "is not: start a group with torchrun, or unset LOCAL_RANK to run alone")
    if world is None:
        if rank:
            raise SltError(f"the environment variable RANK={rank} is set but WORLD_SIZE is "
                           "not: start a group with torchrun, or unset RANK to run alone")
        world = 1
    if rank is None:
        if world > 1:
            raise SltError(f"the environment variable WORLD_SIZE={world} is set but RANK is "
                           "not: start a group with torchrun, or unset WORLD_SIZE to run "
                           "alone")
        rank = 0
    if rank >= world:
        raise SltError(f"the environment variable RANK={rank} is not below WORLD_SIZE="
                       f"{world}: ranks are 0 to {world - 1}")
    local = local or 0
    if local >= world:
        raise SltError(f"the environment variable LOCAL_RANK={local} is not below "
                       f"WORLD_SIZE={world}")
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name, "").strip():
                raise SltError(f"WORLD_SIZE={world} asks for a group, but the environment "
                               f"variable {name} is not set (torchrun sets it)")
        port = _env_int(env, "MASTER_PORT", 1)
        if port is not None and port > 65535:
            raise SltError(f"the environment variable MASTER_PORT={port} is not a port "
                           "(1 to 65535)")
    return GroupEnv(rank, world, local)


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
        on CUDA, gloo on the CPU). Joins the group on the way; the environment is checked
        first (`group_env`), and a rendezvous that fails is one line."""
        group = group_env()
        if group.world == 1:
            return cls(resolve_device(device_name))
        device = resolve_device(device_name, group.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        timeout=TIMEOUT)
            except (RuntimeError, ValueError) as exc:  # DistNetworkError, DistStoreError...
                raise SltError(f"rank {group.rank} of {group.world} could not join the "
                               f"group at {os.environ.get('MASTER_ADDR')}:"
                               f"{os.environ.get('MASTER_PORT')}: {first_line(exc)}") from None
        return cls(device, group.rank, group.world)

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
