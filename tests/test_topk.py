"""The top-k mask op: exact k, ties to the lower index, errors on non-finite input."""

from __future__ import annotations

import pytest
import torch

from slt.topk import reference_sort_mask, segmented_topk_mask, topk_mask


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
