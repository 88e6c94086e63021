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
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from slt import ticket as ticket_io
from slt.capacity import allocation_error, allocation_errors, check_fits
from slt.config import Config, config_hash, run_id, to_toml
from slt.data import Batches, Splits, load_data
from slt.errors import ConfigError, NonFiniteScoreError, SltError, first_line, storage_error
from slt.fileio import atomic_torch_save, atomic_write_text
from slt.network import SltNetwork, build_network
from slt.rundir import (
    CHECKPOINT,
    CONFIG,
    ERROR,
    METRICS,
    SUMMARY,
    TICKET,
    RunLock,
    clean_temp_files,
    locked_by,
    read_metrics,
    read_summary,
)
from slt.scorers import EpochContext


@dataclass(frozen=True)
class SearchResult:
    run_dir: Path
    # "finished", "skipped" (already finished), "stopped" (stop_after_epochs) or "busy"
    # (another process writes this run; only with on_busy = "skip")
    status: str
    summary: dict[str, Any] | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


@torch.no_grad()
def evaluate(net: SltNetwork, batches: Batches, batch_size: int) -> tuple[float, float]:
    """(loss, accuracy) on the test split, masks computed once."""
    net.eval()
    if not net.fixed:
        net.refresh()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in batches.test_batches(batch_size):
        out = net.body(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += y.numel()
    return loss_sum / n, correct / n


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_test_acc", "best_epoch",
                   "elapsed", "config_hash")


def _load_checkpoint(path: Path, device: torch.device, cfg: Config) -> dict[str, Any] | None:
    """The run's checkpoint, checked to be slt's and this config's; None when there is none.
    Anything else is one error line saying what to do: never a half-applied resume."""
    if not path.exists():
        return None
    fix = "move it away (or delete it) to restart this run from scratch"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise SltError(f"{path} is unreadable ({type(exc).__name__}): {fix}") from None
    if not isinstance(ckpt, dict):
        raise SltError(f"{path} is not a checkpoint of slt (it holds a "
                       f"{type(ckpt).__name__}): {fix}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise SltError(f"{path} is not a checkpoint of slt (no {', '.join(missing)}): {fix}")
    if ckpt["config_hash"] != config_hash(cfg):
        raise SltError(f"{path} belongs to another config: {fix}")
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int) or not 0 <= epoch <= cfg.search.epochs:
        raise SltError(f"{path} records epoch {epoch!r}, outside 0..{cfg.search.epochs}: {fix}")
    return ckpt


def run_search(
    cfg: Config,
    out_root: str | Path,
    *,
    stop_after_epochs: int | None = None,
    embed_weights: bool = False,
    log: Callable[[str], None] = print,
    on_busy: str = "wait",
) -> SearchResult:
    """Run (or resume, or skip) the search that `cfg` describes under `out_root`.

    One process writes a run directory at a time (its lock). When another holds it,
    `on_busy = "wait"` waits for it and `"skip"` returns at once with status "busy".
    """
    run_dir = Path(out_root) / run_id(cfg)
    summary, _ = read_summary(run_dir, config_hash(cfg))
    if summary is not None:
        return _finished_already(run_dir, summary, embed_weights, log, locked=False)
    if on_busy == "skip" and (holder := locked_by(run_dir)):
        log(f"being written by {holder}, skipped: {run_dir}")
        return SearchResult(run_dir, "busy", None)

    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    splits = load_data(cfg.data)  # fails before any file is written
    check_fits(cfg, splits.spec, device)  # so does a network too large for this machine
    batches = Batches(splits, device)
    with allocation_errors(cfg, splits.spec):
        net = build_network(cfg, splits.spec).to(device)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, "create the run directory", run_dir) from None
    with RunLock(run_dir) as lock:
        if not lock.acquire(wait=on_busy == "wait", on_wait=lambda holder: log(
                f"{run_dir.name} is being written by {holder}: waiting for it to finish")):
            log(f"being written by {lock.holder()}, skipped: {run_dir}")
            return SearchResult(run_dir, "busy", None)
        if lock.unsupported:
            log(f"warning: {run_dir} cannot be locked ({lock.unsupported}): nothing stops "
                "another process from writing this run at the same time")
        summary, problem = read_summary(run_dir, config_hash(cfg))
        if summary is not None:  # the writer we waited for finished it
            return _finished_already(run_dir, summary, embed_weights, log, locked=True)
        if problem:
            again = "from its checkpoint" if (run_dir / CHECKPOINT).exists() else \
                "from the start (it has no checkpoint)"
            log(f"{run_dir}: {problem}; finishing the run again {again}")
        clean_temp_files(run_dir)
        (run_dir / ERROR).unlink(missing_ok=True)
        try:
            return _search(cfg, run_dir, splits, batches, net, device, stop_after_epochs,
                           embed_weights, log)
        except Exception as exc:  # recorded for `slt report`, then raised
            error = allocation_error(cfg, exc, splits.spec)  # out of memory: one line
            _record_error(cfg, run_dir, error or exc)
            if error is None:
                raise
            raise error from None


