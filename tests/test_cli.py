"""End-to-end CLI runs through run.py (the same CLI as the `slt` script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY


def slt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=600)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_config_show_resolves() -> None:
    proc = slt("config", "show", "--config", "configs/mnist_lenet.toml",
               "--set", "source.scheme=erk", "--set", "source.density=0.2")
    assert proc.returncode == 0, proc.stderr
    assert 'scheme = "erk"' in proc.stdout and "density = 0.2" in proc.stdout
    assert "# run id: mnist-mlp-d0.2-t0.1-" in proc.stdout
    assert "keep 0.5 of the source" in proc.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["source.density=2"], "slt: error: source.density must be in (0, 1], got 2.0"),
        (["search.ticket_density=0.9"], "cannot exceed source.density"),
        (["model.name=resnet21"], "slt: error: unknown model 'resnet21' (did you mean"),
        (["source.denstiy=0.2"], "unknown key source.denstiy (did you mean 'density'?)"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, overrides, message) -> None:
    out = tmp_path / "runs"
    proc = slt("search", "--config", "configs/quick.toml", "--out", str(out), *sets(overrides))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_missing_dataset_names_where_it_looked(tmp_path) -> None:
    out = tmp_path / "runs"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = slt("search", "--config", "configs/mnist_lenet.toml", "--out", str(out),
               "--set", f"data.root={empty}")
    assert proc.returncode == 2
    assert str(empty) in proc.stderr and "data.root" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_search_then_eval_reproduces_accuracy(tmp_path) -> None:
    out = tmp_path / "runs"
    proc = slt("search", "--config", "configs/quick.toml", "--out", str(out), *sets(TINY))
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    proc = slt("eval", str(run_dir / "ticket.slt"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["test_acc"] == summary["final_test_acc"] == result["recorded_test_acc"]
    assert "same" in proc.stdout
    again = slt("search", "--config", "configs/quick.toml", "--out", str(out), *sets(TINY))
    assert "skipped" in again.stdout


def test_eval_of_a_missing_ticket(tmp_path) -> None:
    proc = slt("eval", str(tmp_path / "nope.slt"))
    assert proc.returncode == 2 and "cannot read ticket" in proc.stderr


@pytest.mark.data
@pytest.mark.slow
def test_mnist_search_and_eval(tmp_path, shared_data) -> None:
    out = tmp_path / "runs"
    proc = slt("search", "--config", "configs/mnist_lenet.toml", "--out", str(out),
               "--set", f"data.root={shared_data}", "--set", "search.epochs=1",
               "--set", "source.density=0.5", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_acc"] > 0.85  # one epoch of edge-popup on LeNet-300-100
    proc = slt("eval", str(run_dir / "ticket.slt"), "--json")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test_acc"] == summary[
        "final_test_acc"]


def test_out_under_a_file_is_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = slt("search", "--config", "configs/quick.toml", "--out", str(blocker / "runs"),
               *sets(TINY))
    assert proc.returncode == 2
    assert "slt: error: cannot create the run directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_wheel_ships_configs_and_kernels(tmp_path) -> None:
    pytest.importorskip("setuptools", reason="building a wheel offline needs setuptools")
    src = tmp_path / "src"  # build from a copy: the build leaves build/ and *.egg-info behind
    for name in ("slt", "configs", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("slt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("slt/configs/quick.toml", "slt/configs/mnist_lenet.toml",
                 "slt/configs/demo_sweep.toml", "slt/cli.py", "slt/reporting/plots.py",
                 "slt/kernels/segmented_topk.cu", "slt/kernels/topk_binding.cpp"):
        assert name in names
