"""A numpy model of kernels/segmented_topk.cu, launch by launch, for tests on the CPU.

The kernel has never run here (no GPU), so its algorithm is checked through this model: the
same key mapping, the real host chunk table (slt.cuda_topk.segment_tables), the same init
modes, the three digit passes with the histogram and the select exactly as select_kernel
walks it (per-thread runs of bins from the top, exclusive scan, the AT_LEAST shortcut), the
tie count, the per-segment tie scan (THREADS chunks per tile) and the tiled write with
rank < remain. Counts are kept in int64 and asserted to fit the kernel's uint32.

Atomic adds commute, so the per-chunk shared histograms merged into the global one are
modelled as one global count. Vectorised over elements and segments: a launch of ~10^5
values takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slt import cuda_topk

THREADS = 256
BINS = 2048
PASSES = ((21, 11), (10, 11), (0, 10))  # (shift, bits), most significant digit first
NORMAL, NONE, ALL, AT_LEAST = 0, 1, 2, 3  # the kernel's Mode enum
UINT32_MAX = 2**32 - 1


@dataclass
class Launch:
    """What one modelled launch leaves behind."""

    mask: np.ndarray  # bool, one per value
    error: bool  # the non-finite flag
    mode: np.ndarray  # final mode per segment
    threshold: np.ndarray  # final prefix (the threshold key) per segment
    reads: np.ndarray  # how many times each segment's values were read (whole passes)


def to_float(values: torch.Tensor) -> np.ndarray:
    """float32 image of fp32/fp16/bf16 values, exact, like the kernel's to_float."""
    return values.detach().cpu().float().numpy()


