"""One run from config to ticket: the finished-run check, data and network, the run
directory's lock handshake across ranks, then the loop."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slt import ticket as ticket_io
from slt.capacity import allocation_error, allocation_errors, check_fits
from slt.config.ids import config_hashes
from slt.config.schema import Config
from slt.config.toml import to_toml
from slt.data.loader import open_batches
from slt.data.memory import Batches
from slt.data.stream import StreamBatches
from slt.engine.hardware import check_run_modes
from slt.engine.loop import Search, SearchResult, never
from slt.engine.platform import Platform, resolve_device
from slt.engine.tblog import TensorBoardLog, check_available
from slt.errors import ConfigError, SltError, storage_error
from slt.fileio import atomic_write_text
from slt.network import SltNetwork, build_network
from slt.rundir import (
    CHECKPOINT,
    CONFIG,
    ERROR,
    TICKET,
    RunLock,
    clean_temp_files,
    locate_run,
    locked_by,
    read_summary,
)


def run_search(
    cfg: Config,
    out_root: str | Path,
    *,
    stop_after_epochs: int | None = None,
    stop_after_steps: int | None = None,
    embed_weights: bool = False,
    log: Callable[[str], None] = print,
    on_busy: str = "wait",
    platform: Platform | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> SearchResult:
    """Run (or resume, or skip) the search that `cfg` describes under `out_root`.

    One process writes a run directory at a time (its lock). When another holds it,
    `on_busy = "wait"` waits for it and `"skip"` returns at once with status "busy". On a
    `platform` of several processes (torchrun), rank 0 decides and writes; every rank trains.
    `stop_after_epochs` / `stop_after_steps` stop early, as an interruption would.
    `stop_requested` (a preemption notice, say) is asked after every step: when it answers
    True the search checkpoints where it is and returns with status "stopped".
    """
    platform = platform or Platform.local(resolve_device(cfg.run.device))
    if not platform.is_main:
        log = _quiet
    _check_run(cfg, platform)
    run_dir = _find_run_dir(cfg, out_root, platform)
    early = _finished_or_busy(cfg, run_dir, platform, on_busy, embed_weights, log)
    if early is not None:
        return early
    batches, net = _data_and_network(cfg, platform)

    def search() -> SearchResult:
        """The search itself, once rank 0 holds the run directory's lock and said "run"."""
        return _search(cfg, run_dir, batches, net, platform, stop_after_epochs,
                       stop_after_steps, embed_weights, log, stop_requested)

    if not platform.is_main:  # rank 0 holds the lock and prepares the directory
        status = platform.broadcast(None)
        if status != "run":
            return SearchResult(run_dir, status, None)
        return search()
    return _lead(cfg, run_dir, batches, platform, on_busy, embed_weights, log, search)


def _check_run(cfg: Config, platform: Platform) -> None:
    """Settings this platform cannot run, each one line before anything is read or written."""
    if cfg.run.sync_bn and platform.world > 1 and platform.device.type != "cuda":
        raise ConfigError("run.sync_bn needs CUDA devices: torch's SyncBatchNorm does not run "
                          "on the CPU")
    if cfg.search.batch_size % platform.world:
        raise ConfigError(f"search.batch_size ({cfg.search.batch_size}) must be a multiple of "
                          f"the number of processes ({platform.world}): it is the global batch")
    check_available(cfg)  # run.tensorboard without the package: one line, nothing written
    # run.compile without a compiler: one line, nothing written; a slow precision: a warning
    check_run_modes(cfg.run, platform.device, warn=platform.is_main)


def _find_run_dir(cfg: Config, out_root: str | Path, platform: Platform) -> Path:
    """The run's directory, found by rank 0 and shared, so every rank writes the same one."""
    # rank 0 finds the directory (a legacy name renamed once); every rank uses its answer
    found = None
    if platform.is_main:
        try:
            found = str(locate_run(Path(out_root), cfg))
        finally:
            found = platform.broadcast(found)  # None tells the others rank 0 failed
    else:
        found = platform.broadcast(None)
    if found is None:
        raise SltError("rank 0 could not open the run directory (its error says why)")
    return Path(found)


def _finished_or_busy(cfg: Config, run_dir: Path, platform: Platform, on_busy: str,
                      embed_weights: bool, log: Callable[[str], None]) -> SearchResult | None:
    """Rank 0's look before any work, shared with every rank: the result of a run finished
    already or (with on_busy "skip") written by another process; None to go on."""
    early = None
    if platform.is_main:
        summary, _ = read_summary(run_dir, config_hashes(cfg))
        if summary is not None:
            early = ("skipped", summary)
        elif on_busy == "skip" and (holder := locked_by(run_dir)):
            log(f"being written by {holder}, skipped: {run_dir}")
            early = ("busy", None)
    early = platform.broadcast(early)
    if early is None:
        return None
    if early[0] == "skipped":
        return _finished_already(run_dir, early[1], embed_weights and platform.is_main,
                                 log, locked=False)
    return SearchResult(run_dir, "busy", None)


def _data_and_network(cfg: Config, platform: Platform
                      ) -> tuple[Batches | StreamBatches, SltNetwork]:
    """This rank's batches and the network on its device; running out of memory building
    it is one line, and nothing is written yet."""
    device = platform.device
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # in memory or streamed from its files; fails before any file is written
    batches = open_batches(cfg.data, device, platform.rank, platform.world)
    spec = batches.spec
    check_fits(cfg, spec, device)  # so does a network too large for this machine
    with allocation_errors(cfg, spec):
        net = build_network(cfg, spec).to(device)
    if cfg.run.sync_bn and platform.world > 1:
        net.body = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net.body)
    return batches, net


