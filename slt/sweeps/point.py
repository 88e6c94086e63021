"""One sweep point run as an ordinary search, shared by the local worker pool and SLURM
jobs: its threads set, its failure written where the report reads it."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slt.config.ids import run_id
from slt.config.schema import Config
from slt.config.toml import to_toml
from slt.errors import SltError
from slt.fileio import atomic_write_text
from slt.rundir import CONFIG, ERROR, RunLock, locate_run


def write_error(cfg: Config, out_root: Path, message: str, detail: str) -> None:
    """error.json (and config.toml) for a point that failed; best effort: the failure may be
    the disk itself, and the sweep must go on either way. Under the run's lock: when another
    process has taken the point meanwhile, its live run is not marked failed."""
    try:
        run_dir = locate_run(out_root, cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir) as lock:
            if not lock.acquire(wait=False):
                return
            if not (run_dir / CONFIG).is_file():
                atomic_write_text(run_dir / CONFIG, to_toml(cfg))
            atomic_write_text(run_dir / ERROR, json.dumps(
                {"error": message, "traceback": detail}, indent=2) + "\n")
    except (OSError, SltError):
        pass


def run_point(cfg: Config, out_root: str, stop_requested: Callable[[], bool] | None = None,
              platform: Any = None, log: Callable[[str], None] | None = None
              ) -> tuple[str, str]:
    """Run one point; never raises. Returns (status, error message). A point that another
    process is writing is skipped (status "busy"), so sweeps side by side split the grid.
    A cluster job passes its preemption notice (`stop_requested`) and its `platform`."""
    from slt.engine.run import run_search

    root = Path(out_root)
    try:
        result = run_search(cfg, root, log=log or (lambda _: None), on_busy="skip",
                            platform=platform, stop_requested=stop_requested)
        return result.status, ""
    except Exception as exc:  # recorded, not raised: one point must not stop the sweep
        message = str(exc) if isinstance(exc, SltError) else f"{type(exc).__name__}: {exc}"
        if not (root / run_id(cfg) / ERROR).is_file():  # failed before the run took its lock
            write_error(cfg, root, message.strip(), traceback.format_exc())
        return "failed", message.strip()
