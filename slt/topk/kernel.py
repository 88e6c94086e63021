"""Build (JIT, cached by torch) the CUDA top-k mask kernel in kernels/, and vouch for it.

The kernel was written without a GPU to run it on, and users' GPUs differ, so it is never
trusted blindly: `KernelGate` hands it out for a device only after it agreed with the torch
path there on a small fixed battery (`self_check_battery`). A failed build, a launch that
raises or one disagreement warns once on the `slt` logger and turns the kernel off for the
rest of the process; `slt.topk` then uses its torch path, which gives the same masks.

The kernel counts in 32 bits; `layout_limit` names the layouts it cannot take, and
`slt.topk` sends those to the torch path as well.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger("slt")

CHUNK = 4096  # elements per thread block; a chunk never crosses a segment
INT32_MAX = 2**31 - 1  # segments and chunks are int (CUDA grid size) in the kernel
SEGMENT_LIMIT = 2**32  # per-segment counts are uint32 in the kernel

# (values, offsets, ks) -> (mask, error flag): the kernel's contract, as the binding returns it.
KernelFn = Callable[[Tensor, list[int], list[int]], tuple[Tensor, Tensor]]
Reference = Callable[[Tensor, Sequence[int], Sequence[int]], Tensor]


def kernel_dir() -> Path:
    """kernels/ of the source tree, or slt/kernels of the installed package."""
    here = Path(__file__).resolve().parents[1]  # slt/, the package root (this file is a wing's)
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "segmented_topk.cu").is_file():
            return candidate
    return here / "kernels"


def kernel_sources() -> list[Path]:
    return [kernel_dir() / "segmented_topk.cu", kernel_dir() / "topk_binding.cpp"]


# --- building for the GPU in use -------------------------------------------------------------

def nvcc_flags(capability: tuple[int, int] | None) -> list[str]:
    """nvcc flags for one compute capability: SASS for it plus its PTX (which later GPUs can
    JIT-compile). None leaves the targets to torch, which reads TORCH_CUDA_ARCH_LIST."""
    if capability is None:
        return ["-O3"]
    arch = f"{capability[0]}{capability[1]}"
    return ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            f"-gencode=arch=compute_{arch},code=compute_{arch}"]


def build_options(capability: tuple[int, int], arch_list: str | None) -> tuple[str, list[str]]:
    """(JIT extension name, nvcc flags). The name carries the targets so that builds for two
    GPUs, or for a user's TORCH_CUDA_ARCH_LIST, never share (and clobber) one cache entry."""
    if arch_list and arch_list.strip():
        tag = re.sub(r"[^0-9A-Za-z]+", "_", arch_list).strip("_")
        return f"slt_topk_arch_{tag}", nvcc_flags(None)
    return f"slt_topk_sm{capability[0]}{capability[1]}", nvcc_flags(capability)


@functools.cache
def _load(name: str, flags: tuple[str, ...]) -> ModuleType:
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(p) for p in kernel_sources()],
                extra_cuda_cflags=list(flags), verbose=False)


def extension(device: torch.device) -> ModuleType:
    """The compiled kernel module for this device's GPU, built once and cached on disk by torch.
    Raises where it cannot be built (no nvcc, no headers, an arch this nvcc does not know)."""
    capability = torch.cuda.get_device_capability(device)
    name, flags = build_options(capability, os.environ.get("TORCH_CUDA_ARCH_LIST"))
    return _load(name, tuple(flags))


