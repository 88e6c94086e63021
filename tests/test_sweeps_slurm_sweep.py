"""A sweep on a real (one-node, localhost) SLURM cluster through `--launcher slurm`: a job
array, a preemption notice that checkpoints and requeues, a job cancelled with `scancel`
and recorded, a rerun that completes it, `slt sweep status` from SLURM's job states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slt import resolve, ticket
from slt.config.ids import run_id
from slt.engine.run import run_search
from tests.slurm_cluster import local_slurm, slurm_available

pytest.importorskip("submitit")
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available())),
]

SLT = [sys.executable, "-m", "slt.cli"]
SETTINGS = ["data.train_size=16384", "search.epochs=24", "run.checkpoint_every=32",
            "run.progress=false", "run.threads=1"]
SWEEP = "\n".join(['base = "quick.toml"', "[set]", *(s.replace("=", " = ") for s in SETTINGS),
                   "[axes]", "run.seed = [0, 1, 2]", "[launcher]", "time = 10",
                   "cpus_per_task = 1", "array_parallelism = 2", ""])


def slurm_status(out: Path, env: dict[str, str]) -> dict[str, tuple[str, str]]:
    proc = subprocess.run([*SLT, "sweep", "status", str(out)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode in (0, 1), proc.stderr
    states = {}
    for line in proc.stdout.strip().splitlines()[:-1]:
        rid, _, rest = line[12:].partition("  ")
        states[rid] = (line[:11].strip(), rest.rsplit("  [", 1)[0])
    return states


def scontrol(env: dict[str, str], job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                          text=True, env=env, timeout=30).stdout


def test_a_sweep_runs_as_a_slurm_job_array_with_preemption_cancel_and_rerun(tmp_path):
    from tests.test_sweeps_slurm import epochs_of, wait_for

    path = tmp_path / "grid.toml"
    path.write_text(SWEEP)
    out = tmp_path / "out"
    with local_slurm(tmp_path / "cluster", cpus=2) as env:
        sent = subprocess.run([*SLT, "sweep", str(path), "--out", str(out), "--launcher",
                               "slurm"], capture_output=True, text=True, env=env, timeout=120)
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert "3 jobs queued (slurm)" in sent.stdout
        jobs = json.loads((out / "jobs-grid.json").read_text())["jobs"]
        ids = {r["job_id"] for r in jobs.values()}
        assert len(ids) == 3 and len({i.split("_")[0] for i in ids}) == 1  # one job array
        assert "ArrayTaskThrottle=2" in scontrol(env, next(iter(ids)).split("_")[0])

        def two_running():
            """two array tasks running their search, the third queued by the throttle"""
            s = slurm_status(out, env)
            started = [v for v in s.values() if v[0] == "running" and "epoch 1/" not in v[1]]
            return s if sorted(v[0] for v in s.values()) == ["queued", "running",
                                                              "running"] and len(started) == 2 \
                else None

        seen = wait_for(two_running, timeout=180)
        running = sorted(rid for rid, v in seen.items() if v[0] == "running")
        preempted, cancelled = running
        # A preemption notice, as SLURM sends it before a time limit: checkpoint, requeue.
        subprocess.run(["scancel", "--signal=USR2", jobs[preempted]["job_id"]], env=env,
                       check=True)
        subprocess.run(["scancel", jobs[cancelled]["job_id"]], env=env, check=True)

        def cancelled_and_done():
            """the cancelled point recorded, every other point finished"""
            s = slurm_status(out, env)
            others = [v[0] for rid, v in s.items() if rid != cancelled]
            return s if s[cancelled][0] == "failed" and set(others) == {"finished"} else None

        after = wait_for(cancelled_and_done, timeout=300)
        assert "cancelled" in after[cancelled][1] and "rerun the sweep" in after[cancelled][1]
        assert "Restarts=1" in scontrol(env, jobs[preempted]["job_id"])  # requeued once
        log = (out / preempted / "job.out").read_text()
        assert "slt: point stopped" in log and "slt: point finished" in log

        again = subprocess.run([*SLT, "sweep", str(path), "--out", str(out), "--launcher",
                                "slurm", "--wait", "--poll", "1", "--no-progress"],
                               capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "1 jobs queued (slurm), 2 runs finished already" in again.stdout
        assert "3 points: 3 finished" in again.stdout
    for seed in range(3):
        cfg = resolve.load("quick.toml", [*SETTINGS, f"run.seed={seed}"])
        rid = run_id(cfg)
        assert epochs_of(out / rid) == list(range(1, 25))
        if rid in (preempted, cancelled):  # stopped midway, resumed: the uninterrupted ticket
            whole = run_search(cfg, tmp_path / "whole", log=lambda _: None)
            got = ticket.load(out / rid / "ticket.slt").layers
            want = ticket.load(whole.run_dir / "ticket.slt").layers
            assert all((a.mask == b.mask).all() for a, b in zip(got, want))
