"""The exact top-k mask in plain torch: per tensor, and per segment of one flat tensor.

This is the reference every other path is checked against. It avoids a full sort:
`torch.kthvalue` finds the k-th largest value by selection (O(n)), then one comparison pass
and one cumulative sum over the entries equal to the threshold resolve ties by index."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from slt.errors import NonFiniteScoreError


def check_finite(values: Tensor) -> None:
    """NonFiniteScoreError naming the first NaN or infinity: a mask of such scores means nothing."""
    # min and max are NaN/inf exactly when some entry is, and cost far less than isfinite().all().
    if values.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(values))).all()):
        bad = int((~torch.isfinite(values)).nonzero()[0, 0])
        value = values.reshape(-1)[bad].item()
        raise NonFiniteScoreError(f"non-finite score at flat index {bad}: {value}")


def _select(values: Tensor, k: int) -> Tensor:
    """Mask of one 1-D finite segment: the k largest, lower index first among equals."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    # -0.0 and +0.0 compare equal, so both are one value for the tie rule.
    threshold = torch.kthvalue(values, n - k + 1).values
    keep = values >= threshold
    # count_nonzero, not sum: summing a bool tensor on the CPU is ~20x slower
    if int(torch.count_nonzero(keep)) == k:  # no surplus tie at the threshold: the usual case
        return keep
    above = values > threshold
    need = k - int(torch.count_nonzero(above))
    at = keep & ~above
    return above | (at & (torch.cumsum(at, 0, dtype=torch.int32) <= need))


def topk_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask (same shape as `values`) of its k largest entries, ties to lower index."""
    flat = values.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k={k} outside [0, {flat.numel()}]")
    check_finite(flat)
    return _select(flat, k).view(values.shape)


def segment_offsets(sizes: Sequence[int]) -> list[int]:
    """Offsets of consecutive segments of the given sizes: [0, n0, n0 + n1, ...]."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return offsets


def validate_segments(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> None:
    """ValueError unless `offsets` cut the flat `values` into len(ks) segments, k in 0..size."""
    if values.dim() != 1:
        raise ValueError("segmented_topk_mask expects a flat 1-D buffer")
    if len(offsets) != len(ks) + 1 or offsets[0] != 0 or offsets[-1] != values.numel():
        raise ValueError("offsets must start at 0, end at values.numel(), one more than ks")
    for i, k in enumerate(ks):
        size = offsets[i + 1] - offsets[i]
        if size < 0:
            raise ValueError(f"segment {i} has negative size")
        if not 0 <= k <= size:
            raise ValueError(f"segment {i}: k={k} outside [0, {size}]")


# Below this many values in all, threads cost more than they save.
THREADED_MIN = 1 << 18


def torch_segmented(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> Tensor:
    """The segmented mask on the torch path: the reference the CUDA kernel is checked against."""
    check_finite(values)
    out = torch.empty(values.numel(), dtype=torch.bool, device=values.device)

    def select(i: int) -> None:
        lo, hi = offsets[i], offsets[i + 1]
        out[lo:hi] = _select(values[lo:hi], ks[i])

    threads = torch.get_num_threads()
    if values.device.type != "cpu" or len(ks) < 2 or threads < 2 \
            or values.numel() < THREADED_MIN:
        for i in range(len(ks)):
            select(i)
        return out
    # kthvalue on one 1-D tensor runs on one core: select several segments at once (torch
    # releases the GIL), largest first. The same operations per segment: the same mask.
    order = sorted(range(len(ks)), key=lambda i: offsets[i] - offsets[i + 1])
    pool = _pool(threads)
    for done in [pool.submit(select, i) for i in order]:
        done.result()
    return out


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, made once: the selection runs on every forward pass."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slt-topk")


def reference_sort_mask(values: Tensor, k: int) -> Tensor:
    """The edge-popup reference pattern (a full sort), kept as the oracle for tests and
    as the baseline in benchmarks. Stable sort gives the same tie rule."""
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask.view(values.shape)
