"""slt on the oldest torch it supports, installed as a researcher would: beside that torch.

Researchers install slt beside the torch build that matches their CUDA driver. slt declares
ranges (pyproject.toml), not pins, so pip must leave that torch (and its torchvision) alone,
and the range's lower bound must be a torch slt really runs on. This test makes a fresh
virtual environment, installs there exactly the pair of .ci/lowest.txt (PyPI's builds: CUDA
builds of several GB, which run on the CPU), then `pip install <copy of this
repository>[plot,slurm,tb,onnx]` with the default resolver and no constraints file; checks that
pip downloaded, replaced and upgraded neither; and runs the installed slt there: a search of
the packaged `quick.toml` (synthetic data), `slt eval` of its ticket, every export format
(state_dict, sparse, prune, ONNX), `slt layers` of a torchvision model and `slt doctor`.

It needs the package registry and skips with the reason when pip cannot reach it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.install]

REPO = Path(__file__).resolve().parents[1]
# Folders and files of a checkout that a build does not need (and must not see: a stale build/
# or egg-info would be packaged as it is).
# Top-level only: slt/data/ is a package of its own (the data wing), not a data folder.
_TOP_NOT_COPIED = {".git", ".venv", "runs", "data", "build", "dist"}
_ANYWHERE_NOT_COPIED = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache",
                                              ".ruff_cache")


def _NOT_COPIED(folder: str, names: list[str]) -> set[str]:
    """shutil.copytree's ignore: build leftovers anywhere, local folders at the top."""
    skipped = set(_ANYWHERE_NOT_COPIED(folder, names))
    if Path(folder).resolve() == REPO:
        skipped |= _TOP_NOT_COPIED & set(names)
    return skipped
# What pip prints when the registry cannot be reached (as opposed to a resolver failure).
_OFFLINE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Name or service not known|Network is unreachable|ConnectTimeoutError|"
    r"ReadTimeoutError|Max retries exceeded|ProxyError|Retrying \(Retry\("
)


def _declared_lower_bound(name: str) -> tuple[int, int]:
    """(major, minor) of `name>=X.Y` among pyproject's dependencies."""
    import tomllib  # Python >= 3.11; on 3.10 the test skips below

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(rf"{name}\s*>=\s*(\d+)\.(\d+)(?:\.\d+)?\s*(?:,.*)?", dep)
        if m:
            return int(m.group(1)), int(m.group(2))
    raise AssertionError(f"pyproject.toml declares no `{name}>=X.Y` range: {deps}")


def lowest_pair() -> dict[str, str]:
    """{'torch': '2.4.1', 'torchvision': '0.19.1'}: the exact versions of .ci/lowest.txt."""
    pins = {}
    for line in (REPO / ".ci" / "lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    assert set(pins) == {"torch", "torchvision"}, pins
    return pins


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _tail(out: str, chars: int = 4000) -> str:
    """pip's output for a failure message, less the many 'Location ... is ignored' warnings."""
    lines = [line for line in out.splitlines() if not line.startswith("WARNING: Location")]
    return "\n".join(lines)[-chars:]


def _pip(python: Path, *args: str | Path, cwd: Path) -> str:
    """Runs the venv's pip; skips the test when the registry is out of reach."""
    proc = _run([python, "-m", "pip", *args, "--retries", "1", "--timeout", "60",
                 "--disable-pip-version-check"], cwd)
    out = proc.stdout + proc.stderr
    offline = [line for line in out.splitlines() if _OFFLINE.search(line)]
    if proc.returncode != 0 and offline:
        pytest.skip(f"package registry not reachable: pip {args[0]}: {offline[-1][:300]}")
    assert proc.returncode == 0, f"pip {' '.join(map(str, args))} failed:\n{_tail(out)}"
    return out


def _versions(python: Path, cwd: Path) -> dict[str, str]:
    out = _run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
               cwd).stdout
    return {k.lower(): v for k, _, v in (line.partition("==") for line in out.splitlines())}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib")
def test_the_declared_lower_bounds_are_the_tested_pair() -> None:
    pins = lowest_pair()
    for name in ("torch", "torchvision"):
        major, minor = (int(n) for n in pins[name].split(".")[:2])
        assert _declared_lower_bound(name) == (major, minor), (name, pins[name])


