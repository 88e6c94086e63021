"""A sweep's points as scheduler jobs, followed from here: `slt sweep --launcher slurm` (or
submitit-local) queues every point as a job and prints the job ids; with --wait it polls the
sweep's status until every point has settled, prints it and writes the report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slt.sweeps.grid import Sweep
from slt.sweeps.local import launch_sweep
from slt.sweeps.slurm import parse_resources
from slt.sweeps.status import PointState, format_status, sweep_status, unsettled

# what makes a followed sweep exit 1: a point that did not end well
FAILED_STATES = ("failed", "interrupted", "damaged")


def launch_and_follow(sweep: Sweep, out: str, launcher: str, overrides: dict[str, Any],
                      launcher_overrides: Sequence[str], *, wait: bool, poll: float,
                      progress: bool, report: bool,
                      say: Callable[[str], None] = print) -> int:
    """Queue the sweep's points as `launcher` jobs; with `wait`, follow them; the exit code."""
    resources = parse_resources(sweep.launcher, list(launcher_overrides),
                                f"{sweep.path} [launcher]")
    sent = launch_sweep(sweep, out, launcher, resources, overrides)
    for rid, jid in sent.jobs.items():
        say(f"queued {rid}: job {jid}")
    say(f"{len(sent.jobs)} jobs queued ({launcher}), {len(sent.finished)} runs finished "
        f"already, {len(sent.running)} being run -> {out}")
    if not wait:
        say(f"follow them with: slt sweep status {out}")
        return 0
    own = frozenset(p.config.model.name for p in sweep.points(overrides) if p.config)
    return follow(out, poll=poll, progress=progress, report=report, say=say, trusted=own)


def follow(out: str | Path, *, poll: float, progress: bool, report: bool,
           say: Callable[[str], None] = print, trusted: frozenset[str] = frozenset()) -> int:
    """Poll a launched sweep until every point settles, then print its status and report
    (rebuilding, for survival, the python: models of `trusted`: the sweep's own)."""
    states = wait_until_settled(out, poll, progress)
    say(format_status(states))
    if report:
        from slt.reporting.write import write_report

        say(f"report: {write_report(out, trust_model=trusted)}")
    return 1 if any(s.state in FAILED_STATES for s in states) else 0


def wait_until_settled(out: str | Path, poll: float, progress: bool) -> list[PointState]:
    """The sweep's status once no point is queued or running, a bar counting settled ones."""
    states = sweep_status(out)
    bar = tqdm(total=len(states), desc="points", unit="run", disable=not progress,
               dynamic_ncols=True)
    while True:
        bar.n = len(states) - unsettled(states)
        bar.refresh()
        if not unsettled(states):
            break
        time.sleep(poll)
        states = sweep_status(out)
    bar.close()
    return states
