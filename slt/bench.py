"""Benchmarks. `slt bench topk`: the top-k mask op against the patterns it replaces.

Variants are timed in one process, interleaved, and reported as medians and as ratios to
the edge-popup reference pattern, because these machines are noisy.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from slt.config import ModelConfig
from slt.layers import masked_layers
from slt.models import build_model
from slt.source import count_of
from slt.spec import DataSpec
from slt.topk import segment_offsets, segmented_topk_mask

LAYER_SETS: dict[str, tuple[str, DataSpec]] = {
    "lenet-300-100": ("mlp", DataSpec((1, 28, 28), 10)),
    "conv6": ("conv6", DataSpec((3, 32, 32), 10)),
    "resnet18": ("resnet18", DataSpec((3, 32, 32), 10)),
    "resnet50": ("resnet50", DataSpec((3, 32, 32), 10)),
}


def layer_sizes(name: str) -> list[int]:
    model, spec = LAYER_SETS[name]
    return [layer.numel for layer in masked_layers(build_model(ModelConfig(name=model), spec))]


def sort_per_layer(scores: list[Tensor], keep: float) -> list[Tensor]:
    """edge-popup's GetSubnet: a full sort of every layer, bottom (1-k) set to 0, rest to 1."""
    out = []
    for s in scores:
        mask = torch.empty_like(s)
        _, idx = s.abs().sort()
        j = int((1 - keep) * s.numel())
        mask[idx[:j]] = 0
        mask[idx[j:]] = 1
        out.append(mask)
    return out


def topk_per_layer(scores: list[Tensor], keep: float) -> list[Tensor]:
    out = []
    for s in scores:
        mask = torch.zeros_like(s)
        mask[s.abs().topk(count_of(keep, s.numel()), sorted=False).indices] = 1
        out.append(mask)
    return out


def ours(scores: list[Tensor], keep: float) -> list[Tensor]:
    """slt.topk over all layers as one segmented buffer, as the scorer calls it."""
    sizes = [s.numel() for s in scores]
    offsets = segment_offsets(sizes)
    flat = torch.cat([s.abs() for s in scores])
    mask = segmented_topk_mask(flat, offsets, [count_of(keep, n) for n in sizes])
    return list(mask.float().split(sizes))


VARIANTS: dict[str, Callable[[list[Tensor], float], list[Tensor]]] = {
    "sort per layer (edge-popup)": sort_per_layer,
    "torch.topk per layer": topk_per_layer,
    "slt.topk": ours,
}


def bench_topk(
    sets: list[str], keeps: list[float], repeats: int, device: str = "cpu"
) -> list[dict]:
    rows = []
    for name in sets:
        g = torch.Generator().manual_seed(0)
        scores = [torch.randn(n, generator=g).to(device) for n in layer_sizes(name)]
        for keep in keeps:
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for fn in VARIANTS.values():  # warm-up
                fn(scores, keep)
            for _ in range(repeats):
                for label, fn in VARIANTS.items():  # interleaved: drift hits all variants
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn(scores, keep)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[label].append(time.perf_counter() - t0)
            base = statistics.median(times["sort per layer (edge-popup)"])
            for label, ts in times.items():
                med = statistics.median(ts)
                rows.append({"layers": name, "n": sum(s.numel() for s in scores), "keep": keep,
                             "variant": label, "median_ms": med * 1e3,
                             "speedup_vs_sort": base / med, "repeats": repeats,
                             "device": device})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'layers':15s} {'weights':>10s} {'keep':>5s}  {'variant':28s} {'median ms':>10s} "
          f"{'x vs sort':>9s}")
    for r in rows:
        print(f"{r['layers']:15s} {r['n']:10d} {r['keep']:5.2f}  {r['variant']:28s} "
              f"{r['median_ms']:10.2f} {r['speedup_vs_sort']:9.2f}")


def run_topk_bench(sets: list[str], keeps: list[float], repeats: int, out: str | None) -> None:
    rows = bench_topk(sets, keeps, repeats)
    print_table(rows)
    if out:
        Path(out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
        print(f"wrote {out}")