def _finished_already(run_dir: Path, summary: dict[str, Any], embed_weights: bool,
                      log: Callable[[str], None], locked: bool) -> SearchResult:
    log(f"finished already, skipped: {run_dir}")
    if embed_weights:
        with RunLock(run_dir) as lock:
            if not locked:  # rewriting the ticket is a write: one writer at a time
                lock.acquire(wait=True, on_wait=lambda holder: log(
                    f"{run_dir.name} is being written by {holder}: waiting for it"))
            ticket_io.embed_weights(run_dir / TICKET)
        log(f"weights embedded in {run_dir / TICKET}")
    return SearchResult(run_dir, "skipped", summary)


def _record_error(cfg: Config, run_dir: Path, exc: Exception) -> None:
    """error.json for the report; best effort (the disk may be the reason for the error)."""
    message = f"{type(exc).__name__}: {exc}".strip() if not isinstance(exc, SltError) \
        else str(exc)
    try:
        atomic_write_text(run_dir / ERROR, json.dumps(
            {"error": message, "traceback": traceback.format_exc()}, indent=2) + "\n")
    except (OSError, SltError):
        pass


def _search(cfg: Config, run_dir: Path, splits: Splits, batches: Batches, net: SltNetwork,
            device: torch.device, stop_after_epochs: int | None, embed_weights: bool,
            log: Callable[[str], None]) -> SearchResult:
    """The search itself, in a run directory this process holds the lock of."""
    s = cfg.search
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay, nesterov=s.nesterov)
    steps_per_epoch = batches.len_train_batches(s.batch_size)
    total_steps = s.epochs * steps_per_epoch
    warmup_steps = round(s.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps)
    )

    if device.type == "cuda":  # same ticket on resume needs deterministic convolutions
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    atomic_write_text(run_dir / CONFIG, to_toml(cfg))
    ckpt_path = run_dir / CHECKPOINT
    metrics_path = run_dir / METRICS
    summary_path = run_dir / SUMMARY
    start_epoch, best_acc, best_epoch, elapsed = 0, -1.0, 0, 0.0
    # The figures of the state the ticket is taken from: the last epoch's evaluation (kept
    # in the checkpoint), never a metrics line, which may be missing or damaged.
    test_loss: float | None = None
    test_acc: float | None = None
    ckpt = _load_checkpoint(ckpt_path, device, cfg)
    if ckpt is not None:
        fix = f"move {ckpt_path} away (or delete it) to restart this run from scratch"
        try:
            net.body.load_state_dict(ckpt["model"])
            for layer, weight in zip(net.searched_layers, ckpt.get("weights", [])):
                layer.weight_src = weight.to(device)  # weights a rule has re-randomised
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise SltError(f"{ckpt_path} does not fit this run's network "
                           f"({first_line(exc)}): {fix}") from None
        start_epoch, best_acc = ckpt["epoch"], ckpt["best_test_acc"]
        best_epoch, elapsed = ckpt["best_epoch"], ckpt["elapsed"]
        test_loss, test_acc = ckpt.get("test_loss"), ckpt.get("test_acc")
        log(f"resuming {run_dir.name} after epoch {start_epoch}/{s.epochs}")
    rows, damaged = read_metrics(metrics_path)
    kept = [r for r in rows if r["epoch"] <= start_epoch]
    if damaged:
        log(f"{metrics_path}: dropped {damaged} damaged line{'s' if damaged != 1 else ''}")
    if [r["epoch"] for r in kept] != list(range(1, start_epoch + 1)):
        log(f"{metrics_path}: the rows of some of epochs 1..{start_epoch} are missing or "
            "repeated; kept one row per epoch found (the search itself is unaffected)")
        kept = sorted({r["epoch"]: r for r in kept}.values(), key=lambda r: r["epoch"])
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    done_now = 0
    scorer, searched = net.scorer, net.searched_layers
    for epoch in range(start_epoch + 1, s.epochs + 1):
        t0 = time.perf_counter()
        scorer.on_epoch_start(EpochContext(epoch, s.epochs, cfg.run.seed, searched, net.budget))
        net.train()
        # Running sums stay on the device: no host sync per step (only for the bar's text).
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        bar = tqdm(batches.train_epoch(epoch, s.batch_size, cfg.run.seed), total=steps_per_epoch,
                   desc=f"epoch {epoch}/{s.epochs}", disable=not cfg.run.progress,
                   leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            try:
                out = net(x)
            except NonFiniteScoreError as exc:
                raise SltError(f"epoch {epoch}: {exc}; the search diverged, lower search.lr "
                               f"(now {s.lr})") from None
            loss = F.cross_entropy(out, y, label_smoothing=s.label_smoothing)
            reg = scorer.regulariser(searched)
            optimizer.zero_grad(set_to_none=True)
            (loss if reg is None else loss + reg).backward()
            optimizer.step()
            scorer.after_step(searched)
            scheduler.step()
            loss_sum += loss.detach() * y.numel()
            correct += (out.argmax(1) == y).sum()
            seen += y.numel()
            if cfg.run.progress and step % 25 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                acc=f"{int(correct) / seen:.3f}")
        bar.close()
        loss_sum, correct = float(loss_sum), int(correct)
        test_loss, test_acc = evaluate(net, batches, s.eval_batch_size)
        epoch_time = time.perf_counter() - t0
        elapsed += epoch_time
        if test_acc > best_acc:
            best_acc, best_epoch = test_acc, epoch
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_loss": test_loss, "test_acc": test_acc,
               "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": epoch_time}
        try:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:
            raise storage_error(exc, "write", metrics_path) from None
        atomic_torch_save(ckpt_path, {
            "model": net.body.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "best_test_acc": best_acc,
            "best_epoch": best_epoch, "elapsed": elapsed, "config_hash": config_hash(cfg),
            "test_loss": test_loss, "test_acc": test_acc,
            **({"weights": [layer.weight_src for layer in searched]}
               if scorer.stores_weights else {}),
        })
        log(f"epoch {epoch}/{s.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  test acc {test_acc:.4f}  ({epoch_time:.1f}s)")
        done_now += 1
        if stop_after_epochs is not None and done_now >= stop_after_epochs and epoch < s.epochs:
            return SearchResult(run_dir, "stopped", None)

    if test_acc is None or test_loss is None:  # a checkpoint of an older slt: evaluate again
        test_loss, test_acc = evaluate(net, batches, s.eval_batch_size)
    masks = net.ticket_masks()
    dens = net.densities(masks)
    ticket_io.save(run_dir / TICKET, cfg, splits.spec, net, masks,
                   metrics={"test_acc": test_acc, "test_loss": test_loss},
                   embed_weights=embed_weights)
    summary = {
        "run_id": run_dir.name, "config_hash": config_hash(cfg),
        "final_test_acc": test_acc, "final_test_loss": test_loss,
        "best_test_acc": best_acc, "best_epoch": best_epoch, "epochs": s.epochs,
        "time_s": elapsed, "device": str(device), "torch": torch.__version__,
        "source_density_target": cfg.source.density, "scheme": cfg.source.scheme,
        "scope": s.scope, **dens,
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    log(f"done: test acc {test_acc:.4f} (best {best_acc:.4f} at epoch {best_epoch}); "
        f"source density {dens['source_density']:.4f}, ticket density "
        f"{dens['ticket_density']:.4f} ({dens['keep']:.4f} of the source) -> {run_dir}")
    return SearchResult(run_dir, "finished", summary)
