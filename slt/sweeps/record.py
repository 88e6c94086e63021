"""The sweep's records: `jobs-*.json` (which scheduler job runs which point), read with
checks so a damaged record is named, never silently dropped."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slt.errors import first_line
from slt.fileio import atomic_write_text


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


LAUNCHERS = ("local", "submitit-local", "slurm")
