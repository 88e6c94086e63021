"""`slt sweep status OUT`: where every point of a sweep stands, while it runs.

Read from what a sweep leaves under OUT and nothing else: the sweep records
(`sweep-*.json`: its points and run ids), the jobs records of a cluster launch
(`jobs-*.json`: run id -> job id), each run directory (summary, lock, metrics, error) and,
for jobs, the scheduler's own state. A point is

- finished (with its test accuracy), when its summary and ticket are intact;
- running (with its epoch), while a process holds its run directory's lock;
- failed (with the reason), from its error.json, or from the scheduler when its job ended
  (cancelled, timed out, killed) without finishing;
- queued, when its job waits for the scheduler (or starts);
- interrupted, when it stopped midway and nothing runs it: rerunning the sweep resumes it;
- not started, otherwise.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slt.errors import SltError
from slt.rundir import RUN_FILES, pid_alive
from slt.sweeps.record import DamagedRecord, read_jobs_checked, read_record, run_id_problem
from slt.sweeps.slurm import ENDED, WAITING, scheduler_states

if TYPE_CHECKING:
    from slt.reporting.runs import Run, Unreadable


@dataclass(frozen=True)
class PointState:
    run_id: str
    state: str  # finished, running, failed, queued, interrupted, not started
    detail: str  # accuracy, epoch, reason, job id
    values: dict[str, Any]


def _row_problem(row: Any) -> str:
    """Why one point of a sweep record is unusable ('' when fine; a skipped point, which
    has no run, is fine)."""
    if not isinstance(row, dict):
        return f"a point is not a table but {type(row).__name__}"
    rid = row.get("run_id")
    if rid is None and row.get("status") == "skipped":
        return ""
    if problem := run_id_problem(rid):
        return problem
    if not isinstance(row.get("values", {}), dict):
        return f"{rid}: values are not a table but {type(row['values']).__name__}"
    return ""


def _points(root: Path) -> tuple[dict[str, dict[str, Any]], set[str], list[DamagedRecord]]:
    """run id -> axis values, from every sweep record under `root` (points sharing a run
    appear once); the run ids a launch that is still submitting has yet to send; and the
    records (or their points) that could not be read, with the reason."""
    out: dict[str, dict[str, Any]] = {}
    waiting: set[str] = set()
    damaged: list[DamagedRecord] = []
    for path in sorted(root.glob("sweep-*.json")):
        body, why = read_record(path, "points")
        rows = body["points"] if body is not None else None
        if body is not None and not isinstance(rows, list):
            why = f"'points' is not a list (it is {type(rows).__name__})"
        if why:
            damaged.append(DamagedRecord(path, why, "points only it knew of are missing "
                                         "from this list"))
            continue
        assert body is not None and isinstance(rows, list)
        submitter = body.get("submitter")
        submitting = isinstance(submitter, dict) and submitter.get("host") == \
            socket.gethostname() and isinstance(submitter.get("pid"), int) and \
            submitter["pid"] > 0 and pid_alive(submitter["pid"])
        bad = []
        for row in rows:
            if problem := _row_problem(row):
                bad.append(problem)
                if not (isinstance(row, dict) and isinstance(row.get("run_id"), str)
                        and problem.startswith(f"{row['run_id']}: values")):
                    continue  # no run to show; a run without its values is still shown
                row = {**row, "values": {}}
            if row.get("run_id"):
                out.setdefault(row["run_id"], row.get("values", {}))
                if submitting and row.get("status") == "queued":
                    waiting.add(row["run_id"])
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            damaged.append(DamagedRecord(path, f"{len(bad)} of {len(rows)} points unreadable: "
                                         f"{bad[0]}{more}"))
    return out, waiting, damaged


def point_state(rid: str, values: dict[str, Any], run: Run | Unreadable | None,
                 job: dict[str, Any], sched: str, waiting: bool) -> PointState:
    """One point's state from its run directory (None when absent), its job record and the
    scheduler's state of that job ('' when none), and whether a live launch has yet to send it."""
    from slt.reporting.runs import Run

    jid = f"job {job['job_id']}" if job.get("job_id") else ""
    if run is not None and not isinstance(run, Run):
        return PointState(rid, "failed", f"damaged: {run.reason}", values)
    if run is not None and run.status == "finished":
        epochs = run.config.search.epochs
        return PointState(rid, "finished", f"test acc {run.acc:.4f} ({epochs} epochs)", values)
    if run is not None and run.status == "running" and sched not in ENDED | WAITING:
        # (a holder on another host cannot be asked whether it lives: the scheduler can)
        where = f"epoch {run.epochs_done + 1}/{run.config.search.epochs}"
        return PointState(rid, "running", " ".join(filter(None, (where, jid))), values)
    if run is not None and run.status == "failed" and sched not in WAITING | {"RUNNING"}:
        return PointState(rid, "failed", run.error, values)
    if sched in WAITING:
        return PointState(rid, "queued", " ".join(filter(None, (jid, sched.lower()))), values)
    if sched == "RUNNING":
        return PointState(rid, "queued", f"{jid} starting", values)
    if sched in ENDED:
        done = f", {run.epochs_done} epochs done" if run is not None else ""
        return PointState(rid, "failed", f"{jid} {sched.lower()}{done}: rerun the sweep to "
                          "resume it", values)
    if run is not None:
        return PointState(rid, "interrupted", f"{run.epochs_done}/{run.config.search.epochs} "
                          "epochs done: rerun the sweep to resume it", values)
    if waiting and not jid:
        return PointState(rid, "queued", "waiting for a free slot", values)
    detail = f"{jid} ended without starting it" if jid else ""
    return PointState(rid, "not started", detail, values)


