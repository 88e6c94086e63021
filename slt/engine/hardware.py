"""What this machine can serve: its CPU's native number formats, a working C++ compiler for
`torch.compile`, triton on CUDA; and the check a run makes of its speed modes against them.

A speed mode the hardware cannot serve does not fail, it crawls: on a CPU without native
bf16 (AVX2 only) autocast to bf16 emulates every multiply, and a Conv-4 step is 9-15x slower
than fp32; fp16 on a CPU without AVX-512 FP16 or AMX-FP16 is slower still (79x on an
AVX-512 BF16 EPYC). Figures: docs/scaling.md, "Which hardware serves which mode".
And `run.compile = true` without a C++ compiler fails at the first step, after the run
directory is made. So a run asks `check_run_modes` first: a mode that cannot run at all is
one `ConfigError` line before anything is written; a mode that runs but slowly is one
warning naming the reason and the faster alternative. `cpu_info` and `cxx_compiler` are
public so that a diagnostic command can show the same facts.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform as _stdlib_platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slt.errors import ConfigError, first_line

# /proc/cpuinfo flags that give the CPU native arithmetic in each half-precision format
# (x86; other architectures have none of these names and are judged by `native_formats`)
NATIVE_FLAGS = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
}
# Measured Conv-4 (3x32x32, batch 128) search step, `slt bench search`, docs/scaling.md:
# what the warning quotes so that "slow" has a number.
MEASURED = {
    "bf16": "a Conv-4 search step measured 9x slower than fp32 with AVX2 kernels, 15x on an "
            "AVX2-only CPU",
    "fp16": "a Conv-4 search step measured 79x slower than fp32 on an AVX-512 CPU without "
            "AVX-512 FP16",
}


class SpeedModeWarning(UserWarning):
    """A speed mode that runs, but slower than the plain one on this hardware."""


@dataclass(frozen=True)
class CpuInfo:
    model: str  # e.g. "AMD EPYC 9654 96-Core Processor"; the platform's name elsewhere
    flags: frozenset[str]  # /proc/cpuinfo flags (empty where there is no such file)
    capability: str  # torch's kernel level: "AVX512", "AVX2", "DEFAULT", ...
    arch: str  # "x86_64", "aarch64", ...

    def native(self, precision: str) -> bool | None:
        """Whether the CPU computes `precision` natively: True, False, or None (unknown:
        not an x86 CPU with readable flags, so no warning is given on a guess)."""
        if precision == "fp32":
            return True
        if self.arch not in ("x86_64", "AMD64", "i686", "i386") or not self.flags:
            return None
        # the flag alone is not enough: torch must run its AVX-512 kernels (a build without
        # them, or ATEN_CPU_CAPABILITY=avx2, emulates bf16 on a bf16 CPU just the same)
        return self.capability.upper().startswith("AVX512") and any(
            flag in self.flags for flag in NATIVE_FLAGS.get(precision, ()))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU: model name, feature flags and torch's CPU capability."""
    model, flags = "", frozenset[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CpuInfo(model or _stdlib_platform.processor() or "unknown CPU", flags, capability,
                   _stdlib_platform.machine())


def speed_mode_warning(precision: str, device: torch.device | str,
                       cpu: CpuInfo | None = None) -> str | None:
    """Why `precision` will be slow on `device`, and what to use instead; None when it is
    served natively (or when that cannot be known)."""
    kind = torch.device(device).type
    if kind == "cuda" and precision == "bf16" and torch.cuda.is_available() and \
            not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(torch.device(device))
        return (f"run.precision = 'bf16' on a GPU without native bf16 ({name}; it needs "
                "compute capability 8.0 or newer): it is emulated and slow; run.precision = "
                "'fp16' is faster here")
    if kind != "cpu" or precision == "fp32":
        return None
    cpu = cpu or cpu_info()
    if cpu.native(precision) is not False:
        return None
    names = NATIVE_FLAGS.get(precision, ())
    has = [flag for flag in names if flag in cpu.flags]
    why = (f"it has {has[0]}, but torch runs its {cpu.capability} kernels" if has else
           f"no {' or '.join(names)}; torch uses {cpu.capability}")
    better = "bf16" if precision == "fp16" and cpu.native("bf16") else "fp32"
    return (f"run.precision = '{precision}' on a CPU without native {precision} ({cpu.model}, "
            f"{why}): it is emulated and slow "
            f"({MEASURED.get(precision, 'measured slower than fp32')}); "
            f"run.precision = '{better}' is faster here")


@dataclass(frozen=True)
class Compiler:
    command: str  # what inductor would run ("g++", $CXX, ...); "" when none is found
    ok: bool
    reason: str  # why it cannot build inductor's kernels; "" when ok


def _inductor_compiler() -> str:
    """The C++ compiler torch.compile's inductor would use on the CPU: its own search
    (torch._inductor.config.cpp.cxx: $CXX, else g++, each checked with --version), or $CXX /
    g++ when that function is not there. Raises ValueError when none answers."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        command = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(command) is None:
            raise ValueError(f"'{command}' is not found") from None
        return command
    try:
        return str(get_cpp_compiler())
    except Exception as exc:  # InvalidCxxCompiler and whatever a future search raises
        cxx: Any = getattr(getattr(_inductor_config(), "cpp", None), "cxx", None)
        named = ", ".join(repr(c) for c in (cxx if isinstance(cxx, (list, tuple)) else [cxx])
                          if c) or "'g++'"
        raise ValueError(f"none of {named} runs (torch._inductor.config.cpp.cxx, from $CXX; "
                         f"{type(exc).__name__})") from None


def _inductor_config() -> Any:
    try:
        from torch._inductor import config
    except ImportError:
        return None
    return config


# A file of the kind inductor builds: C++17, OpenMP, the Python headers, a shared library
_PROBE = """#include <Python.h>
#include <omp.h>
#include <vector>
extern "C" int slt_probe(int n) {
    std::vector<int> v(n);
    return omp_get_max_threads() + (int)v.size();
}
"""


@functools.cache
def _compiles(command: str, cxx_env: str | None, path: str) -> str:
    """'' when `command` builds the probe into a shared library that loads and runs; else
    the first error line. Cached per compiler, $CXX and $PATH (the last two only key the
    cache): a run pays for this once per process, about a second."""
    include = sysconfig.get_paths().get("include", "")
    with tempfile.TemporaryDirectory(prefix="slt-cxx-") as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text(_PROBE)
        args = [*command.split(), "-std=c++17", "-shared", "-fPIC", "-fopenmp",
                f"-I{include}", str(src), "-o", str(lib)]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"'{command}' does not run ({type(exc).__name__}: {first_line(exc)})"
        if proc.returncode != 0:
            text = (proc.stderr or proc.stdout).splitlines()
            lines = [ln for ln in text if "error" in ln] or text or \
                [f"exit status {proc.returncode}"]
            return f"'{command}' cannot build a C++17 OpenMP extension: {lines[0].strip()}"
        try:  # it says it built something: a library that loads and runs?
            if ctypes.CDLL(str(lib)).slt_probe(3) < 4:
                return f"'{command}' built a library that computes wrong results"
        except (OSError, AttributeError) as exc:
            return f"'{command}' built no loadable library ({first_line(exc)})"
    return ""


def cxx_compiler() -> Compiler:
    """The C++ compiler torch.compile would use on the CPU, and whether it really builds a
    file like inductor's (a compiler that answers --version can still lack the Python
    headers or OpenMP). Cached per $CXX and $PATH."""
    try:
        command = _inductor_compiler()
    except ValueError as exc:
        return Compiler("", False, str(exc))
    reason = _compiles(command, os.environ.get("CXX"), os.environ.get("PATH", ""))
    return Compiler(command, not reason, reason)


def triton_available() -> bool:
    """Whether torch.compile can generate its CUDA kernels (it needs triton)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


