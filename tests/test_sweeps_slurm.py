"""Sweeps as submitit jobs on this machine (`--launcher submitit-local`): every state that
`slt sweep status` shows, a preemption notice that checkpoints and requeues, a sweep killed
midway and rerun to the end with the tickets of uninterrupted runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slt import resolve, ticket
from slt.config.ids import run_id
from slt.engine.run import run_search
from slt.errors import ConfigError
from slt.sweeps.slurm import Resources, parse_resources

pytest.importorskip("submitit")

SLT = [sys.executable, "-m", "slt.cli"]
SWEEP = """
base = "quick.toml"
[set]
data.train_size = 16384
search.epochs = 12
run.checkpoint_every = 32
run.progress = false
[axes]
run.seed = [0, 1, 2]
[launcher]
array_parallelism = 2
time = 30
"""


def status(out: Path) -> dict[str, tuple[str, str]]:
    """run id -> (state, detail) as `slt sweep status` prints it."""
    proc = subprocess.run([*SLT, "sweep", "status", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("3 points: "), proc.stdout
    out_ = {}
    for line in lines[:-1]:
        state = line[:11].strip()
        rid, _, rest = line[12:].partition("  ")
        detail = rest.rsplit("  [", 1)[0] if rest.endswith("]") else rest
        out_[rid] = (state, detail)
    return out_


def wait_for(what, timeout: float = 120.0, every: float = 0.5):
    start = time.monotonic()
    end = start + timeout
    while time.monotonic() < end:
        if (found := what()):
            print(f"{what.__doc__}: {time.monotonic() - start:.1f} s")
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what.__doc__}")


def task_of(controller: int) -> int:
    """The pid of the one task a local job's controller runs."""
    out = subprocess.run(["pgrep", "-P", str(controller)], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, pids
    return pids[0]


def epochs_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text()
            .splitlines()]


@pytest.mark.slow
def test_a_submitit_local_sweep_shows_every_state_survives_preemption_and_resumes(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(SWEEP)
    out = tmp_path / "out"
    cfgs = {run_id(c): c for c in (resolve.load("quick.toml", [
        "data.train_size=16384", "search.epochs=12", "run.checkpoint_every=32",
        "run.progress=false", f"run.seed={s}"]) for s in range(3))}
    submitter = subprocess.Popen([*SLT, "sweep", str(path), "--out", str(out), "--launcher",
                                  "submitit-local"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)

    def two_running():
        """two points running and the third waiting for a slot"""
        s = status(out) if (out / "sweep-grid.json").exists() else {}
        states = sorted(v[0] for v in s.values())
        return s if states == ["queued", "running", "running"] else None

    seen = wait_for(two_running)
    (waiting,) = [rid for rid, v in seen.items() if v[0] == "queued"]
    assert seen[waiting][1] == "waiting for a free slot"
    running = [rid for rid, v in seen.items() if v[0] == "running"]
    for rid in running:
        assert seen[rid][1].startswith("epoch ") and "/12 job " in seen[rid][1]
    # the report works on a sweep that is still running
    report = subprocess.run([*SLT, "report", str(out), "--no-eval", "--out",
                             str(tmp_path / "early")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    early = (tmp_path / "early" / "report.md").read_text()
    assert "## Running" in early

    # A preemption notice (what SLURM sends before the end): checkpoint, requeue, resume.
    jobs = json.loads((out / "jobs-grid.json").read_text())["jobs"]
    preempted, killed = running
    os.kill(task_of(int(jobs[preempted]["job_id"])), signal.SIGUSR2)
    # The whole sweep killed meanwhile: its submitter, and the other job outright.
    submitter.send_signal(signal.SIGTERM)
    assert submitter.wait(60) == 128 + signal.SIGTERM
    controller = int(jobs[killed]["job_id"])
    os.kill(task_of(controller), signal.SIGKILL)

    def settled():
        """the preempted point finished, the killed one interrupted"""
        s = status(out)
        return s if s[preempted][0] == "finished" and s[killed][0] == "interrupted" else None

    after = wait_for(settled, timeout=180)
    assert after[waiting] == ("not started", "")  # its submitter is gone: nobody will send it
    assert "epochs done: rerun the sweep to resume it" in after[killed][1]
    log = Path(jobs[preempted]["stdout"]).read_text()
    assert "slt: point stopped" in log  # stopped on the notice, then requeued ...
    assert log.count("slt: point finished") == 1  # ... and finished by the same job
    assert (out / preempted / "job.out").resolve() == Path(jobs[preempted]["stdout"]).resolve()

    # Rerun: only what is not finished is sent again, and --wait follows it to the end.
    again = subprocess.run([*SLT, "sweep", str(path), "--out", str(out), "--launcher",
                            "submitit-local", "--wait", "--poll", "1", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 jobs queued (submitit-local), 1 runs finished already" in again.stdout
    assert "3 points: 3 finished" in again.stdout
    final = status(out)
    assert {v[0] for v in final.values()} == {"finished"}
    assert (out / "report" / "report.md").is_file()
    # Every run has each epoch once and the ticket of an uninterrupted run.
    for rid, cfg in cfgs.items():
        assert epochs_of(out / rid) == list(range(1, 13)), rid
        whole = run_search(cfg, tmp_path / "whole", log=lambda _: None)
        got = ticket.load(out / rid / "ticket.slt")
        want = ticket.load(whole.run_dir / "ticket.slt")
        assert all((a.mask == b.mask).all() for a, b in zip(got.layers, want.layers)), rid
        summary = json.loads((out / rid / "summary.json").read_text())
        assert summary["final_test_acc"] == whole.summary["final_test_acc"]


def test_launcher_tables_are_checked() -> None:
    res = parse_resources({"partition": "gpu", "gpus_per_node": 4, "time": 600},
                          ["time=120", "qos=high"], "grid.toml [launcher]")
    assert res == Resources(partition="gpu", gpus_per_node=4, time=120, qos="high")
    assert res.tasks == 4  # one process per GPU
    with pytest.raises(ConfigError, match="unknown launcher key 'gpu_per_node'.*gpus_per_node"):
        parse_resources({"gpu_per_node": 2}, [], "grid.toml [launcher]")
    with pytest.raises(ConfigError, match="launcher.time must be at least 1"):
        parse_resources({}, ["time=0"], "--launcher-set")
    with pytest.raises(ConfigError, match="launcher.mem_gb"):
        parse_resources({"mem_gb": "lots"}, [], "grid.toml [launcher]")


def test_a_bad_launcher_key_is_one_line_and_submits_nothing(tmp_path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(SWEEP.replace("time = 30", "tim = 30"))
    proc = subprocess.run([*SLT, "sweep", str(path), "--out", str(tmp_path / "out"),
                           "--launcher", "submitit-local"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"slt: error: {path} [launcher]: unknown launcher key 'tim' (did you mean 'time'?); "
        "keys: partition, account, qos, time, nodes, gpus_per_node, tasks_per_node, "
        "cpus_per_task, mem_gb, constraint, array_parallelism, signal_delay_s, requeues, setup"]
    assert not (tmp_path / "out").exists()