def _slt(venv: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    proc = _run([venv / "bin" / "slt", *args], cwd)
    assert proc.returncode == 0, (args, proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib")
def test_slt_installs_and_runs_beside_the_oldest_supported_torch(tmp_path: Path) -> None:
    pins = lowest_pair()
    import torch  # the torch this suite runs on: the test must pre-install another one

    assert not torch.__version__.startswith(pins["torch"]), "CI's torch is the lower bound"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path).check_returncode()
    python = venv / "bin" / "python"

    # 1. the researcher's environment: the old torch with its own torchvision
    _pip(python, "install", "--no-cache-dir", *(f"{k}=={v}" for k, v in pins.items()),
         cwd=tmp_path)
    before = _versions(python, tmp_path)
    assert before["torch"].split("+")[0] == pins["torch"], before

    # 2. slt with its extras, from a copy of this checkout, default deps, no constraints
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_COPIED)
    out = _pip(python, "install", "--no-cache-dir", f"{src}[plot,slurm,tb,onnx]", cwd=tmp_path)
    after = _versions(python, tmp_path)
    for name in ("torch", "torchvision"):
        assert after[name] == before[name], (
            f"pip replaced {name} {before[name]} by {after.get(name)}:\n{_tail(out)}")
        assert re.search(rf"^Requirement already satisfied: {name}\W", out, re.M), _tail(out)
        assert not re.search(rf"(Downloading|Uninstalling|Collecting) {name}\W", out), _tail(out)
    installed = re.search(r"^Successfully installed (.*)$", out, re.M)
    assert installed and "slt-" in installed.group(1), _tail(out)
    assert not re.search(r"\b(torch|torchvision|nvidia-[\w-]+|triton)-\d", installed.group(1))
    for extra in ("matplotlib", "submitit", "tensorboard", "onnx", "onnxscript"):
        assert extra in after, f"extra {extra} not installed: {sorted(after)}"
    check = _run([python, "-m", "pip", "check", "--disable-pip-version-check"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr  # every requirement still met

    # 3. the installed slt (not this checkout) on that torch: search, eval, exports, doctor
    probe = _run([python, "-c", "import slt, torch; print(slt.__file__, torch.__version__)"],
                 tmp_path)
    assert probe.returncode == 0, probe.stderr
    slt_file, torch_version = probe.stdout.split()[-2:]
    assert Path(slt_file).is_relative_to(venv) and torch_version.split("+")[0] == pins["torch"]
    search = _slt(venv, "search", "--config", "quick.toml", "--set", "search.epochs=2",
                  "--set", "data.train_size=2048", "--set", "run.progress=false",
                  "--out", tmp_path / "runs", cwd=tmp_path)
    assert "done: test acc" in search.stdout + search.stderr, search.stdout[-2000:]
    (ticket,) = (tmp_path / "runs").glob("*/ticket.slt")
    evaluated = _slt(venv, "eval", ticket, cwd=tmp_path)
    assert re.search(r"test accuracy \S+ .*\(run recorded \S+: same\)", evaluated.stdout), \
        evaluated.stdout
    for fmt, extra, name in (("state_dict", [], "t.pt"), ("state_dict", ["--sparse"], "s.pt"),
                             ("prune", [], "p.pt"), ("onnx", [], "t.onnx")):
        _slt(venv, "export", ticket, "--format", fmt, *extra, "--out", tmp_path / name,
             cwd=tmp_path)
        assert (tmp_path / name).stat().st_size > 10_000, name
    # the exports load there: the state dict into the ticket's module, the ONNX graph checked
    loads = _run([python, "-c", (
        "import sys, onnx, torch, slt\n"
        "t = slt.load_ticket(sys.argv[1]); m = t.to_module()\n"
        "m.load_state_dict(torch.load(sys.argv[2], weights_only=True))\n"
        "onnx.checker.check_model(onnx.load(sys.argv[3])); print('loaded')"),
        ticket, tmp_path / "t.pt", tmp_path / "t.onnx"], tmp_path)
    assert loads.returncode == 0 and "loaded" in loads.stdout, loads.stderr[-3000:]
    layers = _slt(venv, "layers", "--set", "model.name=torchvision:resnet18", "--input",
                  "3x32x32", "--classes", "10", cwd=tmp_path)
    assert "conv1.weight" in layers.stdout and "fc.weight" in layers.stdout, layers.stdout
    doctor = _slt(venv, "doctor", "--steps", "2", cwd=tmp_path)
    assert f"torch {before['torch']}" in doctor.stdout and "torch path" in doctor.stdout
    assert "ok: every check that applies passed" in doctor.stdout, doctor.stdout
    shutil.rmtree(venv, ignore_errors=True)  # 5.4 GB; pytest keeps the last 3 tmp folders


def test_the_wheel_holds_every_module_configs_and_kernels(tmp_path: Path) -> None:
    """pyproject.toml lists slt's packages one by one: a wing left out of that list would be
    missing from every installed slt while the checkout's tests pass. Built offline, with the
    setuptools this environment has."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_COPIED)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--disable-pip-version-check", "-w", tmp_path / "dist", src], tmp_path)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("slt-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    want = {f"slt/{p.relative_to(REPO / 'slt').as_posix()}" for p in (REPO / "slt").rglob("*.py")}
    want |= {f"slt/configs/{p.name}" for p in (REPO / "configs").glob("*.toml")}
    want |= {f"slt/kernels/{p.name}" for p in (REPO / "kernels").glob("*.c[up]*")}
    assert len(want) > 60
    assert not want - held, f"missing from the wheel: {sorted(want - held)}"

