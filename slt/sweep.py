"""Sweeps: many searches from one base config and a grid of config values.

A sweep file (TOML) names a base config, values shared by every point (`[set]`) and the
axes of the grid (`[axes]`, each key a list). Every point is an ordinary run directory
under the output folder, named by its config hash, so rerunning a sweep skips finished
points and resumes interrupted ones. Points that make no sense (a ticket denser than its
source) are listed and skipped; a point that fails at run time is recorded in its run
directory (`error.json`) and the sweep goes on.

    base = "mnist_lenet.toml"
    [set]
    search.epochs = 5
    [axes]
    source.density = [1.0, 0.5, 0.2, 0.1]
    model.width = [1, "theory"]
    run.seed = [0, 1, 2]
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slt.config import (
    Config,
    check_key,
    from_dict,
    read_toml,
    resolve_config_path,
    run_id,
    set_key,
    to_toml,
)
from slt.errors import ConfigError
from slt.fileio import atomic_write_text

THEORY = "theory"
SWEEP_KEYS = ("base", "set", "axes")


def theory_width(density: float) -> float:
    """Width multiplier the theory asks of a source of this density.

    Gadhikar et al. (2023) show that a random ER network of density d approximates a target
    network when it is wider by a factor 1/log(1/sparsity), with sparsity = 1 - d, i.e.
    w(d) = 1 / ln(1 / (1 - d)). The factor falls below 1 for d > 1 - 1/e, where the bound
    asks for no widening; a source is never narrower than the dense network, so the factor
    is clipped at 1 (and w(1) = 1).
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"theory width needs a density in (0, 1], got {density}")
    if density >= 1.0:
        return 1.0
    return max(1.0, 1.0 / math.log(1.0 / (1.0 - density)))


def _flatten(table: dict[str, Any], origin: str) -> dict[str, Any]:
    """{"source": {"density": v}} (TOML dotted keys) -> {"source.density": v}; a scoring
    rule's table {"search": {"scorer": {"name": n, "lam": v}}} -> search.scorer = n and
    search.scorer.lam = v."""
    flat: dict[str, Any] = {}
    for section, body in table.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: '{section}' must be section.key = value")
        for key, value in body.items():
            if (section, key) == ("search", "scorer") and isinstance(value, dict):
                if "name" in value:
                    flat["search.scorer"] = value["name"]
                for option, v in value.items():
                    if option != "name":
                        flat[f"search.scorer.{option}"] = v
                continue
            dotted = f"{section}.{key}"
            check_key(dotted, origin)
            flat[dotted] = value
    return flat


@dataclass(frozen=True)
class Point:
    """One grid point: its axis values, and its config or why it was skipped."""

    values: dict[str, Any]
    config: Config | None
    skipped: str = ""

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items())