def _lead(cfg: Config, run_dir: Path, batches: Batches | StreamBatches, platform: Platform,
          on_busy: str, embed_weights: bool, log: Callable[[str], None],
          search: Callable[[], SearchResult]) -> SearchResult:
    """Rank 0: create the run directory and hold its lock through the search, telling the
    other ranks whether to run; an error of the search is recorded for `slt report`."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        platform.broadcast("failed")
        raise storage_error(exc, "create the run directory", run_dir) from None
    with RunLock(run_dir) as lock:
        early = _take_lock(cfg, run_dir, lock, platform, on_busy, embed_weights, log)
        if early is not None:
            return early
        try:
            return search()
        except Exception as exc:  # recorded for `slt report`, then raised
            error = allocation_error(cfg, exc, batches.spec)  # out of memory: one line
            _record_error(cfg, run_dir, error or exc)
            if error is None:
                raise
            raise error from None


def _take_lock(cfg: Config, run_dir: Path, lock: RunLock, platform: Platform, on_busy: str,
               embed_weights: bool, log: Callable[[str], None]) -> SearchResult | None:
    """Rank 0: acquire the lock and prepare the directory, then tell the other ranks "run"
    (None); or tell them why not (busy, finished meanwhile, failed) and return that."""
    # Several processes do not wait for another writer: the other ranks, waiting in a
    # collective meanwhile, would time out.
    wait = on_busy == "wait" and platform.world == 1
    try:
        acquired = lock.acquire(wait=wait, on_wait=lambda holder: log(
            f"{run_dir.name} is being written by {holder}: waiting for it to finish"))
    except BaseException:
        platform.broadcast("failed")
        raise
    if not acquired:
        why = "" if wait or on_busy == "skip" else \
            " (a search of several processes does not wait: rerun it when that one ends)"
        log(f"being written by {lock.holder()}, skipped{why}: {run_dir}")
        return SearchResult(run_dir, platform.broadcast("busy"), None)
    if lock.unsupported:
        log(f"warning: {run_dir} cannot be locked ({lock.unsupported}): nothing stops "
            "another process from writing this run at the same time")
    summary, problem = read_summary(run_dir, config_hashes(cfg))
    if summary is not None:  # the writer we waited for finished it
        platform.broadcast("skipped")
        return _finished_already(run_dir, summary, embed_weights, log, locked=True)
    if problem:
        again = "from its checkpoint" if (run_dir / CHECKPOINT).exists() else \
            "from the start (it has no checkpoint)"
        log(f"{run_dir}: {problem}; finishing the run again {again}")
    clean_temp_files(run_dir)
    (run_dir / ERROR).unlink(missing_ok=True)
    try:
        atomic_write_text(run_dir / CONFIG, to_toml(cfg))
    except BaseException:
        platform.broadcast("failed")
        raise
    platform.broadcast("run")
    return None


def _quiet(_: str) -> None:
    """The log of a rank other than 0: silent, so a group prints each line once."""


def _finished_already(run_dir: Path, summary: dict[str, Any], embed_weights: bool,
                      log: Callable[[str], None], locked: bool) -> SearchResult:
    """A finished run skipped; its ticket rewritten with the weights when asked (locked)."""
    log(f"finished already, skipped: {run_dir}")
    if embed_weights:
        with RunLock(run_dir) as lock:
            if not locked:  # rewriting the ticket is a write: one writer at a time
                lock.acquire(wait=True, on_wait=lambda holder: log(
                    f"{run_dir.name} is being written by {holder}: waiting for it"))
            # the caller's own config names this run's model: its python: code is trusted
            ticket_io.embed_weights(run_dir / TICKET, trust_model=True)
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


def _search(cfg: Config, run_dir: Path, batches: Batches | StreamBatches, net: SltNetwork,
            platform: Platform, stop_after_epochs: int | None, stop_after_steps: int | None,
            embed_weights: bool, log: Callable[[str], None],
            stop_requested: Callable[[], bool] | None = None) -> SearchResult:
    """The search, in a run directory rank 0 holds the lock of: restore, epochs, finish."""
    search = Search(cfg, run_dir, batches, net, platform, log)
    search.stop_requested = stop_requested or never
    search.restore()
    here = (search.progress.epoch, search.progress.step)
    first = platform.broadcast(here)
    if here != first:  # this rank read another checkpoint (or none) than rank 0
        raise SltError(f"rank {platform.rank} resumes after epoch/step {here}, rank 0 after "
                       f"{first}: every rank must read rank 0's {run_dir}; put --out on a "
                       "filesystem that every node shares")
    if platform.is_main:
        search.repair_metrics()
    if cfg.run.tensorboard:  # appends after the checkpoint's step, dropping anything later
        p = search.progress
        search.tb = TensorBoardLog(run_dir, p.epoch * search.steps_per_epoch + p.step, platform)
    try:
        epochs_now = 0
        for epoch in range(search.progress.epoch + 1, cfg.search.epochs + 1):
            if not search.train_epoch(epoch, stop_after_steps) or (
                    search.stopping and epoch < cfg.search.epochs):
                return SearchResult(run_dir, "stopped", None)
            epochs_now += 1
            if stop_after_epochs is not None and epochs_now >= stop_after_epochs \
                    and epoch < cfg.search.epochs:
                return SearchResult(run_dir, "stopped", None)
        return search.finish(embed_weights)
    finally:
        if search.tb is not None:
            search.tb.close()
