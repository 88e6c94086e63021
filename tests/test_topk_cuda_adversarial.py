"""The CUDA kernel against the torch path on adversarial inputs, small and large, in every
dtype it takes: all-equal, two values, sorted, reversed, denormals, signed zeros, thousands
of empty and one-element segments, k = 0 and k = n. The GPU proof runs the small ones again
under compute-sanitizer (`-k small`), where a large input would take too long."""

from __future__ import annotations

import pytest
import torch

from tests.test_topk_cuda import check

pytestmark = pytest.mark.cuda

SCALES = {"small": 50_000, "large": 1 << 22}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def values_of(kind: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    if kind == "random":
        return torch.randn(n, generator=gen)
    if kind == "all equal":
        return torch.full((n,), 0.75)
    if kind == "two values":
        return torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    if kind == "sorted":
        return torch.linspace(-3, 3, n)
    if kind == "reversed":
        return torch.linspace(3, -3, n)
    if kind == "denormals":  # fp32 denormals; they flush to zero in fp16/bf16, ties then
        return torch.randint(1, 1000, (n,), generator=gen).float() * 1e-42
    if kind == "signed zeros":
        return torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0)
    raise AssertionError(kind)


KINDS = ["random", "all equal", "two values", "sorted", "reversed", "denormals", "signed zeros"]


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_one_and_several_segments(kind: str, dtype: str, scale: str) -> None:
    n = SCALES[scale]
    values = values_of(kind, n).to(DTYPES[dtype])
    third = n // 3
    sizes = [third, 0, 1, n - 2 * third - 1, third]
    for ks in ([third // 2, 0, 1, 0, third], [0, 0, 0, sizes[3], 1],
               [third, 0, 0, sizes[3] // 7, third - 1]):
        check(values, sizes, ks)
    for k in (0, 1, n // 2, n - 1, n):  # global scope
        check(values, [n], [k])


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_thousands_of_empty_and_one_element_segments(dtype: str, scale: str) -> None:
    count = 3_000 if scale == "small" else 300_000
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 3, (count,), generator=gen).tolist()  # 0, 1 or 2 values each
    values = torch.randint(0, 3, (sum(sizes),), generator=gen).float().to(DTYPES[dtype])
    ks = [int(torch.randint(0, s + 1, (1,), generator=gen)) for s in sizes]
    check(values, sizes, ks)
    check(values, sizes, sizes)  # k = n everywhere
    check(values, sizes, [0] * count)
