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
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slt.config import (
    Config,
    check_alternatives,
    check_key,
    config_hashes,
    read_toml,
    resolve_config_path,
    run_id,
    set_key,
    to_toml,
)
from slt.errors import ConfigError, SltError
from slt.fileio import atomic_write_text
from slt.resolve import resolve
from slt.rundir import CONFIG, ERROR, RunLock, locate_run, read_summary

THEORY = "theory"
SWEEP_KEYS = ("base", "set", "axes", "launcher")
# Exit code of a worker that found itself re-running the sweep's script (no main guard).
REIMPORTED_MAIN = 86


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


# --- running ---------------------------------------------------------------------------


def _write_error(cfg: Config, out_root: Path, message: str, detail: str) -> None:
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
    from slt.engine import run_search

    root = Path(out_root)
    try:
        result = run_search(cfg, root, log=log or (lambda _: None), on_busy="skip",
                            platform=platform, stop_requested=stop_requested)
        return result.status, ""
    except Exception as exc:  # recorded, not raised: one point must not stop the sweep
        message = str(exc) if isinstance(exc, SltError) else f"{type(exc).__name__}: {exc}"
        if not (root / run_id(cfg) / ERROR).is_file():  # failed before the run took its lock
            _write_error(cfg, root, message.strip(), traceback.format_exc())
        return "failed", message.strip()
    # KeyboardInterrupt passes: an interrupted run resumes on the next sweep, not a failure


def _with_threads(cfg: Config, threads: int) -> Config:
    import dataclasses

    run = dataclasses.replace(cfg.run, progress=False,
                              threads=cfg.run.threads or threads)
    return dataclasses.replace(cfg, run=run)


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


def _die_with(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when the sweep process dies (Linux), so a
    sweep killed outright leaves no orphan training on, holding its point's lock."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: a worker finds out at its next point (EOFError)
    if os.getppid() != parent:  # the sweep died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _serve(conn: Connection, runner: Runner, out_root: str, parent: int) -> None:
    """A worker process: run the points it is sent, one at a time, until told to stop."""
    _die_with(parent)
    try:
        while (cfg := conn.recv()) is not None:
            conn.send(runner(cfg, out_root))
    except (KeyboardInterrupt, EOFError):  # Ctrl-C, or the sweep went away: exit cleanly,
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # deaf to a second Ctrl-C meanwhile


def exit_if_reimported_main() -> None:
    """In a worker process still importing the sweep's script (spawn re-imports the main
    module), leave quietly with REIMPORTED_MAIN: the script calls slt.sweep at its top
    level, outside `if __name__ == "__main__":`, so the worker would start the sweep again.
    The sweep process sees the code and says so in one line (`no_main_guard`), instead of
    every point failing with multiprocessing's traceback. `_inheriting` is the flag
    multiprocessing itself checks for this (spawn._check_not_importing_main)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(REIMPORTED_MAIN)


def no_main_guard() -> SltError:
    """The one line for a sweep whose workers re-ran the script that started it."""
    script = getattr(sys.modules.get("__main__"), "__file__", None) or "the script"
    return SltError(f"slt.sweep with workers > 1 was called at the top level of {script}: "
                    "every worker process imports the script again and would start the "
                    "sweep again; put the script's code under "
                    "'if __name__ == \"__main__\":' (docs/api.md)")


def _death(code: int | None) -> str:
    """Why a worker process ended without answering, from its exit code."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (e.g. by the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"the worker process running it was killed by {name}{hint}"
    return f"the worker process running it died (exit code {code})"


class _Worker:
    def __init__(self, ctx: Any, runner: Runner, out_root: str) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, runner, out_root, os.getpid()),
                                daemon=True)
        self.proc.start()
        child.close()
        self.point: Point | None = None

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


def _results(points: list[Point], out_root: Path, workers: int, runner: Runner
             ) -> Iterator[tuple[Point, tuple[str, str]]]:
    if workers <= 1:
        for p in points:
            assert p.config is not None
            yield p, runner(p.config, str(out_root))
        return
    # Long-lived worker processes, each running one point at a time. One that dies (killed,
    # out of memory) fails only the point it was running, and a new worker replaces it.
    ctx = get_context("spawn")  # a fresh interpreter per worker: no inherited torch state
    queue = list(points)
    idle: list[_Worker] = []
    busy: list[_Worker] = []
    interrupted = False
    try:
        while queue or busy:
            while queue and len(busy) < workers:
                w = idle.pop() if idle else _Worker(ctx, runner, str(out_root))
                w.point = queue.pop(0)
                assert w.point.config is not None
                w.conn.send(w.point.config)
                busy.append(w)
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
            for w in [w for w in busy if w.conn in ready or w.proc.sentinel in ready]:
                point = w.point
                assert point is not None and point.config is not None
                busy.remove(w)
                try:
                    result = w.conn.recv()
                except (EOFError, OSError):  # died before answering
                    w.proc.join(5)
                    if w.proc.exitcode == REIMPORTED_MAIN:  # nothing ran: no point failed
                        w.stop()
                        raise no_main_guard() from None
                    message = _death(w.proc.exitcode)
                    _write_error(point.config, out_root, message, "")
                    w.stop()
                    yield point, ("failed", message)
                    continue
                idle.append(w)
                yield point, result
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        for w in idle:
            w.stop()
        for w in busy:  # stopped mid-point: the run resumes from its checkpoint later
            if interrupted:  # let it stop as Ctrl-C stops a search: lock released, no trace
                w.proc.join(2)  # a terminal's Ctrl-C reached it already
                if w.proc.is_alive():
                    os.kill(w.proc.pid, signal.SIGINT)
                    w.proc.join(30)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(5)


