"""The local one-node SLURM cluster works: jobs run, cancel and requeue for real.

These tests guard the harness that SLURM integration tests build on; they skip with the reason
when slurm-wlm/munge are missing or we are not root.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm_cluster import local_slurm, slurm_available

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,  # starts real SLURM daemons (slurmctld, slurmd, munged)
    pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available())),
]

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def sbatch(env: dict[str, str], *args: str) -> str:
    """Submit a batch job and return its id (sbatch --parsable prints 'id[;cluster]')."""
    r = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_field(env: dict[str, str], job_id: str, field: str) -> str:
    """One field of `scontrol show job` (JobState, Restarts, ...)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, f"scontrol show job {job_id}: {r.stderr}"
    m = re.search(rf"\b{field}=(\S*)", r.stdout)
    assert m, f"no {field} in: {r.stdout}"
    return m.group(1)


def wait_for(what: str, check, timeout: float = 30.0) -> None:
    """Poll `check()` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def wait_state(env: dict[str, str], job_id: str, states: set[str], timeout: float = 30.0) -> str:
    """Wait until the job's state is one of `states`; return it."""
    seen: list[str] = []

    def reached() -> bool:
        seen.append(job_field(env, job_id, "JobState"))
        return seen[-1] in states

    wait_for(f"job {job_id} to reach {sorted(states)} (last state {seen[-1:]})", reached, timeout)
    return seen[-1]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One cluster shared by this module's tests: starting one takes about a second."""
    with local_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def test_batch_job_runs_and_writes_its_output(slurm_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "hi.out"
    job = sbatch(slurm_env, f"--output={out}", "--wrap", "echo hi from $SLURM_JOB_ID")
    assert wait_state(slurm_env, job, FINISHED) == "COMPLETED"
    assert out.read_text().strip() == f"hi from {job}"


def test_running_job_can_be_cancelled(slurm_env: dict[str, str], tmp_path: Path) -> None:
    started = tmp_path / "started"
    job = sbatch(slurm_env, f"--output={tmp_path / 'sleep.out'}",
                 "--wrap", f"touch {started}; sleep 300")
    wait_state(slurm_env, job, {"RUNNING"})
    wait_for("the job's first command", started.exists)
    r = subprocess.run(["scancel", job], env=slurm_env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert wait_state(slurm_env, job, FINISHED) == "CANCELLED"


def test_requeued_job_runs_again(slurm_env: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    job = sbatch(slurm_env, "--requeue", f"--output={tmp_path / 'requeue.out'}",
                 "--wrap", f"echo run $SLURM_RESTART_COUNT >> {runs}; sleep 300")

    def lines() -> list[str]:
        return runs.read_text().splitlines() if runs.exists() else []

    wait_for("the first run", lambda: len(lines()) == 1)
    r = subprocess.run(["scontrol", "requeue", job], env=slurm_env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    wait_for("the second run", lambda: len(lines()) == 2, timeout=45)
    assert lines()[0] == "run" or lines()[0] == "run 0"  # unset on the first run
    assert lines()[1] == "run 1"
    assert job_field(slurm_env, job, "Restarts") == "1"
    subprocess.run(["scancel", job], env=slurm_env, capture_output=True, timeout=30)
    assert wait_state(slurm_env, job, FINISHED) == "CANCELLED"


def test_two_clusters_run_side_by_side(tmp_path: Path) -> None:
    """Ports are picked at run time, so two clusters never clash (e.g. under pytest-xdist)."""
    with local_slurm(tmp_path / "a") as env_a, local_slurm(tmp_path / "b") as env_b:
        assert env_a["SLURM_CONF"] != env_b["SLURM_CONF"]
        outs = []
        for name, env in (("a", env_a), ("b", env_b)):
            out = tmp_path / f"{name}.out"
            job = sbatch(env, f"--output={out}", "--wrap", f"echo {name}")
            outs.append((env, job, out, name))
        for env, job, out, name in outs:
            assert wait_state(env, job, FINISHED) == "COMPLETED"
            assert out.read_text().strip() == name
