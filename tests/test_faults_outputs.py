"""`--out` never destroys (issue 17, class 2): every output path the user types (export's
file, report's folder and the files in it, search's and sweep's run folders, bench's JSON)
is written only when it is a new file or an existing regular file that is not an input.
A symlink is written through (target replaced, link kept) or refused, never replaced; a
name ending in '/' is a folder; a device, FIFO, socket or folder where a file goes is one
line. Every refusal: exit 2, one stderr line naming the path and why, nothing changed."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slt import api, resolve, ticket
from slt.cli import main
from slt.errors import StorageError
from slt.export import export, load_state_dict
from slt.fileio import atomic_write_bytes, output_dir, output_file
from slt.network import build_network
from slt.reporting.write import write_report
from slt.spec import DataSpec
from tests.conftest import REPO, TINY
from tests.test_reporting import fake_run


def snapshot(*paths: Path) -> dict[str, str]:
    """What each path is, without following links: kind, link text, inode, content hash."""
    out = {}
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[str(p)] = "missing"
            continue
        if stat.S_ISLNK(st.st_mode):
            out[str(p)] = f"link -> {os.readlink(p)}"
        elif stat.S_ISREG(st.st_mode):
            out[str(p)] = f"file {st.st_ino} {hashlib.sha256(p.read_bytes()).hexdigest()}"
        elif stat.S_ISDIR(st.st_mode):
            out[str(p)] = f"dir {st.st_ino} {sorted(os.listdir(p))}"
        else:
            out[str(p)] = f"special {stat.S_IFMT(st.st_mode)} {st.st_ino} {st.st_rdev}"
    return out


def make_device(path: Path) -> Path:
    """A character device node like /dev/null (1, 3), made here: never the real one."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path


def make_socket(path: Path) -> socket.socket:
    """A bound Unix socket at `path` (close it when done)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


@pytest.fixture
def ticket_file(tmp_path) -> Path:
    """A small real ticket (no search: the initial top-k of a tiny MLP)."""
    cfg = resolve.load(None, TINY)
    spec = DataSpec((8,), 3)
    net = build_network(cfg, spec)
    path = tmp_path / "ticket.slt"
    ticket.save(path, cfg, spec, net, net.ticket_masks())
    return path


def refused(capsys, argv: list[str], *names: str) -> str:
    """Run the CLI, expect exit 2 and one stderr line that names each of `names`."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("slt: error: ")
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# --- export --out ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["itself", "hard link", "symlink", "relative symlink"])
def test_export_never_overwrites_its_input(tmp_path, ticket_file, capsys, how) -> None:
    out = tmp_path / "out.pt"
    if how == "itself":
        out = ticket_file
    elif how == "hard link":
        os.link(ticket_file, out)
    elif how == "symlink":
        out.symlink_to(ticket_file)
    else:
        out.symlink_to("ticket.slt")
    before = snapshot(ticket_file, out)
    line = refused(capsys, ["export", str(ticket_file), "--out", str(out)], str(out))
    assert "input of this command" in line
    assert snapshot(ticket_file, out) == before
    ticket.load(ticket_file)  # still a whole ticket


def test_export_api_refuses_an_input_it_is_told_of(ticket_file) -> None:
    before = snapshot(ticket_file)
    with pytest.raises(StorageError, match="input of this command"):
        export(ticket.load(ticket_file), ticket_file, "state_dict", inputs=[ticket_file])
    assert snapshot(ticket_file) == before


@pytest.mark.parametrize("kind", ["device", "symlink to device", "fifo", "socket", "folder",
                                  "symlink loop"])
def test_export_never_replaces_a_special_file(tmp_path, ticket_file, capsys, kind) -> None:
    out = tmp_path / "out"
    watch = [ticket_file, out]
    keep = None
    if kind == "device":
        make_device(out)
    elif kind == "symlink to device":
        watch.append(make_device(tmp_path / "null"))
        out.symlink_to("null")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "socket":
        keep = make_socket(out)
    elif kind == "folder":
        out.mkdir()
        (out / "inside").write_text("kept")
        watch.append(out / "inside")
    else:
        out.symlink_to("loop")
        (tmp_path / "loop").symlink_to("out")
        watch.append(tmp_path / "loop")
    before = snapshot(*watch)
    line = refused(capsys, ["export", str(ticket_file), "--out", str(out)], str(out))
    expected = {"device": "character device", "symlink to device": "character device",
                "fifo": "FIFO", "socket": "socket", "folder": "folder",
                "symlink loop": "symlink loop"}[kind]
    assert expected in line
    assert snapshot(*watch) == before
    if keep is not None:
        keep.close()


