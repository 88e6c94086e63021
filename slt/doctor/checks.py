"""The checks `slt doctor` runs: each gives one `Check` with a verdict and a one-line reason.

`fail` is reserved for what makes slt wrong or unusable on this machine (a kernel that builds
and then disagrees with the torch path, a GPU torch cannot use, a search step that raises);
everything slt merely does more slowly than it could is a `note` (a kernel that cannot be
built: no nvcc on the node), so a job script can gate on the exit status without tripping
over a slow machine.
"""

from __future__ import annotations

import contextlib
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slt.errors import first_line
from slt.topk.kernel import KernelFn, build_kernel, check_kernel

PASS, FAIL, SKIP, NOTE = "pass", "fail", "skip", "note"
KERNEL_LAYERS = "resnet50"  # the layer set the kernel is timed on (slt bench topk's)
KERNEL_KEEP = 0.5
SEARCH_MODEL = "conv4"
SEARCH_INPUT = (3, 32, 32)
SEARCH_PRECISIONS = ("fp32", "bf16")


@dataclass
class Check:
    """One line of the report: what was checked, its verdict, why, and the figures."""

    name: str
    status: str
    line: str
    data: dict[str, Any] = field(default_factory=dict)


def _medians(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device
             ) -> dict[str, float]:
    """Median seconds per call: `slt bench search`'s interleaving, one warm-up each."""
    from slt.bench.search import interleaved
    from slt.bench.topk import Timer

    times = interleaved(calls, repeats, 1, 1, Timer(str(device)))
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_kernel(kernel: KernelFn, device: torch.device, sizes: list[int],
                repeats: int) -> list[dict[str, Any]]:
    """The kernel against torch.topk and a full sort per layer (edge-popup's way), on the
    same |scores| buffer, one segment per layer and one for all."""
    from slt.bench.topk import make_case, sort_per_layer, topk_per_layer

    rows = []
    for scope in ("layer", "global"):
        case = make_case(sizes, KERNEL_KEEP, scope, str(device), torch.float32)
        ms = {k: v * 1e3 for k, v in _medians({
            "kernel": lambda c=case: kernel(c.values, c.offsets, c.ks),
            "torch.topk": lambda c=case: topk_per_layer(c),
            "sort": lambda c=case: sort_per_layer(c)}, repeats, device).items()}
        rows.append({"scope": scope, "n": case.values.numel(), "segments": len(case.ks),
                     "keep": KERNEL_KEEP, "kernel_ms": ms["kernel"],
                     "topk_ms": ms["torch.topk"], "sort_ms": ms["sort"],
                     "x_topk": ms["torch.topk"] / ms["kernel"],
                     "x_sort": ms["sort"] / ms["kernel"], "repeats": repeats})
        del case
    return rows


def kernel_check(device: torch.device, label: str,
                 make_kernel: Callable[[torch.device], KernelFn] = build_kernel,
                 layers: str = KERNEL_LAYERS, repeats: int = 10) -> Check:
    """Build the kernel for `device` (timed), run its self-check against the torch path
    (the verdict `KernelGate` would reach), then time it on `layers`. A kernel that does not
    build is a note (slt is right on the torch path, only slower); one that builds and then
    disagrees or raises is a failure."""
    from slt.bench.topk import layer_sizes

    name = f"kernel {device}"
    start = time.perf_counter()
    try:
        with on_device(device):
            kernel = make_kernel(device)
    except Exception as exc:
        why = error_line(exc)
        return Check(name, NOTE, f"{label}: the CUDA top-k kernel does not build "
                     f"({type(exc).__name__}: {why}); searches run on the torch path, "
                     "slower (docs/kernel.md: what the build needs)", {"built": False,
                                                                       "error": why})
    build_s = time.perf_counter() - start
    failure = check_kernel(kernel, device)
    data: dict[str, Any] = {"built": True, "build_s": round(build_s, 2),
                            "self_check": failure or "passed", "layers": layers}
    if failure is not None:
        return Check(name, FAIL, f"{label}: the CUDA top-k kernel failed its self-check "
                     f"({failure}); slt turns it off and uses the torch path", data)
    try:
        with on_device(device):
            rows = time_kernel(kernel, device, layer_sizes(layers), repeats)
    except Exception as exc:  # past the battery's sizes: a launch that raises is a failure
        return Check(name, FAIL, f"{label}: the CUDA top-k kernel passed its self-check but "
                     f"raised on {layers} ({type(exc).__name__}: {first_line(exc)})", data)
    data["timings"] = rows
    parts = [f"{r['scope']} {r['kernel_ms']:.2f} ms ({r['x_topk']:.1f}x torch.topk, "
             f"{r['x_sort']:.1f}x sort)" for r in rows]
    return Check(name, PASS, f"{label}: kernel built in {build_s:.1f} s, self-check passed; "
                 f"{layers} ({rows[0]['n']:,} scores, keep {KERNEL_KEEP}): "
                 + "; ".join(parts), data)


