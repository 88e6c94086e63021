"""Sweep points as cluster jobs: SLURM (or submitit's local executor) through submitit.

Every point becomes one job of a job array. The job runs the point's search in its run
directory, under the same lock as every other writer, so a point submitted twice runs
once. A preemption or time-limit notice (SIGUSR2, sent `signal_delay_s` before the end)
makes the search checkpoint where it is; submitit's checkpoint hook then requeues the job,
and the requeued job resumes from that checkpoint. SIGTERM (`scancel`) checkpoints and
stops without a requeue; rerunning the sweep resumes the point.

What was submitted is recorded in `<out>/jobs-<sweep>.json` (run id -> job id), which
`slt sweep status` reads beside the run directories and the scheduler's job states.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from slt.config.checks import coerce
from slt.config.schema import Config
from slt.config.toml import parse_value
from slt.errors import ConfigError, SltError, did_you_mean, first_line
from slt.rundir import pid_alive
from slt.sweeps.record import Submitted, read_jobs, record_jobs

# SLURM job states: ended without finishing, waiting to run; a live job is not sent again
ENDED = {"CANCELLED", "TIMEOUT", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
           "SUSPENDED"}


LIVE = WAITING | {"RUNNING"}


@dataclass(frozen=True)
class Resources:
    """A sweep file's [launcher] table: what every job of the sweep asks for."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    time: int = 240  # minutes per job (SLURM --time); a longer search is requeued
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU (one process per GPU), or 1 without GPUs
    cpus_per_task: int = 0  # 0: the cluster's default
    mem_gb: int = 0  # 0: the cluster's default
    constraint: str = ""
    array_parallelism: int = 16  # jobs of the sweep running at once
    signal_delay_s: int = 120  # the preemption / time-limit notice, before the end
    requeues: int = 3  # times a job that hits its time limit is requeued
    setup: tuple[str, ...] = ()  # shell lines before the job (module load, activate a venv)

    @property
    def tasks(self) -> int:
        """Processes per node: one per GPU unless given."""
        return self.tasks_per_node or max(1, self.gpus_per_node)