def run_sweep(sweep: Sweep, out_root: str | os.PathLike[str], workers: int = 1,
              overrides: dict[str, Any] | None = None, progress: bool = True,
              log: Callable[[str], None] = print, runner: Runner = run_point) -> SweepOutcome:
    """Run every valid point (in `workers` processes) and report what happened. The sweep
    record is written at the end whatever happened to the points."""
    if workers > 1:
        exit_if_reimported_main()
    root = Path(out_root)
    overrides = dict(overrides or {})
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    outcome, unique = _plan(sweep, root, overrides, threads, log)
    log(f"sweep {sweep.path.name}: {len(unique)} runs, {len(outcome.skipped)} points skipped, "
        f"{workers} worker{'s' if workers != 1 else ''} -> {root}")
    t0 = time.perf_counter()
    bar = tqdm(total=len(unique), desc="points", unit="run", disable=not progress,
               dynamic_ncols=True)
    try:
        for p, (status, error) in _results(list(unique.values()), root, workers, runner):
            if status == "failed":
                outcome.failed.append((p, error))
                bar.write(f"failed ({p.label()}): {error}")
            elif status == "busy":
                outcome.busy.append(p)
                bar.write(f"being run by another process, left to it ({p.label()})")
            else:
                outcome.done.append((p, status))
            bar.update(1)
    finally:  # the record of what happened, Ctrl-C included
        bar.close()
        _write_manifest(sweep, root, outcome, overrides, workers, time.perf_counter() - t0)
    return outcome


def _plan(sweep: Sweep, root: Path, overrides: dict[str, Any], threads: int,
          log: Callable[[str], None]) -> tuple[SweepOutcome, dict[str, Point]]:
    """The valid points, one per run id (points with one run id compute the same thing:
    every scheme at density 1, or width 1 and "theory" there), each with `threads` torch
    threads unless it sets its own (0: torch's default), and the output folder made."""
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
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SltError(f"cannot create the sweep folder {root}: {exc.strerror}") from None
    return outcome, unique


def launch_sweep(sweep: Sweep, out_root: str | os.PathLike[str], kind: str,
                 resources: Any, overrides: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> Any:
    """Queue every valid point as a job (`kind`: "slurm" or "submitit-local") and write the
    sweep record; returns launch.Submitted once the jobs are queued."""
    from slt.launch import submit

    root = Path(out_root)
    overrides = dict(overrides or {})
    # a job's threads: the cpus it asked for, else torch's own default
    outcome, unique = _plan(sweep, root, overrides, resources.cpus_per_task, log)
    points = [(rid, p.config, p.values) for rid, p in unique.items()]
    t0 = time.perf_counter()
    queued = SweepOutcome(skipped=outcome.skipped, points=outcome.points,
                          done=[(p, "queued") for p in unique.values()])
    # the record first, so `slt sweep status` knows every point while jobs are submitted
    _write_manifest(sweep, root, queued, overrides, 0, 0.0, launcher=kind,
                    submitter=os.getpid())
    sent = submit(points, root, sweep.path.stem, kind, resources, log)
    for rid, p in unique.items():
        if rid in sent.finished:
            outcome.done.append((p, "skipped"))
        elif rid in sent.running:
            outcome.busy.append(p)
        else:
            outcome.done.append((p, "queued"))
    _write_manifest(sweep, root, outcome, overrides, 0, time.perf_counter() - t0,
                    launcher=kind, jobs=sent.jobs)
    return sent


def _write_manifest(sweep: Sweep, root: Path, outcome: SweepOutcome, overrides: dict[str, Any],
                    workers: int, seconds: float, launcher: str = "local",
                    jobs: dict[str, str] | None = None, submitter: int | None = None) -> None:
    """sweep-<name>.json in the output folder: the settings used (the file's [set] and the
    command line's --set), every point, its run id and its run's status (points that share
    a run share its status; "not run" after an interruption)."""
    status: dict[str, dict[str, str]] = {}
    for p, s in outcome.done:
        status[run_id(p.config)] = {"status": s}  # type: ignore[arg-type]
    for p, e in outcome.failed:
        status[run_id(p.config)] = {"status": "failed", "error": e}  # type: ignore[arg-type]
    for p in outcome.busy:  # finished by the other process since, or still running there
        rid = run_id(p.config)  # type: ignore[arg-type]
        done = read_summary(root / rid, config_hashes(p.config))[0]  # type: ignore[arg-type]
        status[rid] = {"status": "finished elsewhere" if done else "running elsewhere"}
    rows: list[dict[str, Any]] = []
    for p in outcome.points:
        rid = run_id(p.config)  # type: ignore[arg-type]
        row = {"values": p.values, "run_id": rid, **status.get(rid, {"status": "not run"})}
        if jobs and rid in jobs:
            row["job_id"] = jobs[rid]
        rows.append(row)
    rows += [{"values": p.values, "status": "skipped", "reason": p.skipped}
             for p in outcome.skipped]
    body = {"sweep": str(sweep.path), "base": sweep.base, "axes": sweep.axes,
            "set": sweep.fixed, "overrides": overrides, "workers": workers, "seconds": seconds,
            "launcher": launcher, "points": rows}
    if submitter is not None:  # a launch still submitting: its points wait for it
        body["submitter"] = {"pid": submitter, "host": socket.gethostname()}
    path = root / f"sweep-{sweep.path.stem}.json"
    try:
        atomic_write_text(path, json.dumps(body, indent=2, default=str) + "\n")
    except (OSError, SltError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise SltError(f"the sweep ran, but its record {path} could not be written "
                       f"({reason}); the run directories hold every result") from None
