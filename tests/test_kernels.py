"""The CUDA kernel's sources build (compile-only here), and the op works under torch.compile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from slt import cuda_topk
from slt.topk import reference_sort_mask, segmented_topk_mask


def cuda_home() -> Path | None:
    """A CUDA toolkit with nvcc and headers: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the
    one torch's JIT found."""
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").is_file() and (
                Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home)
    return None


def test_sources_are_found() -> None:
    for path in cuda_topk.kernel_sources():
        assert path.is_file(), path


def test_kernel_compiles_with_nvcc(tmp_path) -> None:
    home = cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    nvcc = str(home / "bin" / "nvcc")
    source = cuda_topk.kernel_dir() / "segmented_topk.cu"
    proc = subprocess.run([nvcc, "-std=c++17", *cuda_topk.NVCC_FLAGS, "-c", str(source),
                           "-o", str(tmp_path / "k.o")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 10_000


def test_binding_compiles_against_this_torch() -> None:
    home = cuda_home()
    gxx = shutil.which("g++")
    if home is None or gxx is None:
        pytest.skip("needs a CUDA toolkit (for cuda_runtime.h) and g++")
    torch_inc = Path(torch.__file__).parent / "include"
    cuda_inc = home / "include"
    proc = subprocess.run(
        [gxx, "-std=c++20", "-fsyntax-only", f"-I{torch_inc}",
         f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_inc}",
         f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=slt_topk",
         str(cuda_topk.kernel_dir() / "topk_binding.cpp")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_segment_tables() -> None:
    offsets, ks, chunks, seg_chunks = cuda_topk.segment_tables(
        (0, 5, 5, 5 + 2 * cuda_topk.CHUNK + 1), (2, 0, 7), torch.device("cpu"))
    c = cuda_topk.CHUNK
    assert chunks.view(-1, 3).tolist() == [[0, 0, 5], [2, 5, 5 + c], [2, 5 + c, 5 + 2 * c],
                                           [2, 5 + 2 * c, 6 + 2 * c]]
    assert seg_chunks.tolist() == [0, 1, 1, 4]  # the empty segment owns no chunk
    assert ks.tolist() == [2, 0, 7] and offsets.tolist()[-1] == 6 + 2 * c


def test_custom_op_under_torch_compile() -> None:
    values = torch.randint(0, 5, (600,), generator=torch.Generator().manual_seed(0)).float()

    def masks(v: torch.Tensor) -> torch.Tensor:
        return segmented_topk_mask(v.abs(), [0, 100, 600], [30, 250])

    compiled = torch.compile(masks, backend="aot_eager", fullgraph=True)
    out = compiled(values)
    assert torch.equal(out, masks(values))
    assert torch.equal(out[:100], reference_sort_mask(values[:100], 30))
    assert torch.equal(out[100:], reference_sort_mask(values[100:], 250))
