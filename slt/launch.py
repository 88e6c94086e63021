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

import dataclasses
import json
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from slt.config import Config, coerce, parse_value
from slt.errors import ConfigError, SltError, did_you_mean, first_line
from slt.fileio import atomic_write_text
from slt.rundir import pid_alive

LAUNCHERS = ("local", "submitit-local", "slurm")
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
        from slt.platform import Platform
        from slt.sweeps import run_point

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


# --- submitting -------------------------------------------------------------------------


def jobs_path(out_root: Path, sweep_name: str) -> Path:
    return out_root / f"jobs-{sweep_name}.json"


# A record slt writes is a few KB per hundred points; a bigger file is not one of ours and is
# not read into memory
RECORD_LIMIT = 64 << 20


@dataclass(frozen=True)
class DamagedRecord:
    """A sweep or jobs record that could not be read whole: named in `slt sweep status`
    instead of silently losing the points only it knew of."""

    path: Path
    reason: str  # what is wrong with it
    lost: str = ""  # what status cannot show because of it

    def __str__(self) -> str:
        return f"{self.reason}: {self.lost}" if self.lost else self.reason


def read_record(path: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in `path` whose `key` holds its entries, or (None, why not) for an
    empty, truncated, non-JSON, oversized or wrongly shaped file."""
    try:
        size = path.stat().st_size
        if size > RECORD_LIMIT:
            return None, f"{size} bytes, larger than any record slt writes"
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return None, "not text (not a record slt wrote)"
    if not text.strip():
        return None, "an empty file"
    try:
        body = json.loads(text)
    except RecursionError:
        return None, "not a record slt wrote (nested too deeply)"
    except ValueError as exc:
        return None, f"not valid JSON, truncated? ({first_line(exc)})"
    if not isinstance(body, dict):
        return None, f"not a JSON object (it is {type(body).__name__})"
    if key not in body:
        return None, f"it has no '{key}' entry"
    return body, ""


def run_id_problem(rid: Any) -> str:
    """Why a record's run id cannot name a run directory under the sweep's folder ('' when
    it can): a crafted record must not point status at another folder."""
    if not isinstance(rid, str) or not rid or "/" in rid or "\\" in rid or rid in (".", ".."):
        return f"run id {rid!r} is not a run directory's name"
    return ""


def _job_problem(rid: str, rec: Any) -> str:
    """Why one entry of a jobs record is unusable ('' when it is fine)."""
    if problem := run_id_problem(rid):
        return problem
    if not isinstance(rec, dict):
        return f"{rid}: not a table but {type(rec).__name__}"
    launcher, jid = rec.get("launcher"), rec.get("job_id")
    if launcher not in LAUNCHERS:
        return f"{rid}: launcher {launcher!r} is none of {', '.join(LAUNCHERS)}"
    if not isinstance(jid, (str, int)) or isinstance(jid, bool) or not str(jid).strip():
        return f"{rid}: job_id {jid!r} is not a job id"
    if launcher == "submitit-local" and not (str(jid).isdigit() and int(jid) > 0):
        return f"{rid}: job_id {jid!r} is not a process id"
    if "values" in rec and not isinstance(rec["values"], dict):
        return f"{rid}: values are not a table but {type(rec['values']).__name__}"
    sub = rec.get("submitted", 0)
    if not isinstance(sub, (int, float)) or isinstance(sub, bool):
        return f"{rid}: submitted {sub!r} is not a time"
    return ""


def read_jobs_checked(out_root: Path) -> tuple[dict[str, dict[str, Any]], list[DamagedRecord]]:
    """run id -> its latest job record ({launcher, job_id, values, submitted}) over every
    jobs-*.json under `out_root`, each entry checked; and every record (or entry) that
    could not be used, with the reason."""
    jobs: dict[str, dict[str, Any]] = {}
    damaged: list[DamagedRecord] = []
    for path in sorted(out_root.glob("jobs-*.json")):
        body, why = read_record(path, "jobs")
        records = body["jobs"] if body is not None else None
        if body is not None and not isinstance(records, dict):
            why = f"'jobs' is not a table of run ids (it is {type(records).__name__})"
        if why:
            damaged.append(DamagedRecord(path, why, "the jobs it recorded are not shown"))
            continue
        assert isinstance(records, dict)
        bad = []
        for rid, rec in records.items():
            if problem := _job_problem(rid, rec):
                bad.append(problem)
                continue
            rec = {**rec, "job_id": str(rec["job_id"]), "values": rec.get("values", {})}
            if rid not in jobs or rec.get("submitted", 0) >= jobs[rid].get("submitted", 0):
                jobs[rid] = rec
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            damaged.append(DamagedRecord(path, f"{len(bad)} of {len(records)} jobs unreadable: "
                                         f"{bad[0]}{more}", "they are not shown"))
    return jobs, damaged


def read_jobs(out_root: Path) -> dict[str, dict[str, Any]]:
    """The usable job records under `out_root` (`read_jobs_checked` without the damage: a
    submission falls back on the run directories for what a damaged record held)."""
    return read_jobs_checked(out_root)[0]


def record_jobs(out_root: Path, sweep_name: str, kind: str,
                submitted: dict[str, dict[str, Any]]) -> None:
    """Merge `submitted` (run id -> record) into the sweep's jobs file."""
    path = jobs_path(out_root, sweep_name)
    body, _ = read_record(path, "jobs")  # a damaged record is replaced by what is sent now
    jobs = dict(body["jobs"]) if body is not None and isinstance(body["jobs"], dict) else {}
    jobs.update(submitted)
    atomic_write_text(path, json.dumps({"launcher": kind, "jobs": jobs}, indent=2,
                                       default=str) + "\n")


@dataclass
class Submitted:
    jobs: dict[str, str] = dataclasses.field(default_factory=dict)  # run id -> job id
    finished: list[str] = dataclasses.field(default_factory=list)  # already done: not sent
    running: list[str] = dataclasses.field(default_factory=list)  # held by a live writer


def submit(points: list[tuple[str, Config, dict[str, Any]]], out_root: Path, sweep_name: str,
           kind: str, res: Resources, log: Any = print) -> Submitted:
    """Queue one job per point that is neither finished nor being written now; returns
    once they are queued (submitit-local: started) with their job ids."""
    from slt.config import config_hashes
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


# --- job states --------------------------------------------------------------------------


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