@pytest.mark.parametrize("kind", ["missing", "existing folder", "regular file"])
def test_export_trailing_slash_is_a_folder_and_an_error(tmp_path, ticket_file, capsys,
                                                         kind) -> None:
    """`--out dir/` names a folder; export writes one file (every run's ticket is named
    ticket.slt, so a name guessed inside the folder would collide): one line, nothing made."""
    out = tmp_path / "newdir"
    if kind == "existing folder":
        out.mkdir()
    elif kind == "regular file":
        out.write_bytes(b"old")
    before = snapshot(ticket_file, out)
    line = refused(capsys, ["export", str(ticket_file), "--out", f"{out}/"], f"{out}/")
    assert "names a folder" in line
    assert snapshot(ticket_file, out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ticket.slt"] + ([] if kind == "missing" else ["newdir"]))


def test_export_in_a_missing_folder_is_one_line(tmp_path, ticket_file, capsys) -> None:
    out = tmp_path / "missing" / "x.pt"
    refused(capsys, ["export", str(ticket_file), "--out", str(out)], str(out), "does not exist")
    assert not (tmp_path / "missing").exists()


def test_export_writes_through_a_symlink_and_keeps_it(tmp_path, ticket_file, capsys) -> None:
    target = tmp_path / "target.pt"
    target.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to("target.pt")
    assert main(["export", str(ticket_file), "--out", str(link)]) == 0
    assert os.readlink(link) == "target.pt"  # the link stays a link
    state = load_state_dict(target)  # the target holds the export
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and state


def test_export_through_a_dangling_symlink_creates_its_target(tmp_path, ticket_file) -> None:
    link = tmp_path / "link.pt"
    link.symlink_to("made.pt")
    assert main(["export", str(ticket_file), "--out", str(link)]) == 0
    assert os.readlink(link) == "made.pt"
    assert load_state_dict(tmp_path / "made.pt")


def test_export_replaces_another_regular_file_and_writes_a_new_one(tmp_path,
                                                                   ticket_file) -> None:
    old = tmp_path / "old.pt"
    old.write_bytes(b"old")
    assert main(["export", str(ticket_file), "--out", str(old)]) == 0
    assert main(["export", str(ticket_file), "--out", str(tmp_path / "new.pt")]) == 0
    assert old.read_bytes() == (tmp_path / "new.pt").read_bytes() != b"old"


def test_export_refusal_from_the_command_line(tmp_path, ticket_file) -> None:
    """End to end: the real process exits 2 with one line, and the ticket is whole."""
    before = snapshot(ticket_file)
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "export", str(ticket_file),
                           "--out", str(ticket_file)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"slt: error: cannot write {ticket_file}: it is an input of this command; choose "
        "another output file"]
    assert proc.stdout == ""
    assert snapshot(ticket_file) == before


# --- the rule itself (slt.fileio) ------------------------------------------------------------

def test_atomic_write_keeps_a_symlink_and_never_replaces_a_special_file(tmp_path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"old")
    link = tmp_path / "link"
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StorageError, match="fifo: it is a FIFO"):
        atomic_write_bytes(fifo, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "target"]  # no temp


def test_output_file_and_output_dir_answers(tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "ld").symlink_to("d")
    assert output_file(tmp_path / "new") == tmp_path.resolve() / "new"
    assert output_file(tmp_path / "f") == tmp_path.resolve() / "f"
    with pytest.raises(StorageError, match="input of this command"):
        output_file(tmp_path / "d" / ".." / "f", inputs=[tmp_path / "f"])
    (tmp_path / "d" / "g").write_text("x")
    with pytest.raises(StorageError, match="input of this command"):  # under an input folder
        output_file(tmp_path / "ld" / "g", inputs=[tmp_path / "d"])
    assert output_dir(tmp_path / "ld") == tmp_path / "ld"  # a link to a folder is the folder
    assert output_dir(f"{tmp_path}/a/b/") == tmp_path / "a" / "b" and (tmp_path / "a/b").is_dir()
    assert output_dir(tmp_path / "c", create=False) == tmp_path / "c"
    assert not (tmp_path / "c").exists()
    with pytest.raises(StorageError, match="it is a regular file, not a folder"):
        output_dir(tmp_path / "f")
    with pytest.raises(StorageError, match="empty"):
        output_file("")


# --- report --out ---------------------------------------------------------------------------

@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    fake_run(root, ["source.density=1.0"], 0.9)
    fake_run(root, ["source.density=0.5"], 0.8)
    return root


def run_files(runs: Path) -> list[Path]:
    return sorted(p for p in runs.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["regular file", "device", "fifo", "run's ticket",
                                  "symlink to a file", "dangling symlink", "a run directory"])
