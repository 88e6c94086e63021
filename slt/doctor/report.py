"""`slt doctor`: every check in order, the screen, the JSON, and the exit status.

Exit 0 when every check that applies passed (a `note` is advice, not a failure); 1 when one
failed, with one line on stderr naming it. A job script can gate on it:
`slt doctor || exit 1`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from slt.doctor.checks import (
    FAIL,
    NOTE,
    PASS,
    SKIP,
    Check,
    bf16_note,
    compile_note,
    kernel_check,
    search_check,
)
from slt.doctor.facts import CudaDevice, cpu_facts, cuda_devices, cuda_unusable, versions
from slt.fileio import atomic_write_text, output_file
from slt.topk.kernel import KernelFn, build_kernel

CPU_BATCH, CUDA_BATCH = 32, 256


@dataclass
class Doctor:
    """What to run; the defaults are the real machine, tests hand in others."""

    steps: int = 20
    limit_s: float = 15.0  # per precision and device: an emulated bf16 step can take seconds
    search: bool = True
    kernel_layers: str = "resnet50"
    make_kernel: Callable[[torch.device], KernelFn] = build_kernel
    devices: Callable[[], list[CudaDevice]] = cuda_devices


@dataclass
class Report:
    versions: dict[str, Any]
    cpu: dict[str, Any]
    cuda: list[dict[str, Any]]
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def as_dict(self) -> dict[str, Any]:
        return {"versions": self.versions, "cpu": self.cpu, "cuda_devices": self.cuda,
                "checks": [asdict(c) for c in self.checks], "ok": not self.failed,
                "failed": [c.line for c in self.failed], "exit_code": self.exit_code}


def _torchvision_check(v: dict[str, Any]) -> Check:
    if v["torchvision_error"]:
        return Check("torchvision", FAIL, f"torchvision {v['torchvision'] or ''} does not load "
                     f"beside torch {v['torch']} ({v['torchvision_error']}): real datasets and "
                     "torchvision: models cannot run; install the torchvision built for this "
                     "torch")
    return Check("torchvision", PASS, f"torchvision {v['torchvision']} loads")


def _cuda_checks(doctor: Doctor, report: Report) -> list[CudaDevice]:
    """One check per CUDA device torch counts (or one saying there are none); the devices
    torch can use."""
    unusable = cuda_unusable()
    devices = doctor.devices()
    report.cuda = [d.as_dict() for d in devices]
    if unusable:
        report.checks.append(Check("cuda", FAIL, unusable))
    elif not devices:
        built = (f"a CUDA {torch.version.cuda} build" if torch.version.cuda
                 else "a CPU build")
        report.checks.append(Check("cuda", PASS, f"no CUDA device present (torch is {built}): "
                                   "the top-k mask runs on the torch path, which gives the "
                                   "same masks as the CUDA kernel"))
    usable = []
    for d in devices:
        if d.error:
            report.checks.append(Check(f"cuda:{d.index}", FAIL, f"{d.label}: torch cannot "
                                       f"use it: {d.error}", d.as_dict()))
        else:
            usable.append(d)
            report.checks.append(Check(
                f"cuda:{d.index}", PASS, f"{d.label}: compute capability "
                f"{d.capability[0]}.{d.capability[1]}, {d.memory_gib} GiB, "
                f"{d.multiprocessors} multiprocessors; a computation there checked",
                d.as_dict()))
    return usable


def run_doctor(doctor: Doctor | None = None, echo: Callable[[str], None] | None = None
               ) -> Report:
    """Every check, each printed (through `echo`) as it finishes."""
    doctor = doctor or Doctor()
    echo = echo or (lambda line: None)
    v = versions()
    report = Report(v, cpu_facts(), [])
    for line in header(report):
        echo(line)

    def add(check: Check) -> Check:
        report.checks.append(check)
        echo(format_check(check))
        return check

    add(_torchvision_check(v))
    before = len(report.checks)
    usable = _cuda_checks(doctor, report)
    for check in report.checks[before:]:
        echo(format_check(check))
    for d in usable:
        add(kernel_check(d.device, d.label, doctor.make_kernel, doctor.kernel_layers))
    cpu_search = None
    if doctor.search:
        cpu_search = add(search_check("cpu", CPU_BATCH, doctor.steps, doctor.limit_s))
        for d in usable:
            add(search_check(str(d.device), CUDA_BATCH, doctor.steps, doctor.limit_s))
    else:
        add(Check("search", SKIP, "search timing skipped (--no-search)"))
    add(bf16_note(report.cpu, cpu_search))
    add(compile_note(bool(usable)))
    return report


def format_check(check: Check) -> str:
    return f"  {check.status:4s}  {check.line}"


def header(report: Report) -> list[str]:
    v, cpu = report.versions, report.cpu
    cuda = (f" (CUDA {v['torch_cuda']}, cuDNN {v['cudnn']}"
            + (f", NCCL {v['nccl']}" if v["nccl"] else "") + ")") if v["torch_cuda"] else \
        " (CPU build)"
    extras = [f"{name} {ver}" for name, ver in v["extras"].items() if ver]
    missing = [name for name, ver in v["extras"].items() if not ver]
    lines = [f"slt {v['slt']}, python {v['python']}, torch {v['torch']}{cuda}, "
             f"torchvision {v['torchvision'] or 'missing'}",
             "  extras: " + (", ".join(extras) or "none")
             + (f"; not installed: {', '.join(missing)}" if missing else ""),
             f"  cpu: {cpu['model']} ({cpu['arch']}), {cpu['threads']} threads, torch "
             f"{cpu['torch_capability']} kernels; "
             + (" ".join(cpu["vector_extensions"]) or "no vector extensions read")]
    return lines


def verdict(report: Report) -> str:
    counts = {s: sum(c.status == s for c in report.checks) for s in (PASS, FAIL, SKIP, NOTE)}
    said = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if report.failed:
        first = report.failed[0].line
        more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
        return f"slt doctor: FAILED: {first}{more}"
    return f"ok: every check that applies passed ({said})"


def main(doctor: Doctor | None = None, json_path: str | None = None) -> int:
    """Print the report as it runs, write the JSON, return the exit status."""
    target = output_file(json_path) if json_path else None  # refused now, not after the run
    report = run_doctor(doctor, lambda line: print(line, flush=True))
    if target is not None:
        atomic_write_text(target, json.dumps(report.as_dict(), indent=2) + "\n")
        print(f"  wrote {json_path}")
    line = verdict(report)
    print(line, file=sys.stderr if report.failed else sys.stdout)
    return report.exit_code
