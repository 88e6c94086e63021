"""Issue 17, classes 4 and 6: the environment and the hardware a run meets.

Stray or inconsistent torchrun variables are one line naming the variable, before anything is
written; `run.compile = true` without a working C++ compiler is one line before the run
directory is made; a precision the CPU cannot serve natively warns once with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from slt.engine import hardware as hardware
from slt.engine.hardware import CpuInfo, SpeedModeWarning, check_run_modes, speed_mode_warning
from slt.engine.platform import GroupEnv, group_env
from slt.errors import ConfigError, SltError
from tests.conftest import REPO, TINY

ALONE = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
GROUP = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def slt_search(tmp_path: Path, env: dict[str, str], *extra: str,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`slt search` of a tiny config under `env` (nothing else of the torchrun set)."""
    args = [sys.executable, str(REPO / "run.py"), "search", "--config", "configs/quick.toml",
            "--out", str(tmp_path / "out")]
    for item in [*TINY, "search.epochs=1", *extra]:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**ALONE, **env}, cwd=REPO)


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- class 4: stray distributed variables ---------------------------------------------------

@pytest.mark.parametrize("env, names", [
    ({"WORLD_SIZE": "2"}, ("WORLD_SIZE=2", "RANK is not")),
    ({"RANK": "1"}, ("RANK=1", "WORLD_SIZE is not")),
    ({"WORLD_SIZE": "two", "RANK": "0"}, ("WORLD_SIZE='two'", "whole number")),
    ({"WORLD_SIZE": "2", "RANK": "x"}, ("RANK='x'", "whole number")),
    ({"WORLD_SIZE": "2", "RANK": ""}, ("RANK=''",)),
    ({"WORLD_SIZE": "2", "RANK": "2", **GROUP}, ("RANK=2", "WORLD_SIZE=2", "0 to 1")),
    ({"WORLD_SIZE": "-1"}, ("WORLD_SIZE='-1'", "at least 1")),
    ({"WORLD_SIZE": "0"}, ("WORLD_SIZE='0'", "at least 1")),
    ({"WORLD_SIZE": "2", "RANK": "-1", **GROUP}, ("RANK='-1'", "at least 0")),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x", **GROUP}, ("LOCAL_RANK='x'",)),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "5", **GROUP}, ("LOCAL_RANK=5",)),
    ({"WORLD_SIZE": "1", "RANK": "3"}, ("RANK=3", "WORLD_SIZE=1")),
    ({"LOCAL_RANK": "1"}, ("LOCAL_RANK=1 is set but WORLD_SIZE is not",)),
    ({"WORLD_SIZE": "2", "RANK": "1"}, ("MASTER_ADDR",)),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "p"},
     ("MASTER_PORT='p'",)),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     ("MASTER_PORT=70000",)),
])
def test_group_env_names_the_variable(env: dict[str, str], names: tuple[str, ...]) -> None:
    with pytest.raises(SltError) as info:
        group_env(env)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize("env, expected", [
    ({}, GroupEnv(0, 1, 0)),
    ({"WORLD_SIZE": "1"}, GroupEnv(0, 1, 0)),  # "alone", said explicitly
    ({"RANK": "0"}, GroupEnv(0, 1, 0)),
    ({"WORLD_SIZE": " 4 ", "RANK": "3", "LOCAL_RANK": "1", **GROUP}, GroupEnv(3, 4, 1)),
])
def test_group_env_accepts_consistent_values(env: dict[str, str], expected: GroupEnv) -> None:
    assert group_env(env) == expected


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, ("WORLD_SIZE=2", "RANK")),
    ({"RANK": "1"}, ("RANK=1", "WORLD_SIZE")),
    ({"WORLD_SIZE": "two", "RANK": "0"}, ("WORLD_SIZE='two'",)),
    ({"WORLD_SIZE": "2", "RANK": "2", **GROUP}, ("RANK=2",)),
])
def test_cli_stray_variable_is_one_line_and_writes_nothing(tmp_path: Path, env: dict[str, str],
                                                          words: tuple[str, ...]) -> None:
    proc = slt_search(tmp_path, env, timeout=60)  # before: a traceback, a hang, or a run
    one_line_error(proc, *words)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- class 4: run.compile without a C++ compiler ----------------------------------------------

NO_CXX = {"CXX": "/nonexistent/c++", "PATH": str(Path(sys.executable).parent)}


def run_in_child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**ALONE, **env}, cwd=REPO)


@pytest.mark.slow
def test_check_run_modes_without_compiler_is_one_config_error() -> None:
    # in a child: inductor reads $CXX once, when its config is imported
    code = ("from types import SimpleNamespace as N\n"
            "from slt.engine.hardware import check_run_modes\n"
            "from slt.errors import ConfigError\n"
            "try:\n"
            "    check_run_modes(N(compile=True, precision='fp32'), 'cpu')\n"
            "except ConfigError as e:\n"
            "    print('ERROR', e)\n"
            "else:\n"
            "    print('OK')\n")
    proc = run_in_child(code, NO_CXX)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("ERROR run.compile = true needs a working C++"), \
        proc.stdout
    assert "/nonexistent/c++" in out[0] and "run.compile = false" in out[0]