def check_run_modes(run: Any, device: torch.device | str,
                    warn: bool = True) -> list[str]:
    """Check the speed modes of `run` (a RunConfig: precision, compile) on `device` before
    anything is written: a mode that cannot run is one ConfigError line; a mode the
    hardware serves slowly is returned as a one-line reason, and (with `warn`) issued once
    per process as a SpeedModeWarning."""
    device = torch.device(device)
    if getattr(run, "compile", False):
        if device.type == "cpu":
            cxx = cxx_compiler()
            if not cxx.ok:
                raise ConfigError(f"run.compile = true needs a working C++ compiler for "
                                  f"torch.compile on the CPU: {cxx.reason}; install g++ (or "
                                  "set CXX), or set run.compile = false")
        elif device.type == "cuda" and not triton_available():
            raise ConfigError("run.compile = true on CUDA needs triton (pip install triton), "
                              "or set run.compile = false")
    notes = [n for n in [speed_mode_warning(getattr(run, "precision", "fp32"), device)] if n]
    if warn:
        for note in notes:
            _warn_once(note)
    return notes


@functools.cache
def _warn_once(message: str) -> None:
    """One warning per distinct message per process (a sweep of 20 points warns once), on
    one line: attributed to "slt" rather than to a source line, which Python's default
    format would print as a second line."""
    warnings.warn_explicit(message, SpeedModeWarning, filename="slt", lineno=0,
                           module="slt.hardware")
