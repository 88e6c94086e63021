"""`slt sweep FILE --dry-run`: every run of a sweep in the order it would start, its state
in the output folder, its epochs and an estimate of its time, then the totals. Runs nothing
and writes nothing: the folder is only read (the states `slt sweep status` reads)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slt.config.ids import legacy_run_id
from slt.config.schema import Config
from slt.overview import known_spec
from slt.sweeps.estimate import Network, Timings, measure, network_of, read_bench, steps_per_epoch
from slt.sweeps.grid import Point, Sweep, runs
from slt.sweeps.status import point_state

# `slt sweep status`'s words, as a dry run means them: what a rerun does with the point
STATES = {"not started": "new", "interrupted": "partial", "running": "running elsewhere"}
COUNTED = ("finished", "partial", "failed", "running elsewhere", "new")


@dataclass(frozen=True)
class Row:
    """One run as the sweep would take it up: its state, what is left of it, and its cost."""

    order: int
    run_id: str
    values: dict[str, Any]
    state: str  # finished, partial, failed, running elsewhere, new
    detail: str
    epochs: int  # the run's epochs
    epochs_left: int  # what the sweep would run of them (0: finished, or left to another)
    steps_left: int | None  # None: the data's size is not known without reading it
    ms_per_step: float | None
    network: Network | None

    @property
    def seconds(self) -> float | None:
        if self.epochs_left == 0:
            return 0.0
        if self.steps_left is None or self.ms_per_step is None:
            return None
        return self.steps_left * self.ms_per_step / 1e3


@dataclass
class DryRun:
    sweep: Path
    out: Path
    parallel: int  # workers, or jobs at once
    points: int  # grid points, skipped ones included
    rows: list[Row] = field(default_factory=list)
    skipped: list[Point] = field(default_factory=list)
    timings: Timings | None = None

    def total_seconds(self) -> float:
        return sum(r.seconds or 0.0 for r in self.rows)

    def wall_seconds(self) -> float:
        """The pool's wall time: each run, in order, goes to the first worker free."""
        return pool_wall([r.seconds or 0.0 for r in self.rows], self.parallel)


def pool_wall(seconds: list[float], workers: int) -> float:
    """Wall time of `workers` processes taking jobs of these lengths in this order, each
    the next job as soon as it is free (as the local pool and a job array do)."""
    free = [0.0] * max(1, workers)
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def _state(root: Path, rid: str, cfg: Config, values: dict[str, Any]) -> tuple[str, str, int]:
    """(state, detail, epochs done) of a run from its directory (today's name, else the
    name it had before run ids hashed only changed values), read only."""
    from slt.reporting.runs import Run, load_run

    run = None
    for name in (rid, legacy_run_id(cfg)):
        if (root / name).is_dir():
            run = load_run(root / name)
            if run is not None:
                break
    state = point_state(rid, values, run, {}, "", False)
    done = run.epochs_done if isinstance(run, Run) else 0
    return STATES.get(state.state, state.state), state.detail, done


def dry_run(sweep: Sweep, out: str | Path, overrides: dict[str, Any], parallel: int,
            threads: int, bench: str | None = None, steps: int = 2,
            log: Callable[[str], None] = print) -> DryRun:
    """The sweep's runs in the order they would start (longest first), each with its state
    under `out`, what is left of it and its estimated time: ms/step from `bench` (a
    `slt bench search --json` file) or timed here, `steps` steps per network."""
    skipped_log: list[str] = []
    outcome, unique = runs(sweep, overrides, threads, skipped_log.append)
    timings = read_bench(bench) if bench else None  # a bad file: one line, before timing
    root = Path(out)
    result = DryRun(sweep.path, root, parallel, len(outcome.points) + len(outcome.skipped),
                    skipped=outcome.skipped)
    found: list[tuple[str, Point, str, str, int, Network | None]] = []
    for rid, p in unique.items():
        assert p.config is not None
        state, detail, done = _state(root, rid, p.config, p.values) if root.is_dir() \
            else ("new", "", 0)
        epochs = p.config.search.epochs
        left = 0 if state in ("finished", "running elsewhere") else max(0, epochs - done)
        found.append((rid, p, state, detail, left, _network(p.config)))
    if timings is None:
        todo: dict[Network, Config] = {}  # each network once, at its densest source to run
        for _, p, _, _, left, net in found:
            assert p.config is not None
            if net is not None and left and (
                    net not in todo or p.config.source.density > todo[net].source.density):
                todo[net] = p.config
        timings = measure(todo, steps, threads, log)
    result.timings = timings
    for i, (rid, p, state, detail, left, net) in enumerate(found, 1):
        assert p.config is not None
        per_epoch = steps_per_epoch(p.config)
        result.rows.append(Row(
            i, rid, p.values, state, detail, p.config.search.epochs, left,
            None if per_epoch is None else per_epoch * left,
            timings.ms.get(net) if net is not None else None, net))
    return result


