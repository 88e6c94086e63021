"""scripts/gpu-proof rehearsed where there is no GPU: in a fresh copy of the checkout, with a
Python that already holds torch (as the lent GPU machine's does), `--budget 60` installs the
copy, runs every step (the CUDA-only ones say skipped), writes at most 8 files, prints the
summary for docs/gpu.md; a second call resumes the Conv-6 search where the first left it.
So the first call on a GPU cannot fail on a typo."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.test_install import _NOT_COPIED

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the CPU case")]

REPO = Path(__file__).resolve().parents[1]
FILES = {"proof.json", "proof.log", "doctor.json", "bench_topk.json", "bench_search.json"}


def python_with_this_torch(folder: Path) -> Path:
    """A fresh venv that sees this interpreter's packages (torch, torchvision, pytest...)
    through a .pth line, but has no slt: the install step must put it there."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    Path(purelib, "_outer_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def proof(clone: Path, python: Path, out: Path, data: Path,
          budget: int = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "OUT")}
    return subprocess.run([str(python), "scripts/gpu-proof", "--budget", str(budget), "--out",
                           str(out), "--data", str(data)], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_gpu_proof_rehearses_end_to_end_without_a_gpu(tmp_path, shared_data) -> None:
    tar = shared_data / "cifar10-jpg.tar.gz"
    if not tar.is_file():
        pytest.skip(f"{tar} is absent")
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=_NOT_COPIED)
    shutil.rmtree(clone / ".proof", ignore_errors=True)
    shutil.rmtree(clone / ".proof-data", ignore_errors=True)
    python = python_with_this_torch(tmp_path / "venv")
    assert subprocess.run([python, "-c", "import slt"], cwd=tmp_path,
                          capture_output=True).returncode != 0  # no slt before the proof

    first = proof(clone, python, tmp_path / "out1", tar)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((tmp_path / "out1" / "proof.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    files = {p.name for p in (tmp_path / "out1").iterdir()}
    ran = {"bench topk": "bench_topk.json", "bench search": "bench_search.json"}
    want = FILES - {f for step, f in ran.items() if steps[step]["status"] == "skipped"}
    assert want <= files and len(files) <= 8, files
    assert report["cuda"] is False
    for name in ("install", "doctor", "cuda tests"):
        assert steps[name]["status"] == "passed", steps[name]
    for name in ("bench topk", "bench search"):  # a slow machine may run out of the 60 s
        assert steps[name]["status"] == "passed" or (
            steps[name]["status"] == "skipped" and "of the budget left" in steps[name]["note"]
        ), steps[name]
    for name in ("sanitizer memcheck", "sanitizer racecheck", "bench search compile"):
        assert steps[name]["status"] == "skipped" and "no CUDA" in steps[name]["note"]
    assert report["summary"] in first.stdout
    assert "| doctor | passed |" in report["summary"]
    assert "no CUDA device present" in report["summary"]
    assert "CUDA tests: 0 passed, 0 failed, 0 errors" in report["summary"]
    doctor = json.loads((tmp_path / "out1" / "doctor.json").read_text())
    assert doctor["ok"] is True and doctor["versions"]["torch"] == torch.__version__
    installed = subprocess.run([python, "-c", "import slt; print(slt.__file__)"], cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout.strip()
    assert Path(installed).resolve().is_relative_to(clone.resolve())  # the copy, editable

    # the second call, with room to finish, runs every step and carries the search on
    second = proof(clone, python, tmp_path / "out2", tar, budget=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = {s["name"]: s for s in json.loads((tmp_path / "out2" / "proof.json").read_text())
             ["steps"]}
    for name in ("install", "doctor", "cuda tests", "bench topk", "bench search", "conv6"):
        assert again[name]["status"] == "passed", again[name]
    assert FILES | {"conv6.json"} <= {p.name for p in (tmp_path / "out2").iterdir()}
    if steps["conv6"]["status"] != "skipped":  # the first call unpacked the data into .proof/
        assert "unpacked" not in second.stdout
    conv = json.loads((tmp_path / "out2" / "conv6.json").read_text())
    assert conv["epochs_done"] == 2 and conv["summary"]["final_test_acc"] is not None
    assert [r["epoch"] for r in conv["metrics"]] == [1, 2]
    runs = list((clone / ".proof" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name == conv["run"]  # one run, carried on, not redone


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_proof", str(REPO / "scripts" /
                                                                  "gpu-proof"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name,
                                                                             loader))
    sys.modules[loader.name] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


def test_a_step_past_its_limit_is_stopped_gracefully_then_killed(tmp_path) -> None:
    script = load_script()
    p = script.Proof(budget=60, out=tmp_path, python=sys.executable, cuda=True)
    p.grace = 2.0
    trap = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
            "print('ready', flush=True); time.sleep(60)")
    step = p.run("graceful", [sys.executable, "-c", trap], cap=3, need=1, stop=signal.SIGTERM)
    assert (step.status, step.returncode) == ("stopped", 143)  # SIGTERM, handled
    deaf = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    step = p.run("deaf", [sys.executable, "-c", deaf], cap=3, need=1, stop=signal.SIGTERM)
    assert (step.status, step.returncode) == ("stopped", -9)  # ignored: SIGKILL after grace
    assert 4.5 < step.seconds < 15
    step = p.run("killed", [sys.executable, "-c", deaf], cap=2, need=1)
    assert (step.status, step.returncode) == ("stopped", -9)
    step = p.run("too late", [sys.executable, "-c", "pass"], cap=100, need=200)
    assert step.status == "skipped" and "needs 200" in step.note
    assert "[graceful] stopped (exit 143)" in (tmp_path / "proof.log").read_text()