def sweep_status(out_root: str | Path) -> list[PointState]:
    """Every point of the sweeps under `out_root`, and every run directory there."""
    from slt.reporting.runs import load_run

    root = Path(out_root)
    if not root.is_dir():
        raise SltError(f"no such sweep folder: {root}")
    points, waiting, damaged = _points(root)
    jobs, damaged_jobs = read_jobs_checked(root)
    damaged += damaged_jobs
    for rid, rec in jobs.items():
        points.setdefault(rid, rec.get("values", {}))
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any((d / name).exists() for name in RUN_FILES):  # not the report's folder
            points.setdefault(d.name, {})
    if not points:
        if damaged:  # nothing to show but the damage: that is the whole answer
            raise SltError(f"{root} holds no readable sweep record and no run directory: "
                           f"{damaged[0].path} is damaged: {damaged[0].reason}"
                           + (f"; and {len(damaged) - 1} more damaged records"
                              if len(damaged) > 1 else ""))
        raise SltError(f"{root} holds no sweep record and no run directory")
    live = scheduler_states({rid: jobs[rid] for rid in points if rid in jobs})
    states = []
    for rid, values in points.items():
        run = load_run(root / rid) if (root / rid).is_dir() else None
        states.append(point_state(rid, values, run, jobs.get(rid, {}), live.get(rid, ""),
                                   rid in waiting))
    states += [PointState(d.path.name, "damaged", str(d), {}) for d in damaged]
    return states


ORDER = ("finished", "running", "queued", "interrupted", "failed", "not started")


def format_status(states: list[PointState]) -> str:
    """One line per point, one per damaged record, then the counts (a damaged record is
    counted apart: it is a file, not a point)."""
    lines = []
    for s in states:
        label = ", ".join(f"{k}={v}" for k, v in s.values.items())
        lines.append(f"{s.state:11s} {s.run_id}  {s.detail}" + (f"  [{label}]" if label else ""))
    points = [s for s in states if s.state != "damaged"]
    damaged = [s.run_id for s in states if s.state == "damaged"]
    counts = Counter(s.state for s in points)
    lines.append(f"{len(points)} points: " + ", ".join(
        f"{counts[k]} {k}" for k in ORDER if counts[k]) + (
        f"; {len(damaged)} damaged record{'s' if len(damaged) > 1 else ''}: "
        + ", ".join(damaged) if damaged else ""))
    return "\n".join(lines)


def unsettled(states: list[PointState]) -> int:
    """Points still queued or running (what `--wait` waits for)."""
    return sum(s.state in ("queued", "running") for s in states)
