"""Benchmarks. `slt bench topk`: the top-k mask op against the patterns it replaces.

Every variant gets the same input, the flat |scores| buffer the scorer hands to `slt.topk`
(the baselines make one call per segment on views of it), and the same k per segment.
Variants are timed in one process, interleaved repetition by repetition, so drift hits all
of them alike; rows are medians, and ratios are taken within one run because these machines
are noisy. GPU timings use CUDA events, CPU timings perf counters.

The memory floor is the time to read the buffer once and write the byte mask once at the
device-to-device copy bandwidth measured (interleaved, on a large buffer) in the same run.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slt.config.schema import ModelConfig
from slt.errors import ConfigError
from slt.layers import masked_layers
from slt.models import build_model
from slt.source import count_of
from slt.spec import DataSpec
from slt.topk.op import segmented_topk_mask
from slt.topk.torch_path import segment_offsets

LAYER_SETS: dict[str, tuple[str, DataSpec]] = {
    "lenet-300-100": ("mlp", DataSpec((1, 28, 28), 10)),
    "conv6": ("conv6", DataSpec((3, 32, 32), 10)),
    "resnet18": ("resnet18", DataSpec((3, 32, 32), 10)),
    "resnet50": ("resnet50", DataSpec((3, 32, 32), 10)),
}
TENSOR = re.compile(r"2\^(\d+)$")  # a single tensor of 2^N elements, e.g. "2^20"
SCOPES = ("layer", "global")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SORT = "sort (edge-popup)"
FLOOR = "memory floor"


def layer_sizes(name: str) -> list[int]:
    """Sizes of the prunable layers of a named layer set, or [2^N] for "2^N"."""
    match = TENSOR.match(name)
    if match:
        exponent = int(match.group(1))
        if not 1 <= exponent <= 31:
            raise ConfigError(f"tensor size {name} outside 2^1 .. 2^31")
        return [1 << exponent]
    if name not in LAYER_SETS:
        raise ConfigError(f"unknown layer set '{name}'; known: {', '.join(LAYER_SETS)} "
                          "or a single tensor 2^N")
    model, spec = LAYER_SETS[name]
    return [layer.numel for layer in masked_layers(build_model(ModelConfig(name=model), spec))]


@dataclass(frozen=True)
class Case:
    """One benchmark input: the flat buffer, its segments and the k of each."""

    values: Tensor
    offsets: list[int]
    ks: list[int]

    def segments(self) -> list[Tensor]:
        return [self.values[lo:hi] for lo, hi in zip(self.offsets, self.offsets[1:])]


def make_case(sizes: list[int], keep: float, scope: str, device: str, dtype: torch.dtype) -> Case:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(sum(sizes), generator=g).abs().to(device=device, dtype=dtype)
    if scope == "global":
        return Case(values, [0, values.numel()], [count_of(keep, values.numel())])
    return Case(values, segment_offsets(sizes), [count_of(keep, n) for n in sizes])


def sort_per_layer(case: Case) -> list[Tensor]:
    """edge-popup's GetSubnet: a full sort of every layer, bottom n - k set to 0, rest to 1."""
    out = []
    for s, k in zip(case.segments(), case.ks):
        mask = torch.empty_like(s)
        _, idx = s.sort()
        j = s.numel() - k
        mask[idx[:j]] = 0
        mask[idx[j:]] = 1
        out.append(mask)
    return out


def topk_per_layer(case: Case) -> list[Tensor]:
    """torch.topk per layer (which of several equal values it keeps is unspecified)."""
    out = []
    for s, k in zip(case.segments(), case.ks):
        mask = torch.zeros_like(s, dtype=torch.bool)
        mask[s.topk(k, sorted=False).indices] = True
        out.append(mask)
    return out


def kthvalue_per_layer(case: Case) -> list[Tensor]:
    """A threshold per layer from torch.kthvalue, then one compare (ties all kept)."""
    out = []
    for s, k in zip(case.segments(), case.ks):
        if k == 0:
            out.append(torch.zeros_like(s, dtype=torch.bool))
        else:
            out.append(s >= torch.kthvalue(s.float(), s.numel() - k + 1).values.to(s.dtype))
    return out


def ours(case: Case) -> Tensor:
    """slt.topk over all segments at once, exactly as the scorer calls it."""
    return segmented_topk_mask(case.values, case.offsets, case.ks)


VARIANTS: dict[str, Callable[[Case], object]] = {
    SORT: sort_per_layer,
    "torch.topk": topk_per_layer,
    "torch.kthvalue": kthvalue_per_layer,
    "slt.topk": ours,
}