def test_check_run_modes_with_the_compiler_here_passes() -> None:
    if not hardware.cxx_compiler().ok:
        pytest.skip(f"this machine has no working C++ compiler: {hardware.cxx_compiler()}")
    run = type("Run", (), {"compile": True, "precision": "fp32"})()
    assert check_run_modes(run, "cpu", warn=False) == []


@pytest.mark.slow
def test_a_compiler_that_cannot_build_is_named(tmp_path: Path) -> None:
    # both answer --version (inductor's own test) but build nothing usable
    fake = tmp_path / "fake-g++"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\n"
                    "echo 'probe.cpp:1:10: fatal error: Python.h: No such file' >&2; exit 1\n")
    fake.chmod(0o755)
    code = ("from slt.engine.hardware import cxx_compiler\n"
            "c = cxx_compiler(); print(c.ok, c.command, '|', c.reason)\n")
    proc = run_in_child(code, {"CXX": "/bin/true"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False /bin/true | '/bin/true' built no loadable library"), \
        proc.stdout
    proc = run_in_child(code, {"CXX": str(fake)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"False {fake} | '{fake}' cannot build a C++17 OpenMP "
                                   "extension: probe.cpp:1:10: fatal error: Python.h: No such "
                                   "file"), proc.stdout


@pytest.mark.slow
def test_cli_compile_without_compiler_fails_before_the_run_directory(tmp_path: Path) -> None:
    """run_search asks check_run_modes before it locates or makes the run directory."""
    proc = slt_search(tmp_path, NO_CXX, "run.compile=true")
    one_line_error(proc, "run.compile = true", "C++ compiler")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- class 6: a speed mode the CPU cannot serve -------------------------------------------------

AVX2 = CpuInfo("Some AVX2 CPU", frozenset({"avx", "avx2", "fma", "f16c"}), "AVX2", "x86_64")
BF16 = CpuInfo("Some BF16 CPU", frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512",
               "x86_64")
ARM = CpuInfo("", frozenset({"fp", "asimd"}), "DEFAULT", "aarch64")


def test_warning_names_reason_and_alternative() -> None:
    note = speed_mode_warning("bf16", "cpu", AVX2)
    assert note is not None and "\n" not in note
    assert "bf16" in note and "avx512_bf16 or amx_bf16" in note and "Some AVX2 CPU" in note
    assert "run.precision = 'fp32' is faster here" in note and "slower than fp32" in note
    fp16 = speed_mode_warning("fp16", "cpu", AVX2)
    assert fp16 is not None and "run.precision = 'fp32' is faster here" in fp16
    fp16_on_bf16 = speed_mode_warning("fp16", "cpu", BF16)
    assert fp16_on_bf16 is not None and "run.precision = 'bf16' is faster here" in fp16_on_bf16


def test_a_native_cpu_running_avx2_kernels_is_warned() -> None:
    """torch's kernel level decides, not the flag alone (ATEN_CPU_CAPABILITY=avx2, or a
    build without AVX-512 kernels, emulates bf16 on a bf16 CPU)."""
    on_avx2 = CpuInfo(BF16.model, BF16.flags, "AVX2", "x86_64")
    note = speed_mode_warning("bf16", "cpu", on_avx2)
    assert note is not None and "it has avx512_bf16, but torch runs its AVX2 kernels" in note
    assert "run.precision = 'fp32' is faster here" in note


def test_no_warning_where_the_mode_is_native_or_unknown() -> None:
    assert speed_mode_warning("bf16", "cpu", BF16) is None
    assert speed_mode_warning("fp32", "cpu", AVX2) is None
    assert speed_mode_warning("bf16", "cuda", AVX2) is None  # the GPU's business, not the CPU's
    assert speed_mode_warning("bf16", "cpu", ARM) is None  # no guess without x86 flags


def test_check_run_modes_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_info", lambda: CpuInfo(
        "Test CPU for test_check_run_modes_warns_once", frozenset({"avx2"}), "AVX2", "x86_64"))
    run = type("Run", (), {"compile": False, "precision": "bf16"})()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = check_run_modes(run, "cpu")
        second = check_run_modes(run, "cpu")
    assert first == second and len(first) == 1
    ours = [w for w in caught if issubclass(w.category, SpeedModeWarning)]
    assert len(ours) == 1 and str(ours[0].message) == first[0]


def test_cpu_info_reads_this_machine() -> None:
    info = hardware.cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").exists() and info.arch == "x86_64":
        assert "sse2" in info.flags and info.model


@pytest.mark.slow
def test_cli_fp16_on_a_cpu_without_fp16_warns_once(tmp_path: Path) -> None:
    """A search in a slow speed mode runs, with one warning line from check_run_modes."""
    if hardware.cpu_info().native("fp16") is not False:
        pytest.skip("this CPU computes fp16 natively (or cannot tell)")
    proc = slt_search(tmp_path, {}, "run.precision=fp16", "run.device=cpu")
    assert proc.returncode == 0, proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if "SpeedModeWarning" in ln]
    assert len(ours) == 1, proc.stderr
    assert "fp16" in ours[0] and "is faster here" in ours[0]
    assert "Traceback" not in proc.stderr


def test_check_run_modes_is_a_config_error_type() -> None:
    assert issubclass(ConfigError, SltError)