def parse_resources(table: Any, overrides: list[str], origin: str) -> Resources:
    """The [launcher] table of `origin`, then `--launcher-set KEY=VALUE` overrides, typed
    and checked (one line naming the key otherwise)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: [launcher] must be a table of keys")
    given = dict(table)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--launcher-set expects key=value, got '{item}'")
        key, text = (part.strip() for part in item.split("=", 1))
        given[key] = parse_value(text)
    known = [f.name for f in fields(Resources)]
    hints = typing.get_type_hints(Resources)
    values = {}
    for key, value in given.items():
        if key not in known:
            raise ConfigError(f"{origin}: unknown launcher key '{key}'"
                              f"{did_you_mean(key, known)}; keys: {', '.join(known)}")
        values[key] = coerce(f"launcher.{key}", value, hints[key])
    res = Resources(**values)
    for key in ("time", "nodes", "array_parallelism"):
        if getattr(res, key) < 1:
            raise ConfigError(f"launcher.{key} must be at least 1, got {getattr(res, key)}")
    for key in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb",
                "signal_delay_s", "requeues"):
        if getattr(res, key) < 0:
            raise ConfigError(f"launcher.{key} must be >= 0, got {getattr(res, key)}")
    return res


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise SltError("--launcher slurm and submitit-local need submitit: "
                       "pip install 'slt[slurm]'") from None
    return submitit


def executor(kind: str, folder: Path, res: Resources) -> Any:
    """A submitit executor for `kind` ("slurm" or "submitit-local") asking for `res`."""
    submitit = _submitit()
    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.requeues)
        slurm = {"job_name": "slt", "time": res.time, "nodes": res.nodes,
                 "ntasks_per_node": res.tasks, "array_parallelism": res.array_parallelism,
                 "signal_delay_s": res.signal_delay_s, "setup": list(res.setup)}
        if res.gpus_per_node:
            slurm["gpus_per_node"] = res.gpus_per_node
        for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
            if getattr(res, key):
                slurm[key] = getattr(res, key)
        if res.mem_gb:
            slurm["mem"] = f"{res.mem_gb}GB"
        ex.update_parameters(**slurm)
        return ex
    if res.nodes != 1:
        raise ConfigError("--launcher submitit-local runs on this machine: launcher.nodes "
                          "must be 1")
    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=res.time, tasks_per_node=res.tasks,
                         gpus_per_node=res.gpus_per_node, signal_delay_s=res.signal_delay_s,
                         setup=list(res.setup))
    return ex


class PointJob:
    """What one job runs: the search of one point, under its run directory's lock.

    A callable with a `checkpoint` method, so submitit requeues it after a preemption or a
    time limit (the search has checkpointed by then); the requeued job calls it again and
    the search resumes."""

    def __init__(self, out_root: str) -> None:
        self.out_root = out_root

    def __call__(self, cfg: Config) -> dict[str, str]:
        from slt.engine.platform import Platform
        from slt.sweeps.point import run_point

        submitit = _submitit()
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one rank per task: the torchrun variables from SLURM's
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False)
        stop = threading.Event()
        received: list[int] = []  # which signals asked for the stop

        def asked(signum: int, _frame: Any) -> None:
            received.append(signum)
            stop.set()

        notice = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint hook, requeue
        signal.signal(signal.SIGUSR2, asked)  # preemption / time limit: stop, requeue
        signal.signal(signal.SIGTERM, asked)  # scancel: stop, no requeue
        if env.global_rank == 0:
            self._link_logs(cfg, env)
        platform = Platform.from_env(cfg.run.device)
        try:
            status, error = run_point(cfg, self.out_root, stop_requested=stop.is_set,
                                      platform=platform, log=print)
        finally:
            platform.close()
        print(f"slt: point {status}" + (f": {error}" if error else ""), flush=True)
        # SIGTERM alone is scancel; after a notice it is the time limit's end: requeue
        cancelled = signal.SIGTERM in received and signal.SIGUSR2 not in received
        if status == "stopped" and callable(notice) and received and not cancelled:
            notice(signal.SIGUSR2, None)  # submitit's handler: requeues (rank 0) and exits
        return {"status": status, "error": error}

    def checkpoint(self, cfg: Config) -> Any:
        """submitit's hook on a preemption notice: resubmit this point unchanged (its run
        directory holds the checkpoint the search wrote on the notice)."""
        return _submitit().helpers.DelayedSubmission(PointJob(self.out_root), cfg)

    def _link_logs(self, cfg: Config, env: Any) -> None:
        """The job's stdout/stderr, linked beside its run directory's files."""
        from slt.rundir import locate_run

        try:
            run_dir = locate_run(Path(self.out_root), cfg)
            run_dir.mkdir(parents=True, exist_ok=True)
            for name, target in (("job.out", env.paths.stdout), ("job.err", env.paths.stderr)):
                link = run_dir / name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(Path(target).resolve())
        except (OSError, SltError) as exc:  # a convenience: the job runs without it
            print(f"slt: could not link the job's logs into the run directory: {exc}",
                  file=sys.stderr)


def submit(points: list[tuple[str, Config, dict[str, Any]]], out_root: Path, sweep_name: str,
           kind: str, res: Resources, log: Any = print) -> Submitted:
    """Queue one job per point that is neither finished nor being written now; returns
    once they are queued (submitit-local: started) with their job ids."""
    from slt.config.ids import config_hashes
    from slt.rundir import locate_run, locked_by, read_summary

    out = Submitted()
    todo = []
    live = scheduler_states(read_jobs(out_root))  # a sweep submitted twice: sent once
    for rid, cfg, values in points:
        run_dir = locate_run(out_root, cfg)
        if read_summary(run_dir, config_hashes(cfg))[0] is not None:
            out.finished.append(rid)
        elif locked_by(run_dir) or live.get(rid) in LIVE:  # written, or its job waits
            out.running.append(rid)
        else:
            todo.append((rid, cfg, values))
    if not todo:
        return out
    folder = out_root / ".jobs"
    ex = executor(kind, folder, res)

    def sent(batch: list[tuple[str, Config, dict[str, Any]]], jobs: list[Any]) -> None:
        now = time.time()
        record = {}
        for (rid, _, values), job in zip(batch, jobs):
            out.jobs[rid] = str(job.job_id)
            record[rid] = {"launcher": kind, "job_id": str(job.job_id), "values": values,
                           "submitted": now, "stdout": str(job.paths.stdout),
                           "stderr": str(job.paths.stderr)}
        record_jobs(out_root, sweep_name, kind, record)

    if kind == "slurm":
        try:
            jobs = ex.map_array(PointJob(str(out_root)), [cfg for _, cfg, _ in todo])
        except Exception as exc:  # sbatch refused: a bad partition, account, time, ...
            if type(exc).__name__ != "FailedJobError":
                raise
            raise SltError(f"sbatch refused the jobs: {first_line(exc)}") from None
        sent(todo, jobs)
    else:  # no scheduler to hold a queue: started here, at most array_parallelism at once
        _local_jobs(ex, todo, str(out_root), res.array_parallelism, sent)
    return out


def _local_jobs(ex: Any, todo: list[tuple[str, Config, dict[str, Any]]], out_root: str,
                parallel: int, sent: Any) -> None:
    """submitit's local executor starts every job at once: start one as another ends, at
    most `parallel` at a time (the local stand-in for an array's parallelism cap), each
    recorded as it starts. The submitting process is the queue: it returns once the last
    job has started."""
    running: list[Any] = []
    for point in todo:
        while len(running) >= parallel:
            running = [j for j in running if not j.done()]
            if len(running) >= parallel:
                time.sleep(0.5)
        job = ex.submit(PointJob(out_root), point[1])
        sent([point], [job])
        running.append(job)


def scheduler_states(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """run id -> the scheduler's state of its latest job (PENDING, RUNNING, CANCELLED,
    TIMEOUT, FAILED, COMPLETED, ...; "" when the scheduler no longer knows it)."""
    out: dict[str, str] = {}
    slurm = {rid: r["job_id"] for rid, r in records.items() if r.get("launcher") == "slurm"}
    if slurm:
        states = _slurm_states(list(slurm.values()))
        out.update({rid: states.get(jid, "") for rid, jid in slurm.items()})
    for rid, rec in records.items():
        if rec.get("launcher") == "submitit-local":
            out[rid] = "RUNNING" if pid_alive(rec.get("job_id")) else ""
    return out


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state from `scontrol show job` (what SLURM still remembers: running,
    pending and recently ended jobs); array tasks as <array>_<index>."""
    import subprocess

    out: dict[str, str] = {}
    wanted = set(job_ids)
    arrays = sorted({j.split("_")[0] for j in job_ids})
    for array in arrays:
        try:
            text = subprocess.run(["scontrol", "show", "job", "-o", array], check=False,
                                  capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in text.splitlines():
            fields_ = dict(f.split("=", 1) for f in line.split() if "=" in f)
            jid = fields_.get("JobId", "")
            if fields_.get("ArrayJobId") and fields_.get("ArrayTaskId"):
                for task in _expand(fields_["ArrayTaskId"]):
                    out[f"{fields_['ArrayJobId']}_{task}"] = fields_.get("JobState", "")
            elif jid:
                out[jid] = fields_.get("JobState", "")
    return {j: out.get(j, "") for j in wanted}


def _expand(tasks: str) -> list[str]:
    """SLURM's task list of a pending array ('0-3%2', '1,4-5') as indices."""
    out: list[str] = []
    for part in tasks.split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
        elif part:
            out.append(part)
    return out