class Timer:
    """Seconds one call takes: CUDA events on a GPU, perf counters on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def copy_buffers(device: str) -> tuple[Tensor, Tensor]:
    """A copy large enough to stream from memory, not cache: 1 GiB on a GPU, 256 MiB on CPU."""
    n = (1 << 28) if device.startswith("cuda") else (1 << 26)
    return torch.empty(n, device=device), torch.empty(n, device=device)


def bench_case(case: Case, repeats: int, timer: Timer,
               copy: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Median seconds per variant, plus the copy bandwidth (bytes/s) as 'bandwidth'."""
    src, dst = copy
    calls: dict[str, Callable[[], object]] = {label: (lambda f=fn: f(case))
                                              for label, fn in VARIANTS.items()}
    calls["copy"] = lambda: dst.copy_(src)
    for fn in calls.values():  # warm-up: kernel build, caches, allocator
        fn()
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, fn in calls.items():
            times[label].append(timer(fn))
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    medians["bandwidth"] = 2 * src.numel() * src.element_size() / medians.pop("copy")
    return medians


def bench_topk(sets: list[str], keeps: list[float], repeats: int, device: str = "cpu",
               scopes: tuple[str, ...] = SCOPES, dtype: str = "float32") -> list[dict]:
    timer = Timer(device)
    copy = copy_buffers(device)
    rows = []
    for name in sets:
        sizes = layer_sizes(name)
        for scope in scopes if len(sizes) > 1 else ("layer",):  # one tensor: scopes coincide
            for keep in keeps:
                case = make_case(sizes, keep, scope, device, DTYPES[dtype])
                medians = bench_case(case, repeats, timer, copy)
                bandwidth = medians.pop("bandwidth")
                n = case.values.numel()
                # bytes read once plus one byte of mask written per element
                medians[FLOOR] = n * (case.values.element_size() + 1) / bandwidth
                for label, seconds in medians.items():
                    rows.append({
                        "layers": name, "scope": scope, "n": n, "segments": len(case.ks),
                        "keep": keep, "variant": label, "median_ms": seconds * 1e3,
                        "speedup_vs_sort": medians[SORT] / seconds,
                        "x_floor": seconds / medians[FLOOR], "copy_GBps": bandwidth / 1e9,
                        "repeats": repeats, "device": device, "dtype": dtype})
                del case
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'layers':14s} {'scope':6s} {'weights':>10s} {'keep':>5s}  {'variant':26s} "
          f"{'median ms':>10s} {'x vs sort':>9s} {'x floor':>8s}")
    for r in rows:
        print(f"{r['layers']:14s} {r['scope']:6s} {r['n']:10d} {r['keep']:5.2f}  "
              f"{r['variant']:26s} {r['median_ms']:10.3f} {r['speedup_vs_sort']:9.2f} "
              f"{r['x_floor']:8.2f}")


def goal_lines(rows: list[dict]) -> list[str]:
    """Our time against each reference, per (layer set, scope, keep): the figures the
    issue's goals are stated in."""
    lines = []
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["layers"], r["scope"], r["keep"]), {})[r["variant"]] = r["median_ms"]
    for (name, scope, keep), ms in groups.items():
        o = ms["slt.topk"]
        lines.append(f"{name} {scope} keep {keep:g}: slt.topk {ms[SORT] / o:.1f}x faster than "
                     f"sort, {ms['torch.topk'] / o:.1f}x than topk, "
                     f"{ms['torch.kthvalue'] / o:.1f}x than kthvalue, "
                     f"{o / ms[FLOOR]:.1f}x the memory floor")
    return lines


def run_topk_bench(sets: list[str], keeps: list[float], repeats: int, out: str | None,
                   device: str = "cpu", scopes: tuple[str, ...] = SCOPES,
                   dtype: str = "float32") -> list[dict]:
    for name in sets:
        layer_sizes(name)  # fail on a bad name before any timing
    rows = bench_topk(sets, keeps, repeats, device, scopes, dtype)
    print_table(rows)
    for line in goal_lines(rows):
        print(line)
    # Which path `slt.topk` timed: on a GPU whose kernel failed its self-check (or did not
    # build) the rows are the torch path's, and must not pass for the kernel's.
    path = "torch"
    if device.startswith("cuda"):
        from slt.topk.kernel import GATE

        path = f"torch (kernel off: {GATE.disabled})" if GATE.disabled else "cuda kernel"
    print(f"slt.topk ran the {path} path")
    if out:
        info = {"torch": torch.__version__, "device": device,
                "device_name": torch.cuda.get_device_name() if device.startswith("cuda")
                else "cpu", "threads": torch.get_num_threads(), "slt_topk_path": path}
        Path(out).write_text(json.dumps({**info, "rows": rows}, indent=2))
        print(f"wrote {out}")
    return rows