def _network(cfg: Config) -> Network | None:
    """The network a point runs, None where the data's shape is unknown without reading it."""
    from slt.errors import ConfigError

    try:
        spec = known_spec(cfg.data)
    except ConfigError:
        return None
    return network_of(cfg, spec.shape)


def duration(seconds: float | None) -> str:
    """4.2s, 6m31s, 2h05m, 3d04h; '?' when unknown."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours == 0:
        return f"{minutes}m{secs:02d}s"
    days, hours = divmod(hours, 24)
    return f"{hours}h{minutes:02d}m" if days == 0 else f"{days}d{hours:02d}h"


def _row_line(r: Row, width: int, state_width: int) -> str:
    steps = "?" if r.steps_left is None else f"{r.steps_left:,}"
    ms = "-" if r.epochs_left == 0 else "?" if r.ms_per_step is None else f"{r.ms_per_step:.1f}"
    label = ", ".join(f"{k}={v}" for k, v in r.values.items())
    why = f"  failed: {r.detail}" if r.state == "failed" and r.detail else ""
    return (f"{r.order:4d}  {r.run_id:<{width}s}  {r.state:<{state_width}s} "
            f"{r.epochs_left:>4d}/{r.epochs:<4d} {steps:>10s} {ms:>9s} "
            f"{duration(r.seconds):>8s}" + (f"  [{label}]" if label else "") + why)


def format_dry_run(d: DryRun, workers_word: str = "workers") -> str:
    """The listing `slt sweep --dry-run` prints: one line per run, then totals and caveat."""
    width = max((len(r.run_id) for r in d.rows), default=6)
    state_width = max((len(r.state) for r in d.rows), default=5)
    lines = [f"dry run of {d.sweep.name} into {d.out}: {d.points} points, {len(d.rows)} runs, "
             f"{len(d.skipped)} skipped; nothing is run or written",
             f"{'#':>4s}  {'run id':<{width}s}  {'state':<{state_width}s} {'epochs':>9s} "
             f"{'steps':>10s} {'ms/step':>9s} {'estimate':>8s}"]
    lines += [_row_line(r, width, state_width) for r in d.rows]
    lines += [f"skipped ({p.label()}): {p.skipped}" for p in d.skipped]
    counts = {s: sum(r.state == s for r in d.rows) for s in COUNTED}
    unknown = [r for r in d.rows if r.seconds is None]
    epochs = sum(r.epochs_left for r in d.rows)
    steps = sum(r.steps_left or 0 for r in d.rows)
    lines.append(f"{len(d.rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                 + f"; {epochs:,} epochs, {steps:,} steps to run")
    lines.append(f"estimate: {duration(d.total_seconds())} of search steps in all, about "
                 f"{duration(d.wall_seconds())} wall with {d.parallel} {workers_word} "
                 "(longest first)" + (f"; {len(unknown)} runs without an estimate, not "
                                      "counted" if unknown else ""))
    assert d.timings is not None
    for net, why in d.timings.failed.items():
        lines.append(f"could not time {net.label()}: {why}")
    missing = {r.network for r in d.rows if r.network is not None and r.seconds is None
               and r.network not in d.timings.failed}
    for net in sorted(missing, key=lambda n: n.label()):
        lines.append(f"no ms/step for {net.label()}: time it with {net.bench_command()}")
    lines.append(f"caveat: an estimate is steps left x ms/step ({d.timings.source}); one "
                 "timing per network, at its densest source: sparser sources run the same "
                 "dense convolutions but a smaller top-k and score update, so their estimates "
                 "run high (by ~10% at d=0.2 for ResNet-18 on a CPU). Evaluation, data "
                 "loading, start-up and checkpoints are not in it, and runs sharing one GPU "
                 "are taken not to slow each other.")
    return "\n".join(lines)
