"""The top-k mask op: exact k, ties to the lower index, errors on non-finite input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slt import cuda_topk
from slt.topk import reference_sort_mask, segment_offsets, segmented_topk_mask, topk_mask
from tests import kernel_model


def _cases():
    g = torch.Generator().manual_seed(0)
    yield torch.rand(1000, generator=g)
    yield torch.randint(0, 4, (1000,), generator=g).float()  # heavy ties
    yield torch.zeros(257)  # all equal
    yield torch.tensor([0.0, -0.0, 0.0, 1.0])  # signed zeros are one value
    yield torch.rand(1, generator=g)


@pytest.mark.parametrize("case", list(range(5)))
def test_matches_sort_oracle_for_every_k(case: int) -> None:
    values = list(_cases())[case]
    n = values.numel()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        if k < 0:
            continue
        mask = topk_mask(values, k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, reference_sort_mask(values, k))


def test_tie_rule_keeps_lower_indices() -> None:
    values = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5])
    # 3, 3 are in; of the three 2s at indices 2, 4, 5 the first two win.
    assert topk_mask(values, 4).tolist() == [False, True, True, True, True, False, False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_an_error(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite score at flat index 2"):
        topk_mask(torch.tensor([1.0, 2.0, bad, 0.0]), 2)


def test_k_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside"):
        topk_mask(torch.ones(3), 4)


def test_segments_are_independent_and_exact() -> None:
    g = torch.Generator().manual_seed(1)
    sizes = [0, 1, 5, 300, 7]
    ks = [0, 1, 2, 150, 7]
    values = torch.randint(0, 3, (sum(sizes),), generator=g).float()
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    mask = segmented_topk_mask(values, offsets, ks)
    for i, k in enumerate(ks):
        seg = slice(offsets[i], offsets[i + 1])
        assert int(mask[seg].sum()) == k
        assert torch.equal(mask[seg], reference_sort_mask(values[seg], k))


def test_global_segment_ties_cross_layers_by_flat_index() -> None:
    values = torch.tensor([1.0, 1.0, 1.0, 1.0])
    mask = segmented_topk_mask(values, [0, 4], [3])
    assert mask.tolist() == [True, True, True, False]


def test_bad_offsets_rejected() -> None:
    with pytest.raises(ValueError, match="offsets"):
        segmented_topk_mask(torch.ones(4), [0, 3], [1])
    with pytest.raises(ValueError, match="outside"):
        segmented_topk_mask(torch.ones(4), [0, 2, 4], [3, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype: torch.dtype) -> None:
    values = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(2)).to(dtype)
    for k in (0, 17, 250, 500):
        assert torch.equal(topk_mask(values, k), reference_sort_mask(values, k))


# --- the CUDA kernel's algorithm, through its numpy model (tests/kernel_model.py) ----------

CHUNK = cuda_topk.CHUNK


def oracle(values: torch.Tensor, offsets: list[int], ks: list[int]) -> np.ndarray:
    """Stable-sort mask of every segment, in the values' own dtype."""
    parts = [reference_sort_mask(values[offsets[i]:offsets[i + 1]], k) for i, k in enumerate(ks)]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=bool)


def model_matches_oracle(values: torch.Tensor, sizes: list[int], ks: list[int]):
    offsets = segment_offsets(sizes)
    launch = kernel_model.launch(values, offsets, ks)
    assert not launch.error
    assert np.array_equal(launch.mask, oracle(values, offsets, ks))
    for i, k in enumerate(ks):
        assert int(launch.mask[offsets[i]:offsets[i + 1]].sum()) == k
    return launch


