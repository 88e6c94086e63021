"""Issue 17, class 7: `slt sweep status` never hides damage.

A damaged, truncated or wrongly shaped sweep record (sweep-*.json) or jobs record
(jobs-*.json) is named in the output with what it costs, while every readable point still
shows; only when nothing at all is readable is it one error line (exit 2). No crafted record
is a traceback, and status never writes a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slt.errors import SltError
from slt.sweeps.record import RECORD_LIMIT, read_jobs, read_jobs_checked, read_record
from slt.sweeps.status import format_status, sweep_status
from tests.conftest import REPO

GOOD = {"sweep": "s.toml", "points": [
    {"values": {"run.seed": 0}, "run_id": "r0", "status": "not run"},
    {"values": {"run.seed": 1}, "run_id": "r1", "status": "not run"},
    {"values": {"run.seed": 9}, "status": "skipped", "reason": "ticket denser than source"},
]}


def out_with(tmp_path: Path, **files: str | bytes) -> Path:
    """A sweep folder holding the good record sweep-a.json and `files` (name -> content)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep-a.json").write_text(json.dumps(GOOD))
    for name, content in files.items():
        path = out / (name.replace("_", "-", 1).removesuffix(".json") + ".json")
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return out


def status_text(out: Path) -> str:
    before = {p: p.read_bytes() for p in out.iterdir() if p.is_file()}
    text = format_status(sweep_status(out))
    assert {p: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # read only
    return text


def damaged_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("damaged ")]


TRUNCATED_SWEEP = json.dumps({"points": [{"values": {"run.seed": 2}, "run_id": "r2"}]})[:-9]


@pytest.mark.parametrize("name, content, reason", [
    ("sweep_b.json", TRUNCATED_SWEEP, "not valid JSON, truncated?"),
    ("sweep_b.json", "", "an empty file"),
    ("sweep_b.json", "[]", "not a JSON object (it is list)"),
    ("sweep_b.json", '{"points": 5}', "'points' is not a list (it is int)"),
    ("sweep_b.json", '{"sweep": "b.toml"}', "it has no 'points' entry"),
    ("sweep_b.json", b"\xff\xfe\x00garbage", "not text"),
    ("sweep_b.json", "[" * 100_000, "nested too deeply"),
    ("jobs_a.json", '{"jobs": []}', "'jobs' is not a table of run ids (it is list)"),
    ("jobs_a.json", "garbage{", "not valid JSON"),
    ("jobs_a.json", '{"launcher": "slurm", "jobs": {"r0": {"job_id": "12', "not valid JSON"),
    ("jobs_a.json", '{"jobs": {"r0": 5}}', "1 of 1 jobs unreadable: r0: not a table but int"),
    ("jobs_a.json", '{"jobs": {"r0": {"launcher": "slurm"}}}', "r0: job_id None is not a job"),
    ("jobs_a.json", '{"jobs": {"r0": {"launcher": "submitit-local", "job_id": "0"}}}',
     "r0: job_id '0' is not a process id"),
    ("jobs_a.json", '{"jobs": {"r0": {"launcher": "x", "job_id": "1"}}}', "launcher 'x'"),
    ("jobs_a.json", '{"jobs": {"r0": {"launcher": "slurm", "job_id": "1", "submitted": "x"}}}',
     "r0: submitted 'x' is not a time"),
    ("jobs_a.json", '{"jobs": {"../r0": {"launcher": "slurm", "job_id": "1"}}}',
     "run id '../r0' is not a run directory's name"),
])
def test_a_damaged_record_is_named_and_the_other_points_show(
        tmp_path: Path, name: str, content: str, reason: str) -> None:
    out = out_with(tmp_path, **{name: content})
    text = status_text(out)
    lines = text.splitlines()
    damaged = damaged_lines(text)
    file = name.replace("_", "-", 1)
    assert len(damaged) == 1 and damaged[0].startswith(f"damaged     {file}  "), text
    assert reason in damaged[0], damaged[0]
    assert lines[-1] == f"2 points: 2 not started; 1 damaged record: {file}"
    assert [ln.split()[2] for ln in lines if ln.startswith("not started")] == ["r0", "r1"]