@dataclass(frozen=True)
class Sweep:
    path: Path
    base: dict[str, Any]
    fixed: dict[str, Any]
    axes: dict[str, list[Any]] = field(default_factory=dict)

    def points(self, overrides: dict[str, Any] | None = None) -> list[Point]:
        """Every grid point in axis order (the last axis varies fastest)."""
        names = list(self.axes)
        out = []
        for combo in itertools.product(*(self.axes[n] for n in names)):
            values = dict(zip(names, combo))
            out.append(self._point(values, overrides or {}))
        return out

    def _point(self, values: dict[str, Any], overrides: dict[str, Any]) -> Point:
        raw = {k: dict(v) for k, v in self.base.items()}
        settings = {**self.fixed, **values, **overrides}
        theory = settings.get("model.width") == THEORY
        # the rule's name before its options, so options are never dropped by a new name
        order = sorted(settings, key=lambda k: k.startswith("search.scorer."))
        for dotted, value in ((k, settings[k]) for k in order):
            if not (dotted == "model.width" and theory):
                set_key(raw, dotted, value, str(self.path))
        try:
            if theory:
                density = from_dict(raw, str(self.path)).source.density
                set_key(raw, "model.width", round(theory_width(density), 4))
            return Point(values, from_dict(raw, str(self.path)))
        except ConfigError as exc:
            return Point(values, None, str(exc))


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read a sweep file; its base config is a path relative to the file or a packaged name."""
    p = resolve_config_path(path)
    raw = read_toml(p)
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{p}: unknown sweep key '{key}' (expected base, [set], [axes])")
    if "base" in raw:
        if not isinstance(raw["base"], str):
            raise ConfigError(f"{p}: base must be the path of a config file")
        local = p.parent / raw["base"]
        base = read_toml(local if local.is_file() else raw["base"])
    else:
        base = {}
    fixed = _flatten(raw.get("set", {}), f"{p} [set]")
    axes = _flatten(raw.get("axes", {}), f"{p} [axes]")
    for dotted, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p} [axes]: {dotted} must be a non-empty list of values")
    for dotted, value in fixed.items():
        if value == THEORY and dotted != "model.width":
            raise ConfigError(f"{p} [set]: '{THEORY}' is only a value of model.width")
    return Sweep(p, base, fixed, axes)


# --- running ---------------------------------------------------------------------------


def _write_error(cfg: Config, out_root: Path, message: str, detail: str) -> None:
    run_dir = out_root / run_id(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    atomic_write_text(run_dir / "error.json",
                      json.dumps({"error": message, "traceback": detail}, indent=2) + "\n")


def run_point(cfg: Config, out_root: str) -> tuple[str, str]:
    """Run one point; never raises. Returns (status, error message)."""
    from slt.search import run_search

    root = Path(out_root)
    (root / run_id(cfg) / "error.json").unlink(missing_ok=True)  # a retry clears the old one
    try:
        result = run_search(cfg, root, log=lambda _: None)
        return result.status, ""
    except Exception as exc:  # recorded, not raised: one point must not stop the sweep
        message = f"{type(exc).__name__}: {exc}".strip()
        _write_error(cfg, root, message, traceback.format_exc())
        return "failed", message
    # KeyboardInterrupt passes: an interrupted run resumes on the next sweep, not a failure


def _with_threads(cfg: Config, threads: int) -> Config:
    import dataclasses

    run = dataclasses.replace(cfg.run, progress=False,
                              threads=cfg.run.threads or threads)
    return dataclasses.replace(cfg, run=run)


@dataclass
class SweepOutcome:
    """What happened to each run (`done`, `failed`; one entry per run directory) and to the
    points that were not valid (`skipped`). `points` are all valid points, several of which
    may share one run."""

    done: list[tuple[Point, str]] = field(default_factory=list)  # (point, status)
    failed: list[tuple[Point, str]] = field(default_factory=list)  # (point, error)
    skipped: list[Point] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)


def _results(points: list[Point], out_root: Path, workers: int,
             runner: Callable[[Config, str], tuple[str, str]]
             ) -> Iterator[tuple[Point, tuple[str, str]]]:
    if workers <= 1:
        for p in points:
            assert p.config is not None
            yield p, runner(p.config, str(out_root))
        return
    ctx = get_context("spawn")  # a fresh interpreter per worker: no inherited torch state
    queue = list(points)
    while queue:
        # A worker that dies (killed, out of memory) breaks the pool: its points are
        # recorded as failed and a new pool takes the rest.
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending: dict[Future, Point] = {}
            broken = False
            while (queue and not broken) or pending:
                while queue and not broken and len(pending) < workers:
                    p = queue.pop(0)
                    assert p.config is not None
                    pending[pool.submit(runner, p.config, str(out_root))] = p
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    p = pending.pop(fut)
                    try:
                        yield p, fut.result()
                    except BrokenProcessPool:
                        broken = True
                        message = "the worker process running it died"
                        _write_error(p.config, Path(out_root), message, "")  # type: ignore[arg-type]
                        yield p, ("failed", message)


def run_sweep(sweep: Sweep, out_root: str | os.PathLike[str], workers: int = 1,
              overrides: dict[str, Any] | None = None, progress: bool = True,
              log: Callable[[str], None] = print,
              runner: Callable[[Config, str], tuple[str, str]] = run_point) -> SweepOutcome:
    """Run every valid point (in `workers` processes) and report what happened."""
    root = Path(out_root)
    points = sweep.points(overrides)
    outcome = SweepOutcome(skipped=[p for p in points if p.config is None])
    todo = [p for p in points if p.config is not None]
    # Points with one run id compute the same thing (every scheme at density 1, or width 1
    # and "theory" there): run each once.
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    unique: dict[str, Point] = {}
    for p in todo:
        assert p.config is not None
        unique.setdefault(run_id(p.config), Point(p.values, _with_threads(p.config, threads)))
    outcome.points = todo
    for p in outcome.skipped:
        log(f"skipped ({p.label()}): {p.skipped}")
    if not unique:
        reason = outcome.skipped[0].skipped if outcome.skipped else "the grid is empty"
        raise ConfigError(f"no point of {sweep.path} is valid ({reason})")
    log(f"sweep {sweep.path.name}: {len(unique)} runs, {len(outcome.skipped)} points skipped, "
        f"{workers} worker{'s' if workers != 1 else ''} -> {root}")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bar = tqdm(total=len(unique), desc="points", unit="run", disable=not progress,
               dynamic_ncols=True)
    for p, (status, error) in _results(list(unique.values()), root, workers, runner):
        if status == "failed":
            outcome.failed.append((p, error))
            bar.write(f"failed ({p.label()}): {error}")
        else:
            outcome.done.append((p, status))
        bar.update(1)
    bar.close()
    _write_manifest(sweep, root, outcome, time.perf_counter() - t0)
    return outcome


def _write_manifest(sweep: Sweep, root: Path, outcome: SweepOutcome, seconds: float) -> None:
    """sweep-<name>.json in the output folder: every point, its run id and its run's status
    (points that share a run share its status)."""
    status: dict[str, dict[str, str]] = {}
    for p, s in outcome.done:
        status[run_id(p.config)] = {"status": s}  # type: ignore[arg-type]
    for p, e in outcome.failed:
        status[run_id(p.config)] = {"status": "failed", "error": e}  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    for p in outcome.points:
        rid = run_id(p.config)  # type: ignore[arg-type]
        rows.append({"values": p.values, "run_id": rid, **status.get(rid, {"status": "not run"})})
    rows += [{"values": p.values, "status": "skipped", "reason": p.skipped}
             for p in outcome.skipped]
    body = {"sweep": str(sweep.path), "axes": sweep.axes, "set": sweep.fixed,
            "seconds": seconds, "points": rows}
    atomic_write_text(root / f"sweep-{sweep.path.stem}.json",
                      json.dumps(body, indent=2, default=str) + "\n")
