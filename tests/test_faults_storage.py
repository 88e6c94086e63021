"""Filesystem failures as they happen in life: a real full disk (a small tmpfs), a real
read-only filesystem (a read-only bind mount) and a real permission error (an unprivileged
user), each inside its own mount namespace (`unshare`), plus a name over the OS limit.

Every one must end in a single `slt: error:` line naming the path and the cause, exit
non-zero, and leave what was already written intact."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slt import config, resolve
from slt.engine.run import run_search
from tests.conftest import REPO, TINY

PY = shlex.quote(sys.executable)
RUN = shlex.quote(str(REPO / "run.py"))


def namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not namespaces_work(),
                                  reason="needs `unshare -rm` (user and mount namespaces)")


def slt_args(*args: str, overrides: list[str] = TINY) -> str:
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    return f"{PY} {RUN} {' '.join(shlex.quote(a) for a in args)} --config quick.toml {sets}"


def in_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script as root of a new user and mount namespace: its mounts vanish
    with it, and nothing outside changes."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("slt: error: "), proc.stderr
    return lines[0]


@needs_mounts
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    big = [*TINY, "model.hidden=[512, 512]"]  # a checkpoint of ~3 MB on a 256 KiB disk
    cfg = resolve.load("quick.toml", big)
    run_dir = disk / "runs" / config.run_id(cfg)
    proc = in_namespace(
        f"mount -t tmpfs -o size=256k tmpfs {disk} && "
        f"{slt_args('search', '--out', str(disk / 'runs'), overrides=big)}; rc=$?; "
        f"ls -a {run_dir} > {tmp_path / 'listing'}; exit $rc")
    line = one_error_line(proc)
    assert line == f"slt: error: cannot write {run_dir / 'checkpoint.pt'}: No space left " \
        "on device"
    listing = (tmp_path / "listing").read_text().split()
    assert "config.toml" in listing and not [n for n in listing if n.endswith(".tmp")]


@needs_mounts
@pytest.mark.slow
def test_a_full_disk_never_damages_a_finished_ticket(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = resolve.load("quick.toml", TINY)
    run_dir = disk / "runs" / config.run_id(cfg)
    keep = tmp_path / "before.slt"
    proc = in_namespace(
        f"mount -t tmpfs -o size=1m tmpfs {disk} && "
        f"{slt_args('search', '--out', str(disk / 'runs'))} > /dev/null 2>&1 && "
        f"cp {run_dir / 'ticket.slt'} {keep} && "
        f"(dd if=/dev/zero of={disk / 'filler'} bs=4k 2>/dev/null; true) && "
        f"{slt_args('search', '--out', str(disk / 'runs'), '--embed-weights')}; rc=$?; "
        f"cmp {run_dir / 'ticket.slt'} {keep} && echo SAME; exit $rc")
    line = one_error_line(proc)
    assert line == f"slt: error: cannot write {run_dir / 'ticket.slt'}: No space left on device"
    assert "SAME" in proc.stdout  # the ticket is the one written before the disk filled


@needs_mounts
@pytest.mark.slow
def test_a_read_only_filesystem_is_one_line_for_every_command(tmp_path):
    runs = tmp_path / "runs"
    cfg = resolve.load("quick.toml", TINY)
    done = run_search(cfg, runs, log=lambda _: None)
    ticket = done.run_dir / "ticket.slt"
    before = ticket.read_bytes()
    sweep = tmp_path / "grid.toml"
    sweep.write_text('base = "quick.toml"\n[set]\n' + "".join(
        f"{k} = {json.dumps(config.parse_value(v))}\n"
        for k, v in (o.split("=", 1) for o in TINY)) + "[axes]\nrun.seed = [5, 6]\n")
    script = f"mount --bind {runs} {runs} && mount -o remount,ro,bind {runs} && " + " ; ".join(
        f"{cmd} 2> {tmp_path / name}; echo $? > {tmp_path / name}.rc" for name, cmd in [
            ("search", slt_args("search", "--out", str(runs), overrides=[*TINY, "run.seed=9"])),
            ("embed", slt_args("search", "--out", str(runs), "--embed-weights")),
            ("report", f"{PY} {RUN} report {runs}"),
            ("sweep", f"{PY} {RUN} sweep {sweep} --out {runs} --no-progress"),
            ("eval", f"{PY} {RUN} eval {ticket}"),
        ])
    proc = in_namespace(script)
    assert proc.returncode == 0, proc.stderr

    def outcome(name: str) -> tuple[int, list[str]]:
        rc = int((tmp_path / f"{name}.rc").read_text())
        return rc, [x for x in (tmp_path / name).read_text().splitlines() if x.strip()]

    seed9 = config.run_id(resolve.load("quick.toml", [*TINY, "run.seed=9"]))
    assert outcome("search") == (2, [f"slt: error: cannot create the run directory "
                                     f"{runs / seed9}: Read-only file system"])
    assert outcome("embed") == (2, [f"slt: error: cannot open the lock file "
                                    f"{done.run_dir / '.lock'}: Read-only file system"])
    assert outcome("report") == (2, [f"slt: error: cannot create the report folder "
                                     f"{runs / 'report'}: Read-only file system"])
    rc, err = outcome("sweep")  # each point fails, recorded where it can be; then the record
    assert rc == 2 and len(err) == 1 and err[0].startswith("slt: error: the sweep ran, but "
                                                           "its record ")
    assert "Read-only file system" in err[0]
    assert outcome("eval") == (0, [])  # reading needs no write: it works
    assert ticket.read_bytes() == before


@needs_mounts
@pytest.mark.slow
def test_a_sweep_goes_on_past_a_point_it_cannot_write(tmp_path):
    out = tmp_path / "runs"
    sweep = tmp_path / "grid.toml"
    sweep.write_text('base = "quick.toml"\n[set]\n' + "".join(
        f"{k} = {json.dumps(config.parse_value(v))}\n"
        for k, v in (o.split("=", 1) for o in TINY)) + "[axes]\nrun.seed = [0, 1, 2]\n")
    stuck = out / config.run_id(resolve.load("quick.toml", [*TINY, "run.seed=1"]))
    stuck.mkdir(parents=True)
    proc = in_namespace(
        f"mount --bind {stuck} {stuck} && mount -o remount,ro,bind {stuck} && "
        f"{PY} {RUN} sweep {sweep} --out {out} --no-progress")
    assert proc.returncode == 1, proc.stderr  # some point failed, the sweep did not stop
    assert "2 runs done, 1 failed" in proc.stdout
    record = json.loads((out / "sweep-grid.json").read_text())
    by_seed = {row["values"]["run.seed"]: row for row in record["points"]}
    assert by_seed[0]["status"] == by_seed[2]["status"] == "finished"
    assert by_seed[1]["status"] == "failed"
    assert by_seed[1]["error"] == f"cannot open the lock file {stuck / '.lock'}: Read-only " \
        "file system"
    assert (out / "report" / "report.md").is_file()


def test_a_permission_error_is_one_line(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run slt as an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="slt-perm-"))  # /tmp: reachable by that user
    try:
        folder.chmod(0o755)  # root's: others may read, not write
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             *shlex.split(slt_args("search", "--out", str(folder / "runs")))],
            capture_output=True, text=True, cwd=REPO, timeout=600,
            env={**os.environ, "HOME": str(folder)})
        cfg = resolve.load("quick.toml", TINY)
        line = one_error_line(proc)
        assert line == f"slt: error: cannot create the run directory " \
            f"{folder / 'runs' / config.run_id(cfg)}: Permission denied"
        assert not (folder / "runs").exists()
    finally:
        shutil.rmtree(folder)


def test_a_name_over_the_limit_is_one_line(tmp_path):
    long_name = "r" * (os.pathconf("/", "PC_NAME_MAX") + 1)
    proc = subprocess.run(slt_args("search", "--out", str(tmp_path / long_name)), shell=True,
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    line = one_error_line(proc)
    assert line.startswith(f"slt: error: cannot create the run directory {tmp_path / long_name}")
    assert line.endswith(": File name too long")


def test_a_run_another_user_cannot_read_is_listed_not_fatal(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run slt as an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="slt-perm-"))  # /tmp: reachable by that user
    try:
        folder.chmod(0o755)
        runs, report = folder / "runs", folder / "report"
        done = [run_search(resolve.load("quick.toml", [*TINY, f"run.seed={seed}"]), runs,
                           log=lambda _: None).run_dir for seed in (0, 1)]
        done[1].chmod(0o700)  # root's alone; the other run is readable by anyone (0644 files)
        report.mkdir()
        report.chmod(0o777)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             str(REPO / "run.py"), "report", str(runs), "--no-eval", "--out", str(report)],
            capture_output=True, text=True, cwd=REPO, timeout=600,
            env={**os.environ, "HOME": str(folder)})
        assert proc.returncode == 0, proc.stderr
        text = (report / "report.md").read_text()
        assert "2 run directories: 1 finished, 0 running, 0 failed, 1 unreadable" in text
        assert f"| {done[1].name} | {done[1] / 'config.toml'}: Permission denied |" in text
        assert "Permission denied" in proc.stdout
    finally:
        shutil.rmtree(folder)