@pytest.mark.parametrize("points, reason, shown", [
    ([{"values": "seed=0", "run_id": "r0"}, {"values": {"run.seed": 1}, "run_id": "r1"}],
     "1 of 2 points unreadable: r0: values are not a table but str", ["r0", "r1"]),
    ([7, {"values": {"run.seed": 1}, "run_id": "r1"}],
     "1 of 2 points unreadable: a point is not a table but int", ["r1"]),
    ([{"values": {}, "run_id": 5}, {"values": {}, "run_id": "/etc"},
      {"values": {}, "run_id": "r1"}],
     "2 of 3 points unreadable: run id 5 is not a run directory's name (and 1 more)", ["r1"]),
])
def test_a_malformed_point_is_named_not_a_traceback(tmp_path: Path, points: list, reason: str,
                                                    shown: list[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep-a.json").write_text(json.dumps({"points": points}))
    text = status_text(out)
    assert damaged_lines(text) == [f"damaged     sweep-a.json  {reason}"], text
    assert [ln.split()[2] for ln in text.splitlines() if ln.startswith("not started")] == shown
    assert text.splitlines()[-1] == (f"{len(shown)} points: {len(shown)} not started; "
                                     "1 damaged record: sweep-a.json")


def test_a_truncated_record_no_longer_loses_its_point_silently(tmp_path: Path) -> None:
    # the case of the issue: two sweeps in one folder, the second record truncated
    out = out_with(tmp_path, sweep_b=TRUNCATED_SWEEP)
    text = status_text(out)
    assert "sweep-b.json" in text.splitlines()[-1]
    assert "points only it knew of are missing from this list" in damaged_lines(text)[0]


def test_oversized_record_is_not_read(tmp_path: Path) -> None:
    out = out_with(tmp_path)
    with open(out / "jobs-a.json", "wb") as f:  # sparse: costs no disk and, unread, no memory
        f.truncate(RECORD_LIMIT + 1)
    body, why = read_record(out / "jobs-a.json", "jobs")
    assert body is None and why == f"{RECORD_LIMIT + 1} bytes, larger than any record slt writes"
    assert "jobs-a.json" in status_text(out).splitlines()[-1]


def test_only_damaged_records_is_one_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep-a.json").write_text("")
    (out / "jobs-a.json").write_text('{"jobs": []}')
    with pytest.raises(SltError) as info:
        sweep_status(out)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"{out} holds no readable sweep record and no run directory: "
                       f"{out / 'sweep-a.json'} is damaged: an empty file; and 1 more "
                       "damaged records")


def test_good_records_and_entries_still_read(tmp_path: Path) -> None:
    out = out_with(tmp_path, jobs_a=json.dumps({"jobs": {
        "r0": {"launcher": "slurm", "job_id": 17, "submitted": 1.5},
        "r1": {"launcher": "slurm", "job_id": "18"},
        "bad": {"launcher": "slurm"}}}))
    jobs, damaged = read_jobs_checked(out)
    assert jobs == {"r0": {"launcher": "slurm", "job_id": "17", "submitted": 1.5, "values": {}},
                    "r1": {"launcher": "slurm", "job_id": "18", "values": {}}}
    assert [(d.path.name, d.reason) for d in damaged] == [
        ("jobs-a.json", "1 of 3 jobs unreadable: bad: job_id None is not a job id")]
    assert read_jobs(out) == jobs


SLT = [sys.executable, str(REPO / "run.py")]


def test_cli_lists_damage_without_traceback(tmp_path: Path) -> None:
    """Exit 1: a damaged record is a problem to look at, as a failed point is."""
    out = out_with(tmp_path, jobs_a='{"jobs": []}', sweep_b="")
    proc = subprocess.run([*SLT, "sweep", "status", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[-1] == "2 points: 2 not started; 2 damaged records: sweep-b.json, jobs-a.json"
    assert len(damaged_lines(proc.stdout)) == 2
    assert proc.returncode == 1, proc.stdout


def test_cli_only_damage_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep-a.json").write_text('{"points": [{"run_id": "r0", "values": {}')
    proc = subprocess.run([*SLT, "sweep", "status", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"slt: error: {out} holds no readable sweep record")
    assert f"{out / 'sweep-a.json'} is damaged: not valid JSON, truncated?" in lines[0]
