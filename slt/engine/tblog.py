"""TensorBoard event files of a run (`run.tensorboard = true`, needs the `tb` extra).

Rank 0 writes them in the run directory itself, so `tensorboard --logdir runs/` shows one
run per run directory, named by its run id. Every scalar is on one axis, optimisation steps
done: each step's loss and learning rate (`step/loss`, `step/lr`) at the step's number
counted from 1, each metrics.jsonl row (`epoch/test_acc`, ...) at the step that ends its
epoch. So everything a checkpoint covers lies at or before the checkpoint's step, and a
resumed writer's purge step (one past it) makes TensorBoard's reader drop what an
interrupted process wrote after that checkpoint: every step and epoch reads back once.

Losses stay on the device until written, in a batch at the points where the search reads
values back anyway (every `CHECK_EVERY` steps, each checkpoint), so logging adds no host
synchronisation per step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slt.config.schema import Config
from slt.engine.platform import Platform
from slt.errors import ConfigError, first_line, storage_error

EXTRA = "run.tensorboard = true needs the tb extra: pip install 'slt[tb]'"


def _writer_class() -> Any:
    """torch's SummaryWriter; importing it imports the tensorboard package."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def check_available(cfg: Config) -> None:
    """One ConfigError line when `run.tensorboard` is set and tensorboard does not import:
    called before anything of the run is written (or a legacy run directory renamed)."""
    if not cfg.run.tensorboard:
        return
    try:
        _writer_class()
    except Exception as exc:  # missing, too old, or a broken protobuf under it
        raise ConfigError(f"{EXTRA} ({first_line(exc)})") from None


def _wait_past_earlier_files(run_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the
    second its file was opened in: a file opened in the same second as an earlier one of
    this run could sort before it, and its purge would come too early. Wait for the next
    second in that (rare) case."""
    latest = 0
    for path in run_dir.glob("events.out.tfevents.*"):
        try:
            latest = max(latest, int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    while (left := latest + 1 - time.time()) > 0:
        time.sleep(left)


class TensorBoardLog:
    """One run's event files. Every rank keeps the steps' losses (in a group, a step's loss
    is the sum of the ranks' shares of the global batch's mean); rank 0 alone writes."""

    def __init__(self, run_dir: Path, steps_done: int, platform: Platform) -> None:
        self.platform = platform
        self.next_step = steps_done + 1  # the number of the next step kept
        self.losses: list[Tensor] = []
        self.lrs: list[float] = []
        self.writer: Any = None
        if platform.is_main:
            _wait_past_earlier_files(run_dir)
            try:
                self.writer = _writer_class()(log_dir=str(run_dir), purge_step=steps_done + 1)
            except OSError as exc:
                raise storage_error(exc, "write TensorBoard event files in", run_dir) from None

    def step(self, loss: Tensor, lr: float) -> None:
        """Keep one step's loss (on its device: no wait for it) and learning rate."""
        self.losses.append(loss.detach())
        self.lrs.append(lr)

    def write_steps(self) -> None:
        """Write the steps kept so far: one read-back for the batch (in a group, also one
        collective, so every rank calls this at the same points)."""
        if not self.losses:
            return
        losses = self.platform.sum(torch.stack(self.losses).double().tolist())
        if self.writer is not None:
            for i, (loss, lr) in enumerate(zip(losses, self.lrs)):
                self.writer.add_scalar("step/loss", loss, self.next_step + i)
                self.writer.add_scalar("step/lr", lr, self.next_step + i)
        self.next_step += len(losses)
        self.losses, self.lrs = [], []

    def epoch(self, row: dict[str, Any], steps_done: int) -> None:
        """A metrics.jsonl row, every value as `epoch/<key>`, at the step ending its epoch."""
        self.write_steps()
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(f"epoch/{key}", value, steps_done)

    def flush(self) -> None:
        """Everything so far on disk: called before each checkpoint, so the event files
        never miss a step that a checkpoint holds."""
        self.write_steps()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Close the files; steps kept since the last flush are dropped (a checkpoint does
        not hold them, and in a group, writing them would need every rank)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