def _random_bits(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Floats of uniformly random bit patterns of `dtype` (every exponent, denormals, both
    signs), the non-finite ones replaced by 1.0."""
    width = torch.finfo(dtype).bits
    ints = {16: torch.int16, 32: torch.int32}[width]
    bits = torch.randint(-2 ** (width - 1), 2 ** (width - 1), (n,), generator=gen).to(ints)
    values = bits.view(dtype).clone()
    values[~torch.isfinite(values)] = 1.0
    return values


N_ADVERSARIAL = 3 * CHUNK + 517  # several chunks per segment: ties straddle chunk edges
TINY = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e-45, 1e-39, -1e-39, 1.2e-38])
ADVERSARIAL = {  # (dtype, generator) -> values of that dtype
    "all equal": lambda dt, g: torch.full((N_ADVERSARIAL,), 0.25, dtype=dt),
    "two values": lambda dt, g: torch.where(
        torch.rand(N_ADVERSARIAL, generator=g) < 0.3, 2.0, 1.0).to(dt),
    "sorted": lambda dt, g: torch.linspace(-3, 3, N_ADVERSARIAL).to(dt),
    "reversed": lambda dt, g: torch.linspace(3, -3, N_ADVERSARIAL).to(dt),
    "denormals and signed zeros": lambda dt, g: TINY[
        torch.randint(0, 8, (N_ADVERSARIAL,), generator=g)].to(dt),
    "last bits only": lambda dt, g: 1.0 + torch.randint(
        0, 4, (N_ADVERSARIAL,), generator=g).to(dt) * torch.finfo(dt).eps,
    "random bits": lambda dt, g: _random_bits(N_ADVERSARIAL, dt, g),
    "few distinct": lambda dt, g: torch.randint(-3, 4, (N_ADVERSARIAL,), generator=g).to(dt),
    "runs across chunks": lambda dt, g: torch.arange(7).repeat_interleave(
        N_ADVERSARIAL // 7 + 1)[:N_ADVERSARIAL].flip(0).to(dt),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(ADVERSARIAL))
def test_kernel_model_matches_the_sort_oracle(kind: str, dtype: torch.dtype) -> None:
    values = ADVERSARIAL[kind](dtype, torch.Generator().manual_seed(11))
    assert values.dtype == dtype and bool(torch.isfinite(values).all())
    n = values.numel()
    for k in (0, 1, CHUNK - 1, CHUNK + 1, n // 2, n - 1, n):
        model_matches_oracle(values, [n], [k])  # one global segment
    # uneven segments, each over several chunks or none, cuts anywhere
    sizes = [CHUNK + 3, 0, 1, 2 * CHUNK + 1, n - 3 * CHUNK - 5]
    for ks in ([1, 0, 1, CHUNK, 100], [CHUNK, 0, 0, 2 * CHUNK + 1, 0], [7, 0, 1, 5000, 211]):
        model_matches_oracle(values, sizes, ks)


def test_kernel_model_many_tiny_segments() -> None:
    g = torch.Generator().manual_seed(12)
    sizes = torch.randint(0, 3, (1500,), generator=g).tolist()
    values = torch.randint(0, 2, (sum(sizes),), generator=g).float()
    for rule in (lambda n: 0, lambda n: n, lambda n: n // 2, lambda n: (n + 1) // 2):
        model_matches_oracle(values, sizes, [rule(n) for n in sizes])


def test_kernel_model_ranks_ties_over_more_chunks_than_threads() -> None:
    """The tie scan walks a segment's chunks THREADS at a time: 260 chunks take two tiles."""
    n = 260 * CHUNK
    values = torch.zeros(n)
    values[::997] = 1.0  # a few values above the threshold, the rest one long run of ties
    above = int((values > 0).sum())
    for k in (above + 256 * CHUNK + 5, n - 1):
        launch = model_matches_oracle(values, [n], [k])
        assert launch.mode.tolist() == [kernel_model.NORMAL]


def test_key_of_orders_like_the_floats() -> None:
    values = torch.tensor([-float("inf"), -3.0, -1e-38, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 2.5,
                           3.4e38, float("inf")])
    keys = kernel_model.key_of(values.numpy()).astype(np.int64)
    assert keys[4] == keys[5] == 0x80000000  # -0 folded onto +0
    assert np.all(np.diff(np.delete(keys, 4)) > 0)
    assert kernel_model.non_finite(np.array([np.inf, -np.inf, np.nan, 3e38], dtype=np.float32)
                                   ).tolist() == [True, True, True, False]


def test_kernel_model_reads_as_the_docs_say() -> None:
    """4 reads with no tie at the cut (the >= shortcut), 5 when ties are ranked, 1 for k = 0
    and k = n (the first pass's finiteness check), none for an empty segment."""
    values = torch.cat([torch.randn(5000, generator=torch.Generator().manual_seed(13)),
                        torch.ones(5000), torch.ones(10), torch.ones(10)])
    launch = model_matches_oracle(values, [5000, 5000, 0, 10, 10], [2500, 2500, 0, 0, 10])
    assert launch.reads.tolist() == [4, 5, 0, 1, 1]
    assert launch.mode.tolist() == [kernel_model.AT_LEAST, kernel_model.NORMAL,
                                    kernel_model.NONE, kernel_model.NONE, kernel_model.ALL]


def test_kernel_model_flags_non_finite_in_every_segment() -> None:
    for position, ks in ((3, [0, 10]), (15, [0, 10]), (15, [5, 5])):
        values = torch.ones(20)
        values[position] = float("nan") if position == 3 else float("-inf")
        assert kernel_model.launch(values, [0, 10, 20], ks).error
    assert not kernel_model.launch(torch.ones(20), [0, 10, 20], [0, 10]).error
