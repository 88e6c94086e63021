"""Installing slt into an environment that already holds a supported torch keeps that torch.

Researchers install slt beside the torch build that matches their CUDA driver. slt declares
ranges (pyproject.toml), not pins, so pip must leave that torch (and its torchvision) alone.
This test makes a fresh virtual environment, installs there the oldest torch the range admits
(`torch>=X.Y` in pyproject.toml) with its torchvision, then `pip install <copy of this
repository>[plot,slurm,tb]` with the default resolver and no constraints file, and checks that
pip downloaded, replaced and upgraded neither, and that the installed slt imports and runs a
one-epoch search of the packaged `quick.toml` (synthetic data) on that torch.

The old torch is a CPU build of it found in pip's `find-links` folders (this machine kind keeps
`torch-2.13.0+cpu` there); PyPI's builds of it are CUDA builds of several GB, so without a
local file the test skips rather than download them. `SLT_TEST_TORCH_WHEEL` names another
wheel file to use. torchvision is installed but never imported: PyPI's torchvision is built for
the CUDA torch and does not load beside a CPU build ("operator torchvision::nms does not
exist"), which says nothing about slt. slt imports torchvision only for real datasets, so the
synthetic search below does not need it.

It needs the package registry (torchvision, tqdm and the extras come from it) and skips with
the reason when pip cannot reach it.
"""

from __future__ import annotations

import glob
import os
import platform
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


def _find_links() -> list[Path]:
    """The local folders pip is configured to look in (environment and pip config files)."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            found += value.strip("'\"").split()
    return [Path(p.removeprefix("file://")) for p in found if Path(
        p.removeprefix("file://")).is_dir()]


def _old_torch_wheel(major: int, minor: int) -> Path | None:
    """A local CPU wheel of torch major.minor for this interpreter and machine, if any."""
    if os.environ.get("SLT_TEST_TORCH_WHEEL"):
        return Path(os.environ["SLT_TEST_TORCH_WHEEL"])
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in _find_links():
        hits = sorted(glob.glob(str(
            folder / f"torch-{major}.{minor}.*+cpu-{tag}-{tag}-*{platform.machine()}.whl")))
        if hits:
            return Path(hits[-1])
    return None


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
def test_install_keeps_an_existing_supported_torch(tmp_path: Path) -> None:
    major, minor = _declared_lower_bound("torch")
    wheel = _old_torch_wheel(major, minor)
    if wheel is None:
        pytest.skip(f"no local CPU wheel of torch {major}.{minor} in pip's find-links "
                    f"(PyPI's is a CUDA build of several GB); set SLT_TEST_TORCH_WHEEL")
    import torch  # the torch this suite runs on: the test must pre-install another one

    assert not torch.__version__.startswith(f"{major}.{minor}."), (
        f"CI's torch {torch.__version__} is the range's lower bound: nothing to tell apart")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path).check_returncode()
    python = venv / "bin" / "python"

    # 1. the researcher's environment: an old torch with its own torchvision (torchvision
    #    0.N is released with torch 2.(N-15): 0.28 with 2.13, and asks for exactly that torch).
    assert major == 2, "update the torch -> torchvision pairing below"
    _pip(python, "install", wheel, f"torchvision==0.{minor + 15}.*", cwd=tmp_path)
    before = _versions(python, tmp_path)
    assert before["torch"].startswith(f"{major}.{minor}."), before

    # 2. slt with its extras, from a copy of this checkout, default deps, no constraints.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_COPIED)
    out = _pip(python, "install", f"{src}[plot,slurm,tb]", cwd=tmp_path)
    after = _versions(python, tmp_path)

    for name in ("torch", "torchvision"):
        assert after[name] == before[name], (
            f"pip replaced {name} {before[name]} by {after.get(name)}:\n{_tail(out)}")
        assert re.search(rf"^Requirement already satisfied: {name}\W", out, re.M), _tail(out)
        assert not re.search(rf"(Downloading|Uninstalling|Collecting) {name}\W", out), _tail(out)
    installed = re.search(r"^Successfully installed (.*)$", out, re.M)
    assert installed and "slt-" in installed.group(1), _tail(out)
    assert not re.search(r"\b(torch|torchvision|nvidia-[\w-]+|triton)-\d", installed.group(1))
    for extra in ("matplotlib", "submitit", "tensorboard"):
        assert extra in after, f"extra {extra} not installed: {sorted(after)}"
    check = _run([python, "-m", "pip", "check", "--disable-pip-version-check"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr  # every requirement still met

    # 3. the installed slt (not this checkout) runs on that torch: import, one-epoch search.
    probe = _run([python, "-c", "import slt, slt.cli, torch; print(slt.__file__); "
                  "print(torch.__version__)"], tmp_path)
    assert probe.returncode == 0, probe.stderr
    slt_file, torch_version = probe.stdout.split()[-2:]
    assert Path(slt_file).is_relative_to(venv), slt_file
    assert torch_version == before["torch"], probe.stdout
    search = _run([venv / "bin" / "slt", "search", "--config", "quick.toml",
                   "--set", "search.epochs=1", "--set", "data.train_size=4096",
                   "--set", "run.device=cpu", "--set", "run.progress=false",
                   "--out", tmp_path / "runs"], tmp_path)
    assert search.returncode == 0, search.stdout[-2000:] + search.stderr[-4000:]
    assert "done: test acc" in search.stdout + search.stderr, search.stdout[-2000:]
    assert list((tmp_path / "runs").glob("*/ticket.slt")), search.stdout[-2000:]
    shutil.rmtree(venv, ignore_errors=True)  # 1.2 GB; pytest keeps the last 3 tmp folders


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

