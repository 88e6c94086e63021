"""Faults of run directories, injected as they happen in life: damaged run files, a lost
metrics file, a foreign checkpoint, two writers of one run, kill -9, leftovers of
interrupted writes, sweeps side by side, and a report over damaged runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slt import config, resolve, ticket
from slt.cli import main
from slt.engine.run import run_search
from slt.reporting.write import write_report
from slt.rundir import RunLock, locked_by
from tests.conftest import REPO, TINY


def quiet(_: str) -> None:
    pass


def sets(overrides: list[str]) -> list[str]:
    """`--config` of the packaged defaults plus `--set` of each override."""
    return ["--config", "quick.toml", *[a for o in overrides for a in ("--set", o)]]


def slt_proc(*args: str, **kw) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines arrive as it prints them
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def one_error_line(err: str) -> str:
    """The single stderr line of a failed command (and that it is the only one)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slt: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def finished(tmp_path):
    """A finished tiny run: (config, out folder, run dir, its summary)."""
    cfg = resolve.load("quick.toml", TINY)
    result = run_search(cfg, tmp_path / "runs", log=quiet)
    return cfg, tmp_path / "runs", result.run_dir, result.summary


# --- 1. a result is never recorded wrong ---------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "non-utf8", "garbage"])
def test_final_figures_come_from_the_state_not_the_metrics_file(finished, damage, capsys):
    cfg, out, run_dir, summary = finished
    # killed after the last checkpoint, before ticket and summary; metrics lost or damaged
    (run_dir / "summary.json").unlink()
    (run_dir / "ticket.slt").unlink()
    metrics = run_dir / "metrics.jsonl"
    if damage == "missing":
        metrics.unlink()
    elif damage == "non-utf8":
        metrics.write_bytes(b"\xff\xfe\x00garbage\n" + metrics.read_bytes()[:-20])
    else:
        metrics.write_text("not json\n[1, 2]\n{\"epoch\": \"three\"}\n")
    assert main(["search", *sets(TINY), "--out", str(out)]) == 0
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["final_test_acc"] == summary["final_test_acc"] > 0.0
    assert again["final_test_loss"] == summary["final_test_loss"]
    assert ticket.load(run_dir / "ticket.slt").metrics["test_acc"] == summary["final_test_acc"]
    capsys.readouterr()
    assert main(["eval", str(run_dir / "ticket.slt")]) == 0
    assert ": same)" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[]", b"{}",
                                     b'{"final_test_acc": 0.5}'])