def test_report_out_must_be_a_folder(tmp_path, runs, capsys, kind) -> None:
    out = tmp_path / "out"
    watch = [out, *run_files(runs)]
    if kind == "regular file":
        out.write_text("kept")
    elif kind == "device":
        make_device(out)
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "run's ticket":
        out = next(runs.glob("*/ticket.slt"))
    elif kind == "symlink to a file":
        (tmp_path / "f").write_text("kept")
        watch.append(tmp_path / "f")
        out.symlink_to("f")
    elif kind == "dangling symlink":
        out.symlink_to("nowhere")
        watch.append(tmp_path / "nowhere")
    else:
        out = next(p for p in runs.iterdir() if p.is_dir())
        watch.append(out)
    before = snapshot(*watch)
    line = refused(capsys, ["report", str(runs), "--out", str(out), "--no-eval"], str(out))
    assert "as the report folder" in line
    assert snapshot(*watch) == before
    assert not (runs / "report").exists()


def test_report_writes_through_a_symlinked_report_md(tmp_path, runs) -> None:
    out = tmp_path / "out"
    out.mkdir()
    notes = tmp_path / "latest.md"
    notes.write_text("old")
    (out / "report.md").symlink_to(notes)
    path = write_report(runs, out, evaluate_survival=False, log=lambda _: None)
    assert path == out / "report.md"
    assert (out / "report.md").is_symlink() and os.readlink(out / "report.md") == str(notes)
    assert notes.read_text().startswith("# slt report: runs")


@pytest.mark.parametrize("name", ["results.csv", "report.md", "accuracy_vs_density.png"])
def test_report_never_writes_through_a_link_into_a_run(tmp_path, runs, capsys, name) -> None:
    out = tmp_path / "out"
    out.mkdir()
    summary = next(runs.glob("*/summary.json"))
    (out / name).symlink_to(summary)
    before = snapshot(out / name, *run_files(runs))
    refused(capsys, ["report", str(runs), "--out", str(out), "--no-eval"], str(out / name),
            "input of this command")
    assert snapshot(out / name, *run_files(runs)) == before
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_report_never_replaces_a_special_file_in_its_folder(runs, capsys, kind) -> None:
    folder = runs / "report"  # the default folder
    folder.mkdir()
    name = {"fifo": "report.md", "folder": "report.md", "device": "results.csv"}[kind]
    path = folder / name
    {"fifo": os.mkfifo, "folder": os.mkdir, "device": make_device}[kind](path)
    before = snapshot(path)
    refused(capsys, ["report", str(runs), "--no-eval"], str(path), "not a regular file")
    assert snapshot(path) == before
    assert sorted(p.name for p in folder.iterdir()) == [name]


def test_report_api_fails_like_the_cli(tmp_path, runs) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("kept")
    with pytest.raises(StorageError, match="it is a regular file, not a folder"):
        api.report(runs, out=blocker, evaluate_survival=False, log=lambda _: None)
    assert blocker.read_text() == "kept"


def test_report_into_a_new_folder_given_with_a_slash(tmp_path, runs) -> None:
    path = write_report(runs, f"{tmp_path}/new/deep/", evaluate_survival=False,
                        log=lambda _: None)
    assert path == tmp_path / "new" / "deep" / "report.md" and path.is_file()
    assert (tmp_path / "new" / "deep" / "results.csv").is_file()


# --- search / sweep --out (folders of run directories), bench --json --------------------------

SETS = [a for o in TINY for a in ("--set", o)]


@pytest.mark.parametrize(("argv", "kind"), [
    (["search", "--config", "configs/quick.toml", *SETS], "regular file"),
    (["search", "--config", "configs/quick.toml", *SETS], "fifo"),
    (["sweep", "demo_sweep.toml", "--no-progress"], "regular file"),
    (["sweep", "demo_sweep.toml", "--no-progress", "--launcher", "slurm"], "device"),
])
def test_run_folders_must_be_folders(tmp_path, capsys, argv, kind) -> None:
    out = tmp_path / "out"
    if kind == "regular file":
        out.write_text("kept")
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        make_device(out)
    before = snapshot(out)
    line = refused(capsys, [*argv, "--out", str(out)], str(out))
    assert "as the runs folder" in line and "not a folder" in line
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bench_json_refused_before_the_bench_runs(tmp_path, capsys) -> None:
    out = make_device(tmp_path / "null")
    before = snapshot(out)
    refused(capsys, ["bench", "topk", "--layers", "2^10", "--repeats", "1", "--device", "cpu",
                     "--json", str(out)], str(out), "character device")
    assert snapshot(out) == before
    assert capsys.readouterr().out == ""  # refused before any row was measured