def on_device(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Make `device` the current CUDA device (CUDA events and default streams are the
    current device's); nothing elsewhere."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def error_line(exc: BaseException) -> str:
    """The first line of a build error that names an error (torch's own first line is only
    "Error building extension '...'"), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if re.search(r"error|fatal", line, re.I) and not line.startswith("Error building"):
            return line
    return lines[0] if lines else type(exc).__name__


def time_search(device: str, precision: str, batch: int, steps: int,
                limit_s: float) -> dict[str, Any]:
    """Seconds per search step of Conv-4 on random data in `precision`: `steps` steps after
    one warm-up, fewer when `limit_s` runs out (an emulated bf16 step can take seconds)."""
    from slt.bench.search import parse_mode, search_stepper
    from slt.bench.topk import Timer

    timer = Timer(device)
    with warnings.catch_warnings():  # the doctor states slow modes itself
        warnings.simplefilter("ignore")
        mode = parse_mode(precision)
        with on_device(device), search_stepper(SEARCH_MODEL, SEARCH_INPUT, mode, batch, 0.5,
                                               1.0, device, []) as (step, _, _, _, _):
            start = time.perf_counter()
            timer(step)  # warm-up; it counts against the limit
            times: list[float] = []
            while len(times) < steps and (not times or time.perf_counter() - start < limit_s):
                times.append(timer(step))
    return {"precision": precision, "batch": batch, "steps": len(times),
            "median_ms": statistics.median(times) * 1e3,
            "step_ms": [t * 1e3 for t in times]}


def search_check(device: str, batch: int, steps: int, limit_s: float) -> Check:
    """A short Conv-4 search in fp32 and bf16 on `device`: it must run, and the two step
    times say which precision this device serves faster."""
    rows: list[dict[str, Any]] = []
    for precision in SEARCH_PRECISIONS:
        try:
            rows.append(time_search(device, precision, batch, steps, limit_s))
        except Exception as exc:
            return Check(f"search {device}", FAIL, f"{device}: a Conv-4 search step in "
                         f"{precision} raised {type(exc).__name__}: {first_line(exc)}",
                         {"timings": rows})
    fp32, bf16 = rows[0]["median_ms"], rows[1]["median_ms"]
    ratio = bf16 / fp32 if fp32 > 0 else math.nan
    counts = sorted({r["steps"] for r in rows})
    counted = f"{counts[0]} steps each" if len(counts) == 1 else \
        " and ".join(f"{r['steps']} {r['precision']}" for r in rows) + " steps"
    line = (f"{device}: Conv-4 search, batch {batch}, {counted}: fp32 {fp32:.1f} "
            f"ms/step, bf16 {bf16:.1f} ms/step (bf16 takes {ratio:.2f}x fp32)")
    return Check(f"search {device}", PASS, line,
                 {"model": SEARCH_MODEL, "timings": rows, "bf16_over_fp32": ratio})


def bf16_note(cpu: dict[str, Any], search: Check | None) -> Check:
    """Whether bf16 serves this CPU: the measured step ratio decides where there is one
    (oneDNN can use bf16 instructions that torch's own kernel level does not name), the
    CPU's flags where there is none."""
    ratio = search.data.get("bf16_over_fp32") if search else None
    flags = ", ".join(cpu["bf16_flags"]) or "no avx512_bf16 or amx_bf16"
    native = cpu["bf16_native"]
    said = {True: f"native by its flags ({flags}, torch {cpu['torch_capability']} kernels)",
            False: f"emulated by its flags ({flags}; torch {cpu['torch_capability']} kernels)",
            None: "unknown by its flags (not an x86 CPU with readable flags)"}[native]
    data = {"bf16_native": native, "bf16_over_fp32": ratio}
    if ratio is None or math.isnan(ratio):
        return Check("cpu bf16", PASS if native else NOTE, f"bf16 on this CPU: {said}"
                     + ("" if native else "; keep run.precision = 'fp32' here"), data)
    if ratio <= 1.0:
        return Check("cpu bf16", PASS, f"bf16 on this CPU: a search step takes {ratio:.2f}x "
                     f"fp32, so run.precision = 'bf16' is faster here; {said}", data)
    return Check("cpu bf16", NOTE, f"bf16 on this CPU: a search step takes {ratio:.1f}x fp32: "
                 f"keep run.precision = 'fp32' here; {said}", data)


def compile_note(has_cuda: bool) -> Check:
    """Whether `run.compile = true` can work here (a C++ compiler; triton on CUDA)."""
    from slt.engine.hardware import cxx_compiler, triton_available

    cxx = cxx_compiler()
    parts = [f"CPU: {cxx.command} builds inductor's kernels" if cxx.ok else
             f"CPU: no ({cxx.reason})"]
    if has_cuda:
        parts.append("CUDA: triton present" if triton_available() else "CUDA: no triton")
    ok = cxx.ok and (not has_cuda or triton_available())
    return Check("compile", PASS if ok else NOTE, "run.compile = true: " + "; ".join(parts),
                 {"cxx": cxx.command, "cxx_ok": cxx.ok, "triton": triton_available()})