def test_a_damaged_summary_is_rebuilt_not_trusted(finished, content, capsys):
    cfg, out, run_dir, summary = finished
    (run_dir / "summary.json").write_bytes(content)
    capsys.readouterr()
    assert main(["search", *sets(TINY), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "finished already" not in text
    assert "finishing the run again from its checkpoint" in text
    assert json.loads((run_dir / "summary.json").read_text()) | {"time_s": 0} == \
        summary | {"time_s": 0}


def test_a_missing_or_corrupt_ticket_is_not_a_finished_run(finished, capsys):
    cfg, out, run_dir, summary = finished
    good = (run_dir / "ticket.slt").read_bytes()
    (run_dir / "ticket.slt").write_bytes(good[:-100])  # truncated, as by a full disk
    capsys.readouterr()
    assert main(["search", *sets(TINY), "--out", str(out)]) == 0
    assert "ticket.slt fails its checksum" in capsys.readouterr().out
    assert (run_dir / "ticket.slt").read_bytes() == good


def test_damaged_metrics_lines_are_dropped_and_the_ticket_is_exact(tmp_path, capsys):
    cfg = resolve.load("quick.toml", TINY)
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    stopped = run_search(cfg, tmp_path / "b", stop_after_epochs=1, log=quiet)
    with open(stopped.run_dir / "metrics.jsonl", "ab") as fh:
        fh.write(b"\xff\xfe\xfd half a line\n{\"epoch\": 2, \"test_")  # cut short, not UTF-8
    capsys.readouterr()
    assert main(["search", *sets(TINY), "--out", str(tmp_path / "b")]) == 0
    assert "dropped 2 damaged lines" in capsys.readouterr().out
    rows = [json.loads(x) for x in (stopped.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    a = ticket.load(straight.run_dir / "ticket.slt")
    b = ticket.load(stopped.run_dir / "ticket.slt")
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers, b.layers))


@pytest.mark.parametrize("foreign", [{"foo": 1}, [1, 2, 3], torch.zeros(3), "text"])
def test_a_checkpoint_that_is_not_slts_is_one_line(tmp_path, foreign, capsys):
    cfg = resolve.load("quick.toml", TINY)
    stopped = run_search(cfg, tmp_path, stop_after_epochs=1, log=quiet)
    ckpt = stopped.run_dir / "checkpoint.pt"
    torch.save(foreign, ckpt)
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(["search", *sets(TINY), "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(ckpt) in line and "is not a checkpoint of slt" in line
    assert "move it away (or delete it) to restart this run from scratch" in line
    assert ckpt.read_bytes() == before  # nothing lost
    assert not (stopped.run_dir / "summary.json").exists()


def test_a_checkpoint_of_another_network_is_one_line(tmp_path, capsys):
    cfg = resolve.load("quick.toml", TINY)
    stopped = run_search(cfg, tmp_path, stop_after_epochs=1, log=quiet)
    ckpt = stopped.run_dir / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {"w": torch.zeros(2)}  # slt's keys, another network's weights
    torch.save(state, ckpt)
    assert main(["search", *sets(TINY), "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not fit this run's network" in line and str(ckpt) in line


# --- 2. one run directory, one writer ------------------------------------------------------


@pytest.mark.slow
def test_a_second_search_waits_for_the_writer_then_skips(finished):
    cfg, out, run_dir, summary = finished
    (run_dir / "summary.json").unlink()  # the holder will "finish" it while B waits
    lock = RunLock(run_dir)
    assert lock.acquire(wait=False)
    try:
        proc = slt_proc("search", *sets(TINY), "--out", str(out))
        deadline = time.time() + 120
        waiting = ""
        while time.time() < deadline and "waiting" not in waiting:
            waiting += proc.stdout.readline()
        assert "is being written by pid" in waiting and "waiting for it to finish" in waiting
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting, writing nothing
        (run_dir / "summary.json").write_text(json.dumps(summary))
    finally:
        lock.release()
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "finished already, skipped" in rest
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]  # no duplicate rows


@pytest.mark.slow
def test_kill_9_leaves_no_stale_lock_and_the_run_resumes(tmp_path):
    overrides = [*TINY, "search.epochs=40", "data.train_size=4096"]
    cfg = resolve.load("quick.toml", overrides)
    out = tmp_path / "runs"
    run_dir = out / config.run_id(cfg)
    proc = slt_proc("search", *sets(overrides), "--out", str(out))
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert locked_by(run_dir) is not None  # held while it runs
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert locked_by(run_dir) is None  # the kernel dropped it with the process
    report = write_report(out, evaluate_survival=False, log=quiet).read_text()
    assert "0 running, 1 interrupted" in report  # not taken for a live run
    assert "interrupted (its process is gone): rerun its search to resume" in report
    lock = RunLock(run_dir)
    assert lock.acquire(wait=False)
    lock.release()
    resumed = run_search(cfg, out, log=quiet)
    assert resumed.status == "finished"
    straight = run_search(cfg, tmp_path / "straight", log=quiet)
    a = ticket.load(straight.run_dir / "ticket.slt")
    b = ticket.load(resumed.run_dir / "ticket.slt")
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers, b.layers))


def test_leftovers_of_interrupted_atomic_writes_are_removed(tmp_path):
    cfg = resolve.load("quick.toml", TINY)
    stopped = run_search(cfg, tmp_path, stop_after_epochs=1, log=quiet)
    leftovers = [".checkpoint.pt.k2j3h4.tmp", ".summary.json.abc.tmp", ".ticket.slt.x.tmp"]
    for name in leftovers:
        (stopped.run_dir / name).write_bytes(b"half")
    unrelated = stopped.run_dir / ".survival-abc.json.q.tmp"  # a report's, not the run's
    unrelated.write_bytes(b"x")
    run_search(cfg, tmp_path, log=quiet)
    names = {p.name for p in stopped.run_dir.iterdir()}
    assert not names & set(leftovers) and unrelated.exists()


def write_sweep(folder: Path, axes: str, epochs: int = 2) -> Path:
    """A sweep file over the tiny run's settings (TOML values written with json)."""
    path = folder / "grid.toml"
    fixed = {k: config.parse_value(v) for k, v in (o.split("=", 1) for o in TINY)}
    fixed["search.epochs"] = epochs
    path.write_text("[set]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fixed.items())
                    + f"[axes]\n{axes}")
    return path


@pytest.mark.slow
def test_two_sweeps_side_by_side_split_the_grid(tmp_path):
    path = write_sweep(tmp_path, "run.seed = [0, 1, 2, 3, 4, 5]\ndata.train_size = [2048]\n",
                       epochs=12)
    out = tmp_path / "runs"
    args = ("sweep", str(path), "--out", str(out), "--no-progress", "--no-report")
    first = slt_proc(*args)
    deadline = time.time() + 120  # the second starts while the first holds a point
    while not any(locked_by(p) for p in out.glob("*") if p.is_dir()) and time.time() < deadline:
        time.sleep(0.05)
    second = slt_proc(*args)
    results = [p.communicate(timeout=600) for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], results
    # one of them met a point the other held, and left it to it
    assert any("being run by another process, left to it" in out_text
               for out_text, _ in results), results
    record = json.loads((out / "sweep-grid.json").read_text())  # the one that ended last
    assert len(record["points"]) == 6
    assert {row["status"] for row in record["points"]} <= {"finished", "skipped",
                                                           "finished elsewhere"}
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 6
    for run in runs:  # every point ran once: one row per epoch, a summary
        epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 13)), run
        assert (run / "summary.json").is_file()


# --- 5. sweeps and reports record what happened ----------------------------------------------


def test_the_sweep_record_holds_the_command_line_overrides(tmp_path):
    path = write_sweep(tmp_path, "run.seed = [0, 1]\n")
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress", "--no-report",
                 "--set", "search.epochs=1", "--set", "search.lr=0.05"]) == 0
    record = json.loads((out / "sweep-grid.json").read_text())
    assert record["overrides"] == {"search.epochs": 1, "search.lr": 0.05}
    assert record["set"]["search.epochs"] == 2  # the file's value, overridden
    for row in record["points"]:
        cfg = resolve.load(out / row["run_id"] / "config.toml")
        assert (cfg.search.epochs, cfg.search.lr) == (1, 0.05)


