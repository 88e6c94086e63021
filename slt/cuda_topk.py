"""Build (JIT, cached by torch) and call the CUDA top-k mask kernel in kernels/.

`extension()` is None where CUDA or a compiler is missing; `slt.topk` then uses its torch
path, and says so once in the log.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger("slt")

CHUNK = 4096  # elements per thread block; a chunk never crosses a segment


def kernel_dir() -> Path:
    """kernels/ of the source tree, or slt/kernels of the installed package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "segmented_topk.cu").is_file():
            return candidate
    return here / "kernels"


def kernel_sources() -> list[Path]:
    return [kernel_dir() / "segmented_topk.cu", kernel_dir() / "topk_binding.cpp"]


NVCC_FLAGS = [
    "-O3",
    "-gencode=arch=compute_90,code=sm_90",  # H100/H200
    "-gencode=arch=compute_90,code=compute_90",  # PTX for later GPUs
]


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernel module, built once per torch version and cached on disk."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="slt_topk", sources=[str(p) for p in kernel_sources()],
                    extra_cuda_cflags=NVCC_FLAGS, verbose=False)
    except Exception as exc:  # no nvcc, no headers, build error: fall back, say it once
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("slt: CUDA top-k kernel unavailable (%s); using the torch path", reason)
        return None


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


def segmented_topk_mask(values: Tensor, offsets: list[int], ks: list[int]) -> tuple[Tensor, Tensor]:
    """(mask, error flag) from the kernel; the caller checks the flag."""
    ext = extension()
    assert ext is not None
    tables = segment_tables(tuple(offsets), tuple(ks), values.device)
    return ext.segmented_topk_mask(values.contiguous(), *tables)
