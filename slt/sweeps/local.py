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

import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slt.config.ids import config_hashes, run_id
from slt.errors import SltError
from slt.fileio import atomic_write_text
from slt.rundir import read_summary
from slt.sweeps.grid import Point, Runner, Sweep, SweepOutcome, plan
from slt.sweeps.point import run_point, write_error

# Exit code of a worker that found itself re-running the sweep's script (no main guard).
REIMPORTED_MAIN = 86


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
                    write_error(point.config, out_root, message, "")
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
    outcome, unique = plan(sweep, root, overrides, threads, log)
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


def launch_sweep(sweep: Sweep, out_root: str | os.PathLike[str], kind: str,
                 resources: Any, overrides: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> Any:
    """Queue every valid point as a job (`kind`: "slurm" or "submitit-local") and write the
    sweep record; returns slt.sweeps.record.Submitted once the jobs are queued."""
    from slt.sweeps.slurm import submit

    root = Path(out_root)
    overrides = dict(overrides or {})
    # a job's threads: the cpus it asked for, else torch's own default
    outcome, unique = plan(sweep, root, overrides, resources.cpus_per_task, log)
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