def key_of(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 key of float32 values, -0 folded onto +0."""
    bits = values.astype(np.float32).view(np.uint32).copy()
    bits[(bits << np.uint32(1)) == 0] = 0
    negative = (bits & np.uint32(0x80000000)) != 0
    return np.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def non_finite(values: np.ndarray) -> np.ndarray:
    """The kernel's exponent test: all exponent bits set (inf or NaN)."""
    bits = values.astype(np.float32).view(np.uint32)
    return (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)


def chunk_layout(offsets: list[int], ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The host's chunk table (segment, begin, end) and per-segment first chunk, checked."""
    _, _, chunks_t, seg_chunks_t = cuda_topk.segment_tables(tuple(offsets), tuple(ks),
                                                            torch.device("cpu"))
    chunks = chunks_t.numpy().reshape(-1, 3)
    seg_chunks = seg_chunks_t.numpy()
    seg, begin, end = chunks.T
    off = np.asarray(offsets, dtype=np.int64)
    assert np.all((end - begin >= 1) & (end - begin <= cuda_topk.CHUNK))
    assert np.all((off[seg] <= begin) & (end <= off[seg + 1])), "a chunk crosses a segment"
    assert np.array_equal(np.concatenate([[0], end[:-1]]) if len(end) else end, begin)
    # seg_chunks lists each segment's chunks, in order
    assert np.array_equal(seg, np.repeat(np.arange(len(ks)), np.diff(seg_chunks)))
    return chunks, seg_chunks


def _group_exclusive_cumsum(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Exclusive prefix sum of x restarting wherever `group` (sorted) changes."""
    total = np.cumsum(x) - x
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1] if len(group) else group
    first = np.repeat(total[starts], np.diff(np.r_[starts, len(group)]))
    return total - first


def launch(values: torch.Tensor, offsets: list[int], ks: list[int]) -> Launch:
    """Run the modelled launch sequence on one flat buffer."""
    flat = to_float(values.reshape(-1))
    num_segments = len(ks)
    off = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(off)
    k = np.asarray(ks, dtype=np.int64)
    assert np.all(sizes <= UINT32_MAX), "a segment past the kernel's uint32 counts"
    chunks, seg_chunks = chunk_layout(list(offsets), list(ks))
    num_chunks = len(chunks)
    chunk_len = chunks[:, 2] - chunks[:, 1]
    elem_chunk = np.repeat(np.arange(num_chunks), chunk_len)  # chunks tile 0..n in order
    elem_seg = chunks[elem_chunk, 0]
    keys = key_of(flat)
    reads = np.zeros(num_segments, dtype=np.int64)

    # init: one block per segment
    prefix = np.zeros(num_segments, dtype=np.uint32)
    remain = k.copy()
    mode = np.where(k <= 0, NONE, np.where(k >= sizes, ALL, NORMAL))
    hist = np.zeros((num_segments, BINS), dtype=np.int64)
    error = False
    if num_chunks == 0:  # launch_all stops after init
        return Launch(np.zeros(0, dtype=bool), False, mode, prefix, reads)

    for shift, bits in PASSES:
        # histogram: one block per chunk
        first = shift + bits == 32
        high = np.uint32(0) if first else np.uint32((0xFFFFFFFF << (shift + bits)) & 0xFFFFFFFF)
        reading = (mode == NORMAL) | first
        reads += reading & (sizes > 0)
        if first:
            error = bool(non_finite(flat).any())  # every chunk is read in the first pass
        normal = mode[elem_seg] == NORMAL
        match = normal & ((keys & high) == prefix[elem_seg])
        digit = (keys[match] >> np.uint32(shift)) & np.uint32((1 << bits) - 1)
        hist += np.bincount(elem_seg[match] * BINS + digit.astype(np.int64),
                            minlength=num_segments * BINS).reshape(num_segments, BINS)
        assert hist.max(initial=0) <= UINT32_MAX

        # select: one block per segment, THREADS threads, `per` bins each from the top
        nbins = 1 << bits
        per = nbins // THREADS
        runs = hist[:, :nbins][:, ::-1].reshape(num_segments, THREADS, per)
        mine = runs.sum(axis=2)
        before = np.cumsum(mine, axis=1) - mine
        holder = ((mode == NORMAL)[:, None] & (before < remain[:, None])
                  & (remain[:, None] <= before + mine))
        assert np.array_equal(holder.sum(axis=1), (mode == NORMAL).astype(np.int64)), (
            "not exactly one thread holds the k-th largest")
        segs = np.flatnonzero(mode == NORMAL)
        if len(segs):
            t = holder[segs].argmax(axis=1)
            run = runs[segs, t]  # bins top, top-1, ... of the holding thread
            above = before[segs, t][:, None] + np.cumsum(run, axis=1) - run
            stop = above + run >= remain[segs][:, None]  # the walk's break condition
            assert stop.any(axis=1).all(), "the walk left its run"
            j = stop.argmax(axis=1)
            b = (nbins - 1 - t * per) - j
            prefix[segs] |= (b.astype(np.uint32) << np.uint32(shift))
            remain[segs] -= above[np.arange(len(segs)), j]
            if shift == 0:
                mode[segs[hist[segs, b] == remain[segs]]] = AT_LEAST
        hist[:] = 0

    # tie count: one block per chunk, NORMAL segments only
    tie_seg = mode[elem_seg] == NORMAL
    is_tie = tie_seg & (keys == prefix[elem_seg])
    chunk_ties = np.bincount(elem_chunk, weights=is_tie, minlength=num_chunks).astype(np.int64)
    reads += (mode == NORMAL) & (sizes > 0)

    # tie scan: one block per NORMAL segment, THREADS chunks per tile, a running carry
    for s in np.flatnonzero(mode == NORMAL):
        lo, hi = seg_chunks[s], seg_chunks[s + 1]
        running = 0
        for tile in range(lo, hi, THREADS):
            here = chunk_ties[tile:min(tile + THREADS, hi)].copy()
            chunk_ties[tile:tile + len(here)] = running + np.cumsum(here) - here
            running += int(here.sum())
        assert running <= UINT32_MAX

    # write: one block per chunk
    mask = np.zeros(len(flat), dtype=np.int8) - 1  # -1: never written
    m = mode[elem_seg]
    at_least = m == AT_LEAST
    mask[at_least] = keys[at_least] >= prefix[elem_seg[at_least]]
    mask[m == NONE] = 0
    mask[m == ALL] = 1
    normal = m == NORMAL
    # rank of a tie = ties in earlier chunks of the segment (tie scan) + ties earlier in its
    # chunk, the latter as the kernel counts them: earlier tiles, then earlier in the tile
    pos = np.arange(len(flat)) - chunks[elem_chunk, 1]
    tile_id = elem_chunk * (cuda_topk.CHUNK // THREADS) + pos // THREADS
    in_tile = _group_exclusive_cumsum(is_tie.astype(np.int64), tile_id)
    tile_totals = np.bincount(tile_id, weights=is_tie).astype(np.int64)
    tiles = np.unique(tile_id)
    tile_before = _group_exclusive_cumsum(tile_totals[tiles], tiles // (cuda_topk.CHUNK // THREADS))
    earlier_tiles = np.zeros(tile_totals.shape, dtype=np.int64)
    earlier_tiles[tiles] = tile_before
    rank = chunk_ties[elem_chunk] + earlier_tiles[tile_id] + in_tile
    mask[normal] = (keys[normal] > prefix[elem_seg[normal]]) | (
        is_tie[normal] & (rank[normal] < remain[elem_seg[normal]]))
    reads += ((mode == NORMAL) | (mode == AT_LEAST)) & (sizes > 0)
    assert (mask >= 0).all(), "an element the write never reached"
    return Launch(mask.astype(bool), error, mode, prefix, reads)