def test_the_report_lists_damaged_runs_and_never_counts_them_running(tmp_path, capsys):
    path = write_sweep(tmp_path, "run.seed = [0, 1, 2, 3, 4, 5]\nsource.density = [1.0, 0.5]\n",
                       epochs=1)
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    damage = {
        runs[0]: ("summary.json", b"", "summary.json is empty"),
        runs[1]: ("summary.json", b"{\"final", "summary.json is not valid JSON"),
        runs[2]: ("config.toml", b"[data\nname=", "not valid TOML"),
        runs[3]: ("summary.json", b"{}", "summary.json lacks a valid final_test_acc"),
        runs[4]: ("ticket.slt", b"SLTTICK1", "ticket.slt is not an slt ticket file"),
        runs[5]: ("error.json", b"\xff\xfe", "error.json is not UTF-8 text"),
    }
    for run, (name, content, _) in damage.items():
        (run / name).write_bytes(content)
    (runs[5] / "summary.json").unlink()
    (runs[6] / "config.toml").unlink()
    with open(runs[7] / "metrics.jsonl", "ab") as fh:  # a damaged line alone is no fault
        fh.write(b"\xff\xfe\n")
    summary = json.loads((runs[8] / "summary.json").read_text())
    del summary["layers"]  # parses, has its figures, lacks what the report reads
    (runs[8] / "summary.json").write_text(json.dumps(summary))
    # an intact ticket, but another run's: its summary must not vouch for it
    (runs[9] / "ticket.slt").write_bytes((runs[10] / "ticket.slt").read_bytes())
    capsys.readouterr()
    assert main(["report", str(out), "--no-eval"]) == 0
    terminal = capsys.readouterr().out
    report = (out / "report" / "report.md").read_text()
    assert "12 run directories: 3 finished, 0 running, 0 failed, 9 unreadable" in report
    assert "## Unreadable run directories" in report and "## Running" not in report
    for run, (_, _, reason) in damage.items():
        assert reason in report and f"unreadable run directory {run}" in terminal
    assert f"| {runs[6].name} | config.toml is missing |" in report
    assert "summary.json lacks a valid per-layer table (layers)" in report
    assert "ticket.slt is the ticket of another config" in report
    csv_rows = (out / "report" / "results.csv").read_text().splitlines()
    assert sum(",unreadable," in row for row in csv_rows) == 9
    # the search agrees with the report: neither damaged run counts as finished
    cfg9 = resolve.load(runs[9] / "config.toml")
    assert run_search(cfg9, out, log=quiet).status == "finished"  # rebuilt, not skipped


