"""The search loop: scores trained with SGD, cosine schedule, per-epoch eval, resume.

A run directory is named by the config hash. Rerunning the same config resumes from the
last checkpoint, or skips the run when `summary.json` exists. Data order and any other
randomness are derived from (run.seed, epoch), so a resumed run ends with exactly the
ticket an uninterrupted one finds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from slt import ticket as ticket_io
from slt.config import Config, config_hash, run_id, to_toml
from slt.data import Batches, load_data
from slt.errors import ConfigError, NonFiniteScoreError, SltError
from slt.fileio import atomic_torch_save, atomic_write_text
from slt.network import SltNetwork, build_network
from slt.scorers import EpochContext


@dataclass(frozen=True)
class SearchResult:
    run_dir: Path
    status: str  # "finished", "skipped" (already finished) or "stopped" (stop_after_epochs)
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


def _read_metrics(path: Path, keep_epochs: int) -> list[dict[str, Any]]:
    """Metrics of epochs already checkpointed (a line past the checkpoint is dropped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return [r for r in rows if r["epoch"] <= keep_epochs]


def run_search(
    cfg: Config,
    out_root: str | Path,
    *,
    stop_after_epochs: int | None = None,
    embed_weights: bool = False,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume, or skip) the search that `cfg` describes under `out_root`."""
    run_dir = Path(out_root) / run_id(cfg)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        log(f"finished already, skipped: {run_dir}")
        if embed_weights:
            ticket_io.embed_weights(run_dir / "ticket.slt")
            log(f"weights embedded in {run_dir / 'ticket.slt'}")
        return SearchResult(run_dir, "skipped", json.loads(summary_path.read_text()))

    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    splits = load_data(cfg.data)  # fails before any file is written
    batches = Batches(splits, device)
    net = build_network(cfg, splits.spec).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    s = cfg.search
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
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SltError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    ckpt_path = run_dir / "checkpoint.pt"
    metrics_path = run_dir / "metrics.jsonl"
    start_epoch, best_acc, best_epoch, elapsed = 0, -1.0, 0, 0.0
    if ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as exc:
            raise SltError(f"{ckpt_path} is unreadable ({type(exc).__name__}); delete it to "
                           "restart this run from scratch") from None
        if ckpt.get("config_hash") != config_hash(cfg):
            raise SltError(f"{ckpt_path} belongs to another config; move it away to restart")
        net.body.load_state_dict(ckpt["model"])
        for layer, weight in zip(net.searched_layers, ckpt.get("weights", [])):
            layer.weight_src = weight.to(device)  # weights a rule has re-randomised
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best_acc = ckpt["epoch"], ckpt["best_test_acc"]
        best_epoch, elapsed = ckpt["best_epoch"], ckpt["elapsed"]
        log(f"resuming {run_dir.name} after epoch {start_epoch}/{s.epochs}")
    rows = _read_metrics(metrics_path, start_epoch)
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    test_loss, test_acc = (rows[-1]["test_loss"], rows[-1]["test_acc"]) if rows else (0.0, 0.0)
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
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        atomic_torch_save(ckpt_path, {
            "model": net.body.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "best_test_acc": best_acc,
            "best_epoch": best_epoch, "elapsed": elapsed, "config_hash": config_hash(cfg),
            **({"weights": [layer.weight_src for layer in searched]}
               if scorer.stores_weights else {}),
        })
        log(f"epoch {epoch}/{s.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  test acc {test_acc:.4f}  ({epoch_time:.1f}s)")
        done_now += 1
        if stop_after_epochs is not None and done_now >= stop_after_epochs and epoch < s.epochs:
            return SearchResult(run_dir, "stopped", None)

    masks = net.ticket_masks()
    dens = net.densities(masks)
    ticket_io.save(run_dir / "ticket.slt", cfg, splits.spec, net, masks,
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