@functools.lru_cache(maxsize=64)
def segment_tables(
    offsets: tuple[int, ...], ks: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Device copies of offsets and ks, the chunk table (segment, begin, end) and each
    segment's first chunk. Built once per layout: the training loop reuses them."""
    chunks: list[int] = []
    seg_chunks = [0]
    for s in range(len(ks)):
        for begin in range(offsets[s], offsets[s + 1], CHUNK):
            chunks += [s, begin, min(begin + CHUNK, offsets[s + 1])]
        seg_chunks.append(len(chunks) // 3)

    def put(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device)

    return put(list(offsets)), put(list(ks)), put(chunks), put(seg_chunks)


def build_kernel(device: torch.device) -> KernelFn:
    """The real kernel for a CUDA device, as a `KernelFn`. Raises where it cannot be built."""
    ext = extension(device)

    def launch(values: Tensor, offsets: list[int], ks: list[int]) -> tuple[Tensor, Tensor]:
        tables = segment_tables(tuple(offsets), tuple(ks), values.device)
        return ext.segmented_topk_mask(values.contiguous(), *tables)

    return launch


# --- the 32-bit limits -----------------------------------------------------------------------

def layout_limit(offsets: Sequence[int]) -> str | None:
    """Why the kernel cannot take this segment layout (its counts are 32-bit), or None.

    Checked on the offsets alone, before any table is built, so a layout the kernel would
    get wrong goes to the torch path instead."""
    num_segments = len(offsets) - 1
    if num_segments > INT32_MAX:
        return f"{num_segments} segments exceed the kernel's int32 segment count"
    num_chunks = 0
    for s in range(num_segments):
        size = offsets[s + 1] - offsets[s]
        if size >= SEGMENT_LIMIT:
            return f"segment {s} holds {size} values, the kernel counts in uint32 (< 2^32)"
        num_chunks += -(-size // CHUNK)
    if num_chunks > INT32_MAX:
        return f"{num_chunks} chunks exceed the kernel's int32 chunk count"
    return None


@functools.lru_cache(maxsize=64)
def layout_fits(offsets: tuple[int, ...]) -> bool:
    """`layout_limit(offsets) is None`, remembered per layout: the training loop asks on
    every forward pass with the same few layouts."""
    return layout_limit(offsets) is None


# --- the self-check --------------------------------------------------------------------------

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.cache
def self_check_battery() -> tuple[tuple[str, Tensor, tuple[int, ...], tuple[int, ...]], ...]:
    """(name, fp32 values, offsets, ks) of each self-check case; cast to every kernel dtype
    when run. Small (about 50 k values) but through every branch of the kernel: several
    chunks per segment, ties ranked across chunk boundaries, the >= shortcut, k = 0 and
    k = n, empty segments and the non-finite flag. Its own generator, so checking never
    moves the global RNG (a search must find the same ticket whichever path runs)."""
    gen = torch.Generator().manual_seed(9)
    c = CHUNK

    def case(name: str, values: Tensor, sizes: list[int], ks: list[int]):
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        assert offsets[-1] == values.numel()
        return name, values.float(), tuple(offsets), tuple(ks)

    runs = torch.arange(4).repeat_interleave(3000).flip(0).float()  # 3 x3000, 2 x3000, ...
    few = torch.randint(0, 3, (c + 100,), generator=gen).float()
    zeros = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 2e-45, 1e-38, 0.5])
    signed = zeros[torch.randint(0, 7, (600,), generator=gen)]
    plus_minus = torch.where(torch.rand(300, generator=gen) < 0.5, 0.0, -0.0)
    bad = torch.rand(100, generator=gen)
    bad[10], bad[60] = float("nan"), float("inf")
    return (
        case("several segments", torch.randn(2 * c + 315, generator=gen),
             [5, 300, 2 * c + 9, 1], [2, 150, c, 1]),
        # the threshold's run of equal values crosses the chunk edge at 4096 in the first
        # segment; the second ranks ties scattered through two chunks
        case("ties straddling the cut", torch.cat([runs, few]), [runs.numel(), few.numel()],
             [5000, few.numel() // 2]),
        case("all-equal values", torch.cat([torch.zeros(2 * c + 1), torch.ones(10)]),
             [2 * c + 1, 10], [c + 3, 4]),
        # the cut falls among the zeros: -0 and +0 are one value, ranked by index
        case("signed zeros and denormals", torch.cat([signed, plus_minus]), [600, 300],
             [420, 150]),
        case("k = 0 and k = n", torch.rand(2 * c + 202, generator=gen),
             [100, 100, c + 1, c + 1], [0, 100, 0, c + 1]),
        case("empty and one-element segments", torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0]),
             [0, 1, 0, 1, 0, 3, 0], [0, 1, 0, 0, 0, 2, 0]),
        case("global single segment", torch.randint(0, 50, (2 * c + 500,), generator=gen),
             [2 * c + 500], [(2 * c + 500) // 3]),
        case("non-finite values", bad, [50, 50], [0, 50]),
    )


def check_kernel(kernel: KernelFn, device: torch.device,
                 reference: Reference | None = None) -> str | None:
    """Run the battery through `kernel` on `device` and compare with the torch path (on the
    CPU, in the same dtype). None when it agrees on every case; else what went wrong, naming
    the first failing case ("bf16, ties straddling the cut: ..."). Never raises."""
    if reference is None:
        from slt.topk.torch_path import torch_segmented as reference
    from slt.errors import NonFiniteScoreError

    failures: list[str] = []
    checks = 0
    for dtype, dtype_name in DTYPE_NAMES.items():
        for name, values32, offsets, ks in self_check_battery():
            checks += 1
            label = f"{dtype_name}, {name}"
            values = values32.to(dtype)
            try:
                expected: Tensor | None = reference(values, offsets, ks)
            except NonFiniteScoreError:
                expected = None  # the kernel must raise its flag instead
            try:
                mask, error = kernel(values.to(device), list(offsets), list(ks))
                flagged = bool(error.reshape(-1)[0].item())
                mask = mask.cpu()
            except Exception as exc:  # a launch that raises ends the check: nothing to compare
                return f"{label}: raised {type(exc).__name__}: {_last_line(exc)}"
            if expected is None:
                if not flagged:
                    failures.append(f"{label}: non-finite values not flagged")
            elif flagged:
                failures.append(f"{label}: finite values flagged as non-finite")
            elif mask.dtype != torch.bool or mask.shape != expected.shape:
                failures.append(f"{label}: mask of {mask.dtype} {tuple(mask.shape)}")
            elif not torch.equal(mask, expected):
                wrong = int((mask != expected).sum())
                failures.append(f"{label}: {wrong} of {expected.numel()} mask entries differ")
    if not failures:
        return None
    more = f" (and {len(failures) - 1} more of {checks} checks)" if len(failures) > 1 else ""
    return failures[0] + more


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class KernelGate:
    """Hands out the kernel for a device only once it has passed the self-check there.

    The first request per device builds the kernel (`make_kernel`) and runs `check_kernel`;
    the verdict is kept. Any failure (build, first launch, a disagreement, or a later launch
    that raises) warns once and disables the kernel for the whole process: a wrong ticket
    must never come silently from an unverified kernel, and the torch path is always right.
    """

    def __init__(self, make_kernel: Callable[[torch.device], KernelFn],
                 reference: Reference | None = None) -> None:
        self.make_kernel = make_kernel
        self.reference = reference
        self.disabled: str | None = None  # why the kernel is off, once it is
        self.verified: dict[torch.device, KernelFn] = {}
        self._pending: Tensor | None = None  # deferred non-finite flags, on the device
        self._lock = threading.RLock()

    def kernel(self, device: torch.device) -> KernelFn | None:
        """The verified kernel for `device`, or None (and the torch path) when it is off."""
        with self._lock:
            if self.disabled is not None:
                return None
            if device in self.verified:
                return self.verified[device]
            try:
                kernel = self.make_kernel(device)
            except Exception as exc:  # no nvcc, no headers, an unknown arch: fall back
                self.disable(f"unavailable ({_last_line(exc)})")
                return None
            failure = check_kernel(kernel, device, self.reference)
            if failure is not None:
                self.disable(f"failed its self-check on {device} ({failure})")
                return None
            self.verified[device] = kernel
            return kernel

    def run(self, values: Tensor, offsets: list[int], ks: list[int], defer: bool = False
            ) -> tuple[Tensor, bool | None] | None:
        """(mask, non-finite flag) from the verified kernel, or None: use the torch path.
        With `defer`, the flag is not read (reading it waits for the GPU): it is kept on the
        device until `take_pending`, and the flag returned is None."""
        kernel = self.kernel(values.device)
        if kernel is None:
            return None
        try:
            mask, error = kernel(values, offsets, ks)
            if defer:
                with self._lock:
                    self._pending = error if self._pending is None else \
                        torch.maximum(self._pending, error)
                return mask, None
            return mask, bool(error.item())
        except torch.OutOfMemoryError:
            raise  # not the kernel's fault; the torch path would not fit either
        except RuntimeError as exc:
            self.disable(f"failed on launch ({_last_line(exc)})")
            return None

    def discard_pending(self) -> None:
        with self._lock:
            self._pending = None

    def take_pending(self) -> bool:
        """Whether a deferred launch flagged a non-finite value since the last call: one
        read of the device, made when the caller chooses (before a checkpoint, say)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending is not None and bool(pending.max().item())

    def disable(self, reason: str) -> None:
        """Turn the kernel off for this process; the first reason is logged, once."""
        with self._lock:
            if self.disabled is None:
                self.disabled = reason
                log.warning("slt: CUDA top-k kernel %s; using the torch path", reason)


GATE = KernelGate(build_kernel)
