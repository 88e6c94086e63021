"""Run directories read for the report: each run's settings, summary and metrics, and the
runs that cannot be read, named rather than dropped."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slt.analysis import THEORY, theory_width
from slt.config.checks import from_dict, is_reference
from slt.config.ids import NOT_HASHED, config_hashes
from slt.config.schema import Config, dense_source
from slt.config.toml import read_toml
from slt.errors import SltError
from slt.rundir import (
    CONFIG,
    ERROR,
    METRICS,
    RUN_FILES,
    holder_alive,
    read_json,
    read_metrics,
    read_summary,
)

ANY = "any"  # the scheme of a dense (d = 1) run
DENSITY, SEED, SCHEME, WIDTH = "source.density", "run.seed", "source.scheme", "model.width"
IN_SOURCE = "plant.in_source"
# Keys a dense (d = 1) run has as 'any': its source is the same whatever their value.
ANY_WHEN_DENSE = (SCHEME, IN_SOURCE)


@dataclass
class Run:
    path: Path
    config: Config
    status: str  # finished, running, interrupted (its process is gone: rerun it) or failed
    acc: float | None  # final test accuracy (last epoch's while running)
    epochs_done: int
    error: str
    summary: dict[str, Any] | None
    settings: dict[str, Any]

    @property
    def density(self) -> float:
        return self.config.source.density


# Model keys that only a model reference has (slt.config.checks refuses them otherwise).
REFERENCE_ONLY = ("kwargs", "bias", "norm")


def raw_settings(cfg: Config) -> dict[str, Any]:
    """The config keys that say what a run computes, flattened, as the run used them."""
    out: dict[str, Any] = {}
    reference = is_reference(cfg.model.name)
    for section, body in cfg.to_dict().items():
        if section == "plant" and not cfg.plant.enabled:
            continue  # no plant: none of its keys says anything about the run
        for key, value in body.items():
            if (section, key) in NOT_HASHED or (section, key) in (("search", "keep"),
                                                                  ("search", "ticket_density")):
                continue
            if section == "model" and (key in ("search_include", "search_exclude", "kwargs")
                                       and not value or key in REFERENCE_ONLY and not reference):
                continue  # not set, or not settable for a built-in model: no column
            if (section, key) == ("model", "kwargs"):  # "img_size=32, patch_size=4"
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, dict):  # a rule with options: "iterand(rate=0.2)"
                value = value["name"] + "(" + ", ".join(
                    f"{k}={v}" for k, v in value.items() if k != "name") + ")"
            out[f"{section}.{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def settings_of(cfg: Config) -> dict[str, Any]:
    """`raw_settings` for comparing runs: the ticket size as the run gave it (keep or
    absolute density), the scheme of a dense run as 'any', a theory width as 'theory'."""
    out = raw_settings(cfg)
    # The ticket size as the run set it: a fixed keep (a fraction of the source) compares
    # across densities as it is; otherwise the absolute ticket density.
    if cfg.search.keep is not None:
        out["search.keep"] = round(cfg.search.keep, 6)
    else:
        out["search.ticket_density"] = round(cfg.ticket_density, 6)
    if dense_source(cfg):
        out.update({key: ANY for key in ANY_WHEN_DENSE if key in out})
    d, w = cfg.source.density, cfg.model.width
    if d < 1.0 and w != 1.0 and math.isclose(w, round(theory_width(d), 4)):
        out[WIDTH] = THEORY  # a sweep's model.width = "theory" point
    return out


def json_or_none(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None where it is missing or unreadable."""
    return read_json(path)[0]


@dataclass(frozen=True)
class Unreadable:
    """A run directory the report could not use, and why (listed, never dropped silently)."""

    path: Path
    reason: str


def load_run(path: Path) -> Run | Unreadable | None:
    """A run directory's state, `Unreadable` with the reason when its files are damaged or
    cannot be read, or None for a folder that is not a run directory."""
    try:
        if not any((path / name).exists() for name in RUN_FILES):
            return None
        return _load_run(path)
    except OSError as exc:  # a folder or file this user may not read, say
        return Unreadable(path, f"{exc.filename or path}: {exc.strerror or exc}")


def _load_run(path: Path) -> Run | Unreadable:
    if not (path / CONFIG).is_file():
        return Unreadable(path, f"{CONFIG} is missing")
    try:  # the run's own resolved config: readable without the plug-ins it names
        cfg = from_dict(read_toml(path / CONFIG), str(path / CONFIG))
    except SltError as exc:  # damaged
        return Unreadable(path, str(exc))
    except UnicodeDecodeError as exc:
        return Unreadable(path, f"{CONFIG} is not UTF-8 text ({exc.reason})")
    summary, problem = read_summary(path, config_hashes(cfg))
    if problem:
        repair = "" if "cannot be read" in problem else \
            "; rerun its search to rebuild it from the checkpoint"
        return Unreadable(path, problem + repair)
    error, problem = read_json(path / ERROR)
    if problem:
        return Unreadable(path, problem)
    rows, _ = read_metrics(path / METRICS)  # a line cut short by a live writer is no fault
    if summary is not None:
        status, acc, done = "finished", summary["final_test_acc"], summary["epochs"]
    elif error is not None:
        status, acc, done = "failed", None, len(rows)
    else:  # nobody's lock on it any more: a killed or interrupted run, not a running one
        status = "interrupted" if holder_alive(path) is False else "running"
        done = len(rows)
        acc = rows[-1]["test_acc"] if rows else None
    return Run(path, cfg, status, acc, done, str((error or {}).get("error", "")), summary,
               settings_of(cfg))


def load_runs(root: str | os.PathLike[str]) -> tuple[list[Run], list[Unreadable]]:
    """The run directories directly under `root`, and those that could not be read."""
    root = Path(root)
    if not root.is_dir():
        raise SltError(f"no such folder of runs: {root}")
    runs: list[Run] = []
    unreadable: list[Unreadable] = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and (r := load_run(p)) is not None:
            (runs if isinstance(r, Run) else unreadable).append(r)
    if not runs and not unreadable:
        raise SltError(f"{root} holds no run directories (folders with a config.toml)")
    return runs, unreadable


def load_ticket_of(run: Run) -> tuple[Any, str]:
    """The run's ticket and "", or None and why it cannot be read."""
    from slt import ticket as ticket_io

    try:
        return ticket_io.load(run.path / "ticket.slt"), ""
    except SltError as exc:
        return None, str(exc)
