"""The top-k mask op: exact k, ties to the lower index, errors on non-finite input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slt.topk import kernel as cuda_topk
from slt.topk.op import segmented_topk_mask
from slt.topk.torch_path import reference_sort_mask, segment_offsets, topk_mask
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


# --- how the kernel reads: 16-byte packs, warp-aggregated counts, grouped flushes ----------

VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["all equal", "few distinct", "random bits",
                                  "runs across chunks", "denormals and signed zeros"])
def test_kernel_model_any_alignment_and_grouped_histogram(kind: str, dtype: torch.dtype) -> None:
    """Whatever the buffer's alignment (a view into a larger tensor may start anywhere), and
    with histogram blocks of several chunks that cross segments, the masks are the oracle's."""
    values = ADVERSARIAL[kind](dtype, torch.Generator().manual_seed(14))
    n = values.numel()
    sizes = [CHUNK + 3, 0, 1, 2 * CHUNK + 1, n - 3 * CHUNK - 5, 0]
    offsets = segment_offsets(sizes)
    for misalign in sorted({0, 1, VEC[dtype] - 1}):
        for min_blocks in (kernel_model.MIN_HIST_BLOCKS, 2, 1):
            for ks in ([CHUNK, 0, 1, 5000, 211, 0], [1, 0, 0, CHUNK + 7, 0, 0], [n // 2]):
                layout = (offsets, ks) if len(ks) == len(sizes) else ([0, n], ks)
                launch = kernel_model.launch(values, *layout, base_misalign=misalign,
                                             min_hist_blocks=min_blocks)
                assert np.array_equal(launch.mask, oracle(values, *layout))
                # 7 chunks (4 for the global segment): blocks of 2 to 7 chunks below
                assert (launch.group > 1) == (min_blocks < kernel_model.MIN_HIST_BLOCKS)


def test_value_layout_splits_at_16_byte_boundaries() -> None:
    """Head up to the first 16-byte boundary, whole packs, a tail: every value read once."""
    c = CHUNK
    chunks = np.array([[0, 0, 5], [1, 5, 5 + c], [1, 5 + c, 6 + c], [2, 6 + c, 8 + c]])
    fp32 = kernel_model.value_layout(chunks, 4)
    # the last two chunks end before their first boundary: all head (mid = tail = end)
    assert fp32.mid.tolist() == [0, 8, 6 + c, 8 + c]
    assert fp32.nvec.tolist() == [1, (c - 3) // 4, 0, 0]
    assert fp32.tail.tolist() == [4, 8 + 4 * ((c - 3) // 4), 6 + c, 8 + c]
    shifted = kernel_model.value_layout(chunks, 4, base_misalign=3)  # buffer at 12 mod 16 bytes
    assert shifted.mid.tolist()[:2] == [1, 5]
    halves = kernel_model.value_layout(chunks, 2, base_misalign=7)
    assert halves.mid.tolist()[:2] == [1, 9] and halves.vec == 8
    assert len(halves.index) == 8 + c  # value_layout asserts each is read once


def test_kernel_model_atomics_on_equal_values() -> None:
    """All-equal values: every value falls in one bin in every pass. One shared atomic per
    warp step instead of one per value (32 x fewer), and one global atomic per block flush,
    per chunk with one chunk per block, per 4 chunks when a block takes 4."""
    n = 4 * CHUNK
    values = torch.full((n,), 0.5)
    for min_blocks, flushes in ((kernel_model.MIN_HIST_BLOCKS, 4), (1, 1)):
        launch = model_matches_oracle_with(values, [n], [n // 2], min_hist_blocks=min_blocks)
        assert launch.mode.tolist() == [kernel_model.NORMAL]
        assert launch.per_value_atomics == [n] * 3
        assert launch.shared_atomics == [n // 32] * 3 == launch.matches
        assert launch.atomic_passes == [n // 32] * 3
        assert launch.per_value_atomic_passes == [n] * 3
        assert launch.global_atomics == [flushes] * 3
        assert launch.per_chunk_flush_atomics == [4] * 3


def test_kernel_model_atomics_on_random_values() -> None:
    """|randn|: the first digit clusters (sign, exponent, 2 mantissa bits) so warps share bins;
    the second is spread, and grouping 16 chunks per block merges their flushes."""
    n = 16 * CHUNK
    values = torch.randn(n, generator=torch.Generator().manual_seed(15)).abs()
    launch = model_matches_oracle_with(values, [n], [n // 2], min_hist_blocks=1)
    assert launch.group == 16 and launch.mode.tolist() == [kernel_model.AT_LEAST]
    assert launch.per_value_atomics[0] == n
    # pass 1: every warp step matches; its atomic is one pass, not up to ~5 serialised ones
    assert launch.matches[0] == n // 32 == launch.atomic_passes[0]
    assert launch.per_value_atomic_passes[0] > 4 * launch.atomic_passes[0]
    assert launch.shared_atomics[0] < n // 1.8
    # pass 2: few lanes match the prefix, so almost no MATCH is spent on distinct bins
    assert launch.matches[1] < launch.per_value_atomics[1] // 100
    assert all(s <= v for s, v in zip(launch.shared_atomics, launch.per_value_atomics))
    assert all(a <= b for a, b in zip(launch.atomic_passes, launch.per_value_atomic_passes))
    assert launch.global_atomics[1] < launch.per_chunk_flush_atomics[1] / 2
    assert all(g <= c for g, c in zip(launch.global_atomics, launch.per_chunk_flush_atomics))
    assert launch.packed_writes == 16  # aligned buffer: every chunk stores mask words
    shifted = kernel_model.launch(values, [0, n], [n // 2], base_misalign=1)
    assert np.array_equal(shifted.mask, launch.mask) and shifted.packed_writes == 0


def model_matches_oracle_with(values: torch.Tensor, sizes: list[int], ks: list[int],
                              **options) -> kernel_model.Launch:
    offsets = segment_offsets(sizes)
    launch = kernel_model.launch(values, offsets, ks, **options)
    assert not launch.error
    assert np.array_equal(launch.mask, oracle(values, offsets, ks))
    return launch
