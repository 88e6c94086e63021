"""A sweep file: base config, overrides and axes expanded into a plan of points, each an
ordinary run with its own run id; and the outcome of running them."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slt.analysis import THEORY, theory_width
from slt.config.checks import check_alternatives
from slt.config.ids import run_id
from slt.config.schema import Config
from slt.config.toml import check_key, read_toml, resolve_config_path, set_key
from slt.errors import ConfigError, SltError
from slt.resolve import resolve

SWEEP_KEYS = ("base", "set", "axes", "launcher")


def _flatten(table: dict[str, Any], origin: str) -> dict[str, Any]:
    """{"source": {"density": v}} (TOML dotted keys) -> {"source.density": v}; a scoring
    rule's table {"search": {"scorer": {"name": n, "lam": v}}} -> search.scorer = n and
    search.scorer.lam = v; a [model.kwargs] table -> model.kwargs.NAME = v."""
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
            if (section, key) == ("model", "kwargs") and isinstance(value, dict):
                # a reference's factory arguments: one model.kwargs.NAME key each
                flat.update({f"model.kwargs.{name}": v for name, v in value.items()})
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
    launcher: dict[str, Any] = field(default_factory=dict)  # [launcher]: jobs' resources

    def points(self, overrides: dict[str, Any] | None = None) -> list[Point]:
        """Every grid point in axis order (the last axis varies fastest). A command-line
        override of an axis is an error: the points would claim values they did not use."""
        for key in overrides or {}:
            if key in self.axes:
                raise ConfigError(f"--set {key}: {key} is an axis of {self.path} (values "
                                  f"{self.axes[key]}); change the axis in the file instead")
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
                density = resolve(raw, str(self.path)).source.density
                set_key(raw, "model.width", round(theory_width(density), 4))
            return Point(values, resolve(raw, str(self.path)))
        except ConfigError as exc:
            return Point(values, None, str(exc))


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read a sweep file; its base config is a path relative to the file or a packaged name."""
    p = resolve_config_path(path)
    raw = read_toml(p)
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{p}: unknown sweep key '{key}' (expected base, [set], [axes], "
                              "[launcher])")
    if "base" in raw:
        if not isinstance(raw["base"], str):
            raise ConfigError(f"{p}: base must be the path of a config file")
        local = p.parent / raw["base"]
        base = read_toml(local if local.is_file() else raw["base"])
    else:
        base = {}
    fixed = _flatten(raw.get("set", {}), f"{p} [set]")
    axes = _flatten(raw.get("axes", {}), f"{p} [axes]")
    check_alternatives(fixed, f"{p} [set]")  # within a table, keep and ticket_density clash
    check_alternatives(axes, f"{p} [axes]")
    for dotted, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p} [axes]: {dotted} must be a non-empty list of values")
    for dotted, value in fixed.items():
        if value == THEORY and dotted != "model.width":
            raise ConfigError(f"{p} [set]: '{THEORY}' is only a value of model.width")
    launcher = raw.get("launcher", {})
    if not isinstance(launcher, dict):
        raise ConfigError(f"{p}: [launcher] must be a table of keys")
    return Sweep(p, base, fixed, axes, launcher)


@dataclass
class SweepOutcome:
    """What happened to each run (`done`, `failed`, `busy`: one entry per run directory) and
    to the points that were not valid (`skipped`). `points` are all valid points, several of
    which may share one run."""

    done: list[tuple[Point, str]] = field(default_factory=list)  # (point, status)
    failed: list[tuple[Point, str]] = field(default_factory=list)  # (point, error)
    busy: list[Point] = field(default_factory=list)  # written by another process meanwhile
    skipped: list[Point] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)

    def line(self, out: object) -> str:
        """The one-line summary `slt sweep` prints."""
        busy = f"{len(self.busy)} being run by another process, " if self.busy else ""
        return (f"{len(self.done)} runs done, {len(self.failed)} failed, {busy}"
                f"{len(self.skipped)} points skipped -> {out}")


Runner = Callable[[Config, str], tuple[str, str]]


def plan(sweep: Sweep, root: Path, overrides: dict[str, Any], threads: int,
          log: Callable[[str], None]) -> tuple[SweepOutcome, dict[str, Point]]:
    """The valid points, one per run id, in the order they run (`runs`), and the output
    folder made."""
    outcome, unique = runs(sweep, overrides, threads, log)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SltError(f"cannot create the sweep folder {root}: {exc.strerror}") from None
    return outcome, unique


def runs(sweep: Sweep, overrides: dict[str, Any], threads: int,
         log: Callable[[str], None]) -> tuple[SweepOutcome, dict[str, Point]]:
    """The valid points, one per run id (points with one run id compute the same thing:
    every scheme at density 1, or width 1 and "theory" there), longest first, each with
    `threads` torch threads unless it sets its own (0: torch's default). Touches no file:
    `slt sweep --dry-run` lists what this returns."""
    points = sweep.points(overrides)
    outcome = SweepOutcome(skipped=[p for p in points if p.config is None])
    todo = [p for p in points if p.config is not None]
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
    return outcome, longest_first(unique)


def cost(cfg: Config) -> float | None:
    """A run's expected length up to a constant: its network's prunable weights (what a step
    costs grows with them) times its epochs. None where the data's shape is not known
    without reading the data (an image folder)."""
    from slt.network import count_weights
    from slt.overview import known_spec

    try:
        return float(count_weights(cfg, known_spec(cfg.data)).n_prunable) * cfg.search.epochs
    except (SltError, ValueError, RuntimeError):  # an unknown shape, an invalid network
        return None


def longest_first(unique: dict[str, Point]) -> dict[str, Point]:
    """The runs, longest first, so that a pool of workers does not end with one worker
    running the widest points alone; ties keep the file's order. Where one run's length
    cannot be estimated, the file's order stands."""
    costs = {rid: cost(p.config) for rid, p in unique.items() if p.config is not None}
    if len(costs) != len(unique) or any(c is None for c in costs.values()):
        return unique
    order = sorted(unique, key=lambda rid: -(costs[rid] or 0.0))
    return {rid: unique[rid] for rid in order}


def _with_threads(cfg: Config, threads: int) -> Config:
    """The point's config as a worker runs it: no progress bar, `threads` unless it sets its own."""
    run = replace(cfg.run, progress=False, threads=cfg.run.threads or threads)
    return replace(cfg, run=run)
