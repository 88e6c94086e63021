"""The top-k mask op: exactly k ones per segment, ties to the lower index.

Every scoring rule selects through this module, so a faster backend speeds up all of them;
nothing outside this module knows which backend ran. CUDA float32/float16/bfloat16 input
goes to our kernel (kernels/segmented_topk.cu, one launch per pass for all segments) once it
has built and passed its self-check on that device (slt.topk.kernel.KernelGate), and when the
layout fits its 32-bit counts; everything else takes the torch path (`slt.topk.torch_path`).
The op is a `torch.library` custom op, so it works under `torch.compile`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from slt.errors import NonFiniteScoreError
from slt.topk.torch_path import check_finite, torch_segmented, validate_segments

if TYPE_CHECKING:
    from slt.topk.kernel import KernelGate


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_or_torch(values: Tensor, offsets: list[int], ks: list[int],
                     gate: KernelGate) -> Tensor:
    """The kernel's mask where `gate` vouches for it on this device and the layout fits its
    32-bit counts; the torch path's otherwise (the same mask, by the self-check)."""
    from slt.topk import kernel

    if kernel.layout_fits(tuple(offsets)):
        result = gate.run(values, offsets, ks, defer=_DEFERRED.get())
        if result is not None:
            mask, flagged = result
            if not flagged:
                return mask
            check_finite(values)  # raises with the index and value
            # every value is finite, so the flag was wrong: trust the kernel no more
            gate.disable("flagged finite values as non-finite")
    return torch_segmented(values, offsets, ks)


_DEFERRED: ContextVar[bool] = ContextVar("slt_topk_deferred", default=False)


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Within, the CUDA kernel's non-finite flag is kept on the device instead of being read
    after every call (a read that makes the host wait for the GPU on every step); the
    search loop calls `check_deferred` before anything is written. The torch path checks
    at once, as always."""
    from slt.topk.kernel import GATE

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
        from slt.topk.kernel import GATE

        gate = GATE
    if gate.take_pending():
        raise NonFiniteScoreError("a score became NaN or infinite since the last check "
                                  "(flagged on the GPU by the top-k kernel)")


# The schema is written out: torch before 2.7 cannot infer one from `list[int]` annotations.
@torch.library.custom_op("slt::segmented_topk_mask", mutates_args=(),
                         schema="(Tensor values, int[] offsets, int[] ks) -> Tensor")
def _segmented_op(values: Tensor, offsets: list[int], ks: list[int]) -> Tensor:
    if values.is_cuda and values.dtype in KERNEL_DTYPES and values.numel():
        from slt.topk import kernel

        return _kernel_or_torch(values, offsets, ks, kernel.GATE)
    return torch_segmented(values, offsets, ks)


@_segmented_op.register_fake
def _segmented_fake(values: Tensor, offsets: list[int], ks: list[int]) -> Tensor:
    return values.new_empty(values.shape, dtype=torch.bool)


def segmented_topk_mask(values: Tensor, offsets: Sequence[int], ks: Sequence[int]) -> Tensor:
    """Top-k mask of each segment `values[offsets[i]:offsets[i+1]]` with k = ks[i].

    `values` is one flat buffer (e.g. |scores| of every layer); `offsets` has one more
    entry than `ks` and ends at `values.numel()`. One segment spanning everything is
    global top-k.
    """
    validate_segments(values, offsets, ks)
    return _segmented_op(values, [int(o) for o in offsets], [int(k) for k in ks])
