"""The search loop: scores trained with SGD, cosine schedule, per-epoch eval, resume.

A run directory is named by the config hash. Rerunning the same config resumes from the
last checkpoint, or skips the run when it has an intact summary and ticket. One process at a
time writes a run directory (see slt.rundir). Data order and any other
randomness are derived from (run.seed, epoch), so a resumed run ends with exactly the
ticket an uninterrupted one finds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from slt import ticket as ticket_io
from slt import topk
from slt.config.ids import config_hash
from slt.config.schema import Config
from slt.data.memory import Batches
from slt.data.stream import StreamBatches
from slt.engine.checkpoint import Progress, checkpoint_record, restore_checkpoint
from slt.engine.measure import evaluate, ticket_records
from slt.engine.platform import Platform
from slt.engine.tblog import TensorBoardLog
from slt.errors import NonFiniteScoreError, SltError, storage_error
from slt.fileio import atomic_torch_save, atomic_write_text
from slt.network import SltNetwork
from slt.rundir import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    TICKET,
    read_metrics,
)
from slt.scorers import EpochContext
from slt.seeding import derive_seed


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


# Steps between reads of the kernel's deferred non-finite flag (and at every checkpoint).
CHECK_EVERY = 100


class Search:
    """One run's search in steps (restore, train an epoch, checkpoint, finish), around one
    checkpoint record; built only once the run directory is this process's to write."""

    def __init__(self, cfg: Config, run_dir: Path, batches: Batches | StreamBatches,
                 net: SltNetwork, platform: Platform, log: Callable[[str], None]) -> None:
        self.cfg, self.run_dir, self.batches = cfg, run_dir, batches
        self.net, self.platform, self.log = net, platform, log
        s = cfg.search
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=s.lr, momentum=s.momentum,
                                         weight_decay=s.weight_decay, nesterov=s.nesterov)
        self.steps_per_epoch = batches.len_train_batches(s.batch_size)
        total_steps = s.epochs * self.steps_per_epoch
        warmup_steps = round(s.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))
        self.progress = Progress()
        self.scorer_state: dict[str, Any] = {}
        self.stop_requested: Callable[[], bool] = never
        self.stopping = False  # a stop was asked for: checkpoint and return at the next chance
        run = cfg.run
        if platform.device.type == "cuda":  # the same ticket on resume needs determinism
            torch.backends.cudnn.deterministic = run.deterministic
            torch.backends.cudnn.benchmark = not run.deterministic
        # Speed modes: they change how the forward and backward run, never what is selected
        # (scores, their optimizer and the top-k stay fp32; autocast leaves them alone).
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision)
        self.scaler = torch.amp.GradScaler(platform.device.type,
                                           enabled=run.precision == "fp16")
        self.channels_last = run.channels_last and len(batches.spec.shape) == 3
        if self.channels_last:
            net.body.to(memory_format=torch.channels_last)
        self.forward = torch.compile(net) if run.compile else net
        self.tb: TensorBoardLog | None = None  # opened by slt.engine.run._search once restored

    # --- restore --------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from the checkpoint, if any (every rank reads the same one), after every
        field is checked against this run (a damaged one is one line, left in place)."""
        restored = restore_checkpoint(
            self.run_dir / CHECKPOINT, self.cfg, self.net, self.params, self.optimizer,
            self.scheduler, self.scaler, self.steps_per_epoch, self.platform.device)
        if restored is None:
            return
        self.progress, self.scorer_state = restored
        p = self.progress
        where = f"epoch {p.epoch}/{self.cfg.search.epochs}" + (
            f" and step {p.step}/{self.steps_per_epoch} of the next" if p.step else "")
        self.log(f"resuming {self.run_dir.name} after {where}")

    def repair_metrics(self) -> None:
        """metrics.jsonl with exactly the rows of the epochs the checkpoint holds."""
        path = self.run_dir / METRICS
        done = self.progress.epoch
        rows, damaged = read_metrics(path)
        kept = [r for r in rows if r["epoch"] <= done]
        if damaged:
            self.log(f"{path}: dropped {damaged} damaged line{'s' if damaged != 1 else ''}")
        if [r["epoch"] for r in kept] != list(range(1, done + 1)):
            self.log(f"{path}: the rows of some of epochs 1..{done} are missing or repeated; "
                     "kept one row per epoch found (the search itself is unaffected)")
            kept = sorted({r["epoch"]: r for r in kept}.values(), key=lambda r: r["epoch"])
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # --- train ----------------------------------------------------------------------------

    def train_epoch(self, epoch: int, stop_after_steps: int | None) -> bool:
        """Train epoch `epoch` from the step the progress records, checkpointing every
        `run.checkpoint_every` steps; False when stopped early (`stop_after_steps`)."""
        cfg, s, p, net, platform = self.cfg, self.cfg.search, self.progress, self.net, \
            self.platform
        scorer, searched = net.scorer, net.searched_layers
        epoch_start = t0 = time.perf_counter()
        start = p.step
        scorer.on_epoch_start(EpochContext(epoch, s.epochs, cfg.run.seed, searched, net.budget,
                                           start))
        if start and self.scorer_state:  # a resume inside the epoch: the rule's draws so far
            scorer.load_state(self.scorer_state)
        net.train()
        loss_sum, correct, seen = self.epoch_totals()
        every = cfg.run.checkpoint_every
        batches = self.batches.train_epoch(epoch, s.batch_size, cfg.run.seed, start,
                                           platform.rank, platform.world)
        bar = tqdm(batches, total=self.steps_per_epoch, initial=start,
                   desc=f"epoch {epoch}/{s.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.run.progress and platform.is_main))
        done_here = 0
        with topk.deferred_checks():  # no wait for the GPU each step to read the kernel's flag
            for step, (x, y) in enumerate(bar, start=start):
                loss, out, global_n = self.logged_step(epoch, step, x, y)
                loss_sum += loss.detach() * (y.numel() if platform.world == 1 else global_n)
                correct += (out.argmax(1) == y).sum()
                seen += y.numel()
                done_here += 1
                if cfg.run.progress and platform.is_main and step % 25 == 0:
                    bar.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.3f}")
                last = step + 1 == self.steps_per_epoch
                if self.stop_asked(step, last) and not last:
                    p.elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.checkpoint_inside(epoch, step + 1, loss_sum, correct, seen)
                    bar.close()
                    return False
                if every and (step + 1) % every == 0 and not last:
                    p.elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    seen = self.checkpoint_inside(epoch, step + 1, loss_sum, correct, seen)
                    if stop_after_steps is not None and done_here >= stop_after_steps:
                        bar.close()
                        return False
        bar.close()
        with self.diverged(epoch):
            topk.check_deferred()
        p.elapsed += time.perf_counter() - t0
        self.finish_epoch(epoch, float(loss_sum), float(correct), seen, epoch_start)
        return True

    def epoch_totals(self) -> tuple[Tensor, Tensor, float]:
        """The epoch's training totals so far, to run on from: (loss sum, correct, seen)."""
        p = self.progress
        # Running sums stay on the device: no host sync per step (only for the bar's text).
        # the group's totals so far are kept once, on rank 0 (summed over ranks at the end)
        keep, device = self.platform.is_main, self.platform.device
        loss_sum = torch.tensor(p.train_loss_sum if keep else 0.0, dtype=torch.float64,
                                device=device)
        correct = torch.tensor(p.train_correct if keep else 0.0, dtype=torch.float64,
                               device=device)
        return loss_sum, correct, p.train_seen if keep else 0

    def logged_step(self, epoch: int, step: int, x: Tensor, y: Tensor
                    ) -> tuple[Tensor, Tensor, int]:
        """Step `step` of `epoch` with its records: TensorBoard's values, and every
        CHECK_EVERY steps the kernel's deferred flag read; (loss, logits, global batch)."""
        s = self.cfg.search
        global_n = min(s.batch_size, self.batches.n_train - step * s.batch_size)
        lr = self.optimizer.param_groups[0]["lr"]  # this step's (a host float)
        with self.diverged(epoch), self.seeded(epoch, step):
            loss, out = self.step(x, y, global_n)
            if self.tb is not None:
                self.tb.step(loss, lr)  # kept on the device until written
            if step % CHECK_EVERY == CHECK_EVERY - 1:
                topk.check_deferred()
                if self.tb is not None:
                    self.tb.write_steps()
        return loss, out, global_n

    @contextmanager
    def seeded(self, epoch: int, step: int) -> Iterator[None]:
        """A model that draws randomly in its forward (dropout, stochastic depth) draws
        from torch's generator seeded by (run.seed, epoch, step, rank), restored after:
        a resumed run draws what the uninterrupted run drew."""
        if not self.net.stochastic:
            yield
            return
        device = self.platform.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   device_type=device.type):
            torch.manual_seed(derive_seed("dropout", self.cfg.run.seed, epoch, step,
                                          self.platform.rank))
            yield

    def stop_asked(self, step: int, last: bool) -> bool:
        """Whether to stop after this step. Alone: asked every step. In a group: rank 0's
        answer, shared every CHECK_EVERY steps and at the epoch's end, so every rank stops
        at the same step (a collective per step would stall the stream)."""
        if self.platform.world == 1:
            self.stopping = self.stopping or self.stop_requested()
        elif last or step % CHECK_EVERY == CHECK_EVERY - 1:
            asked = self.stop_requested() if self.platform.is_main else False
            self.stopping = self.platform.sum([float(asked)])[0] > 0
        return self.stopping

    def checkpoint_inside(self, epoch: int, steps_done: int, loss_sum: Tensor,
                          correct: Tensor, seen: float) -> float:
        """Checkpoint after `steps_done` global batches of `epoch`, with the group's training
        totals so far; they are kept once from here on (on rank 0), so the epoch's sums stay
        right. Returns this process's new count of examples seen."""
        p, platform = self.progress, self.platform
        with self.diverged(epoch):
            topk.check_deferred()  # nothing non-finite is ever written
        loss_total, correct_total, seen_total = platform.sum([float(loss_sum), float(correct),
                                                              seen])
        keep = platform.is_main
        loss_sum.fill_(loss_total if keep else 0.0)
        correct.fill_(correct_total if keep else 0.0)
        p.step = steps_done
        p.train_loss_sum, p.train_correct, p.train_seen = loss_total, correct_total, seen_total
        self.checkpoint(epoch - 1, self.net.scorer.state())
        return seen_total if keep else 0

    @contextmanager
    def diverged(self, epoch: int) -> Iterator[None]:
        """A non-finite score as the one line it is: the search diverged."""
        try:
            yield
        except NonFiniteScoreError as exc:
            raise SltError(f"epoch {epoch}: {exc}; the search diverged, lower search.lr "
                           f"(now {self.cfg.search.lr})") from None

    def step(self, x: Tensor, y: Tensor, global_n: int) -> tuple[Tensor, Tensor]:
        """One optimisation step on this process's part of a global batch of `global_n`
        examples, in the run's speed modes; (loss, logits). `slt bench search` times it."""
        s, platform, net = self.cfg.search, self.platform, self.net
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(platform.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.forward(x)
            if platform.world == 1:
                loss = F.cross_entropy(out, y, label_smoothing=s.label_smoothing)
            else:  # this rank's share of the global batch's mean loss: the summed
                # gradients are then those of the mean over the global batch
                loss = F.cross_entropy(out, y, reduction="sum",
                                       label_smoothing=s.label_smoothing) / global_n
        objective = loss
        reg = net.scorer.regulariser(net.searched_layers)
        if reg is not None:
            objective = objective + reg / platform.world  # added once over the group
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        platform.sum_grads(self.params)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        net.scorer.after_step(net.searched_layers)
        self.scheduler.step()
        return loss, out

    def finish_epoch(self, epoch: int, loss_sum: float, correct: float, seen: float,
                     epoch_start: float) -> None:
        """Evaluate, record the epoch's row, checkpoint at its end."""
        p, platform = self.progress, self.platform
        t0 = time.perf_counter()
        loss_sum, correct, seen = platform.sum([loss_sum, correct, seen])
        platform.average_buffers(self.net.body)  # one network on every rank from here on
        p.test_loss, p.test_acc = evaluate(self.net, self.batches,
                                           self.cfg.search.eval_batch_size)
        p.elapsed += time.perf_counter() - t0
        if p.test_acc > p.best_test_acc:
            p.best_test_acc, p.best_epoch = p.test_acc, epoch
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_loss": p.test_loss, "test_acc": p.test_acc,
               "lr": self.optimizer.param_groups[0]["lr"],
               "epoch_time_s": time.perf_counter() - epoch_start}
        p.step, p.train_loss_sum, p.train_correct, p.train_seen = 0, 0.0, 0.0, 0.0
        if platform.is_main:
            path = self.run_dir / METRICS
            try:
                with open(path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            except OSError as exc:
                raise storage_error(exc, "write", path) from None
        if self.tb is not None:
            self.tb.epoch(row, epoch * self.steps_per_epoch)
        self.checkpoint(epoch, {})
        self.log(f"epoch {epoch}/{self.cfg.search.epochs}  train loss {row['train_loss']:.4f} "
                 f"acc {row['train_acc']:.4f}  test acc {p.test_acc:.4f}")

    def checkpoint(self, epochs_done: int, scorer_state: dict[str, Any]) -> None:
        """The one checkpoint record, written atomically by rank 0; BatchNorm statistics are
        the group's mean first, so every rank resumes from the same state. The event files
        are flushed first: they never lack a step that the checkpoint holds."""
        if self.tb is not None:
            self.tb.flush()
        self.platform.average_buffers(self.net.body)
        self.progress.epoch = epochs_done
        if not self.platform.is_main:
            return
        atomic_torch_save(self.run_dir / CHECKPOINT, checkpoint_record(
            self.cfg, self.net, self.optimizer, self.scheduler, self.scaler, self.progress,
            scorer_state))

    # --- finish ---------------------------------------------------------------------------

    def finish(self, embed_weights: bool) -> SearchResult:
        """The ticket and summary (rank 0), from the state of the last checkpoint."""
        p, net, cfg = self.progress, self.net, self.cfg
        if p.test_acc is None or p.test_loss is None:  # an older slt's checkpoint
            p.test_loss, p.test_acc = evaluate(net, self.batches, cfg.search.eval_batch_size)
        if not self.platform.is_main:
            return SearchResult(self.run_dir, "finished", None)
        masks = net.ticket_masks()
        dens = net.densities(masks)
        ticket_io.save(self.run_dir / TICKET, cfg, self.batches.spec, net, masks,
                       metrics={"test_acc": p.test_acc, "test_loss": p.test_loss},
                       embed_weights=embed_weights)
        summary = {
            "run_id": self.run_dir.name, "config_hash": config_hash(cfg),
            "final_test_acc": p.test_acc, "final_test_loss": p.test_loss,
            "best_test_acc": p.best_test_acc, "best_epoch": p.best_epoch,
            "epochs": cfg.search.epochs, "time_s": p.elapsed,
            "device": str(self.platform.device), "world_size": self.platform.world,
            "torch": torch.__version__, "source_density_target": cfg.source.density,
            "scheme": cfg.source.scheme, "scope": cfg.search.scope, **dens,
            **ticket_records(net, masks, self.batches, cfg.search.eval_batch_size),
        }
        atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        self.log(f"done: test acc {p.test_acc:.4f} (best {p.best_test_acc:.4f} at epoch "
                 f"{p.best_epoch}); source density {dens['source_density']:.4f}, ticket "
                 f"density {dens['ticket_density']:.4f} ({dens['keep']:.4f} of the source) "
                 f"-> {self.run_dir}")
        return SearchResult(self.run_dir, "finished", summary)


@dataclass(frozen=True)
class SearchResult:
    run_dir: Path
    # "finished", "skipped" (already finished), "stopped" (stop_after_epochs) or "busy"
    # (another process writes this run; only with on_busy = "skip")
    status: str
    summary: dict[str, Any] | None

    @property
    def ticket(self) -> ticket_io.Ticket:
        """The run's ticket, read from its ticket.slt (a finished run has one)."""
        return ticket_io.load(self.run_dir / TICKET)


def never() -> bool:
    return False