# --- the report and search on read-only copies --------------------------------------------


def test_report_of_a_copy_it_cannot_write_into_says_where(finished, capsys):
    cfg, out, run_dir, summary = finished
    long_name = "x" * (os.pathconf("/", "PC_NAME_MAX") + 1)
    assert main(["report", str(out), "--out", str(out / long_name)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot create the report folder" in line and "File name too long" in line


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
@pytest.mark.slow
def test_ctrl_c_or_sigterm_stops_a_sweep_cleanly_and_it_resumes(tmp_path, stop):
    path = write_sweep(tmp_path, "run.seed = [0, 1, 2, 3]\n", epochs=30)
    out = tmp_path / "runs"
    args = ("sweep", str(path), "--out", str(out), "--no-progress", "--workers", "2",
            "--no-report")
    proc = slt_proc(*args, start_new_session=True)  # its own process group, like a terminal's
    deadline = time.time() + 180
    while not list(out.glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the sweep and its workers
    else:
        proc.send_signal(signal.SIGTERM)  # SLURM's scancel: the sweep process alone
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if stop == "ctrl-c" else 143)
    word = "interrupted" if stop == "ctrl-c" else "terminated"
    assert err.strip().splitlines()[-1] == f"slt: {word}; rerun the same command to resume"
    assert "Traceback" not in err
    record = json.loads((out / "sweep-grid.json").read_text())
    assert {row["status"] for row in record["points"]} <= {"finished", "not run"}
    assert all(locked_by(run) is None for run in out.iterdir() if run.is_dir())
    again = slt_proc(*args)
    assert again.wait(timeout=600) == 0
    for run in (p for p in out.iterdir() if p.is_dir()):
        epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 31)), run


@pytest.mark.slow
def test_a_sweep_killed_outright_takes_its_workers_with_it(tmp_path):
    path = write_sweep(tmp_path, "run.seed = [0, 1]\n", epochs=400)
    out = tmp_path / "runs"
    proc = slt_proc("sweep", str(path), "--out", str(out), "--no-progress", "--workers", "2",
                    "--no-report")
    deadline = time.time() + 180
    while len(list(out.glob("*/checkpoint.pt"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 2 and all(locked_by(run) for run in runs)  # both workers train
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30  # the kernel tells the orphans (SIGTERM): they stop
    while any(locked_by(run) for run in runs) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(locked_by(run) for run in runs)


def test_a_command_line_override_of_an_axis_is_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, "run.seed = [0, 1]\n")
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--out", str(out), "--set", "run.seed=5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"slt: error: --set run.seed: run.seed is an axis of {path} (values [0, 1]); change "
        "the axis in the file instead")
    assert not out.exists()


def test_a_ticket_header_without_its_keys_is_one_line(finished, capsys):
    cfg, out, run_dir, summary = finished
    raw = (run_dir / "ticket.slt").read_bytes()
    (length,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16:16 + length])
    del header["densities"]
    head = json.dumps(header).encode()
    body = raw[:8] + struct.pack("<Q", len(head)) + head + raw[16 + length:-32]
    (run_dir / "ticket.slt").write_bytes(body + hashlib.sha256(body).digest())
    assert main(["eval", str(run_dir / "ticket.slt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slt: error: {run_dir / 'ticket.slt'}: the ticket header lacks densities; "
                   "the file was not written by slt (or by an incompatible version)"]
