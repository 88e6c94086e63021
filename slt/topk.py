"""The top-k mask op: exactly k ones per segment, ties to the lower index.

Every scoring rule selects through this module, so a faster backend speeds up all of them;
nothing outside this module knows which backend ran. CUDA float32/float16/bfloat16 input
goes to our kernel (kernels/segmented_topk.cu, one launch per pass for all segments) once it
has built and passed its self-check on that device (slt.cuda_topk.KernelGate), and when the
layout fits its 32-bit counts; everything else takes the torch path below. The op is a
`torch.library` custom op, so it works under `torch.compile`.

The torch path avoids a full sort: `torch.kthvalue` finds the k-th largest value by
selection (O(n)), then one comparison pass and one cumulative sum over the entries
equal to the threshold resolve ties by index.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from slt.errors import NonFiniteScoreError

if TYPE_CHECKING:
    from slt.cuda_topk import KernelGate


def _check_finite(values: Tensor) -> None:
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
    _check_finite(flat)
    return _select(flat, k).view(values.shape)


def segment_offsets(sizes: Sequence[int]) -> list[int]:
    """Offsets of consecutive segments of the given sizes: [0, n0, n0 + n1, ...]."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return offsets


def _validate_segments(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> None:
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


def _torch_segmented(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> Tensor:
    _check_finite(values)
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


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_or_torch(values: Tensor, offsets: list[int], ks: list[int],
                     gate: KernelGate) -> Tensor:
    """The kernel's mask where `gate` vouches for it on this device and the layout fits its
    32-bit counts; the torch path's otherwise (the same mask, by the self-check)."""
    from slt import cuda_topk

    if cuda_topk.layout_fits(tuple(offsets)):
        result = gate.run(values, offsets, ks, defer=_DEFERRED.get())
        if result is not None:
            mask, flagged = result
            if not flagged:
                return mask
            _check_finite(values)  # raises with the index and value
            # every value is finite, so the flag was wrong: trust the kernel no more
            gate.disable("flagged finite values as non-finite")
    return _torch_segmented(values, offsets, ks)


_DEFERRED: ContextVar[bool] = ContextVar("slt_topk_deferred", default=False)


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Within, the CUDA kernel's non-finite flag is kept on the device instead of being read
    after every call (a read that makes the host wait for the GPU on every step); the
    search loop calls `check_deferred` before anything is written. The torch path checks
    at once, as always."""
    from slt.cuda_topk import GATE

    GATE.discard_pending()  # a flag left by an earlier run in this process is not ours
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def check_deferred(gate: KernelGate | None = None) -> None:
    """NonFiniteScoreError when a call under `deferred_checks` met a NaN or infinite score
    since the last check."""
    if gate is None:
        from slt.cuda_topk import GATE

        gate = GATE
    if gate.take_pending():
        raise NonFiniteScoreError("a score became NaN or infinite since the last check "
                                  "(flagged on the GPU by the top-k kernel)")


@torch.library.custom_op("slt::segmented_topk_mask", mutates_args=())
def _segmented_op(values: Tensor, offsets: list[int], ks: list[int]) -> Tensor:
    if values.is_cuda and values.dtype in KERNEL_DTYPES and values.numel():
        from slt import cuda_topk

        return _kernel_or_torch(values, offsets, ks, cuda_topk.GATE)
    return _torch_segmented(values, offsets, ks)


@_segmented_op.register_fake
def _segmented_fake(values: Tensor, offsets: list[int], ks: list[int]) -> Tensor:
    return values.new_empty(values.shape, dtype=torch.bool)


def segmented_topk_mask(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> Tensor:
    """Top-k mask of each segment `values[offsets[i]:offsets[i+1]]` with k = ks[i].

    `values` is one flat buffer (e.g. |scores| of every layer); `offsets` has one more
    entry than `ks` and ends at `values.numel()`. One segment spanning everything is
    global top-k.
    """
    _validate_segments(values, offsets, ks)
    return _segmented_op(values, [int(o) for o in offsets], [int(k) for k in ks])


def reference_sort_mask(values: Tensor, k: int) -> Tensor:
    """The edge-popup reference pattern (a full sort), kept as the oracle for tests and
    as the baseline in benchmarks. Stable sort gives the same tie rule."""
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask.view(values.shape)
