"""A numpy model of kernels/segmented_topk.cu, launch by launch, for tests on the CPU.

The kernel has never run here (no GPU), so its algorithm is checked through this model: the
same key mapping, the real host chunk table (slt.cuda_topk.segment_tables), the same init
modes, the three digit passes with the histogram and the select exactly as select_kernel
walks it (per-thread runs of bins from the top, exclusive scan, the AT_LEAST shortcut), the
tie count, the per-segment tie scan (THREADS chunks per tile) and the tiled write with
rank < remain. Counts are kept in int64 and asserted to fit the kernel's uint32.

The histogram, tie count and AT_LEAST write read values as the kernel's for_each_value does
(`value_layout`): each chunk cut at the 16-byte boundary (given where the buffer starts,
`base_misalign` elements past one) into a scalar head and tail, one value per lane of warp 0,
and whole packs of VEC values, thread t taking pack round + t; the model asserts that this
reads every value once. The histogram is modelled as the kernel issues it: blocks of `group`
consecutive chunks; in each warp step with MATCH_LANES or more lanes holding a bin, one shared
atomic per distinct bin adding the group's size, else one per value (warp_count); one flush
per (block, segment), one global atomic per non-empty bin. The model asserts that these
counts equal a plain per-value count, and reports the atomics of each pass next to what the
kernel before (one atomic per value, one flush per chunk) would have issued.
Vectorised over elements and segments: a launch of ~10^5 values takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slt.topk import kernel as cuda_topk

THREADS = 256
WARP = 32
BINS = 2048
VEC_BYTES = 16  # one pack: 4 fp32 or 8 fp16/bf16 values
MIN_HIST_BLOCKS = 2048  # histogram blocks of `group` chunks: see hist_group
MAX_GROUP = 16
MATCH_LANES = 8  # warp_count aggregates where at least this many lanes have a bin
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
    group: int  # chunks per histogram block
    shared_atomics: list[int]  # per pass: warp-aggregated shared-memory atomics
    matches: list[int]  # per pass: warp steps that ran __match_any_sync (MATCH_LANES+ lanes)
    atomic_passes: list[int]  # per pass: serialised shared-atomic passes, summed over steps
    per_value_atomic_passes: list[int]  # per pass: the same with one atomic per value (before)
    global_atomics: list[int]  # per pass: flushes' global atomics (non-empty bins per block)
    per_value_atomics: list[int]  # per pass: shared atomics of one per counted value (before)
    per_chunk_flush_atomics: list[int]  # per pass: global atomics of one flush per chunk (before)
    packed_writes: int  # AT_LEAST chunks whose mask bytes go out VEC at a time


def hist_group(num_chunks: int, min_blocks: int = MIN_HIST_BLOCKS) -> int:
    """Chunks per histogram block, as launch_all picks it."""
    return max(1, min(MAX_GROUP, num_chunks // min_blocks))


@dataclass
class Layout:
    """How for_each_value reads every chunk: one row per value read (lanes with nothing to
    read are left out), and per chunk the split."""

    index: np.ndarray  # the value's flat index
    chunk: np.ndarray  # its chunk
    step: np.ndarray  # its warp step: (chunk, round or the scalar step, warp, j), one id
    mid: np.ndarray  # per chunk: first index of the packs (16-byte aligned)
    nvec: np.ndarray  # per chunk: whole packs
    tail: np.ndarray  # per chunk: first index after the packs
    vec: int


def value_layout(chunks: np.ndarray, itemsize: int, base_misalign: int = 0) -> Layout:
    """The kernel's split_of and for_each_value over every chunk, for values of `itemsize`
    bytes whose buffer starts `base_misalign` elements past a 16-byte boundary. Asserts that
    every value of every chunk is read exactly once and that every pack is aligned."""
    vec = VEC_BYTES // itemsize
    assert 0 <= base_misalign < vec
    num_chunks = len(chunks)
    begin, end = chunks[:, 1], chunks[:, 2]
    head = np.minimum((VEC_BYTES - (base_misalign + begin) * itemsize % VEC_BYTES)
                      % VEC_BYTES // itemsize, end - begin)
    mid = begin + head
    nvec = (end - mid) // vec
    tail = mid + nvec * vec
    assert np.all(head < vec) and np.all(end - tail < vec)
    assert np.all((base_misalign + mid[nvec > 0]) * itemsize % VEC_BYTES == 0), "unaligned pack"
    rounds = -(-nvec // THREADS)
    steps_per_chunk = (int(rounds.max(initial=0)) + 1) * (THREADS // WARP) * vec
    # warp 0's scalar step: lane < head reads begin + lane, the others tail + (lane - head)
    lane = np.arange(WARP)
    i_s = np.where(lane < head[:, None], begin[:, None] + lane,
                   tail[:, None] + lane - head[:, None])
    ok_s = i_s < end[:, None]
    assert np.all(ok_s.sum(axis=1) <= 2 * (vec - 1))
    c_s = np.repeat(np.arange(num_chunks), WARP).reshape(num_chunks, WARP)
    step_s = c_s * steps_per_chunk  # round 0 of the step ids, warp 0, j 0
    # packs: rounds of THREADS packs, thread t takes pack round + t, its values j in order
    slots = rounds * THREADS
    c_b = np.repeat(np.arange(num_chunks), slots)
    p = np.arange(len(c_b)) - np.repeat(np.cumsum(slots) - slots, slots)
    j = np.arange(vec)
    i_b = (mid[c_b] + p * vec)[:, None] + j
    ok_b = np.broadcast_to((p < nvec[c_b])[:, None], i_b.shape)
    round_b = 1 + p // THREADS
    step_b = ((c_b * (steps_per_chunk // ((THREADS // WARP) * vec)) + round_b)
              * (THREADS // WARP) + (p % THREADS) // WARP)[:, None] * vec + j
    index = np.concatenate([i_s[ok_s], i_b[ok_b]])
    chunk = np.concatenate([c_s[ok_s], np.broadcast_to(c_b[:, None], i_b.shape)[ok_b]])
    layout = Layout(index, chunk, np.concatenate([step_s[ok_s], step_b[ok_b]]), mid, nvec,
                    tail, vec)
    total = int(end[-1]) if num_chunks else 0
    assert np.array_equal(np.sort(index), np.arange(total)), "a value read twice or never"
    return layout


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


def launch(values: torch.Tensor, offsets: list[int], ks: list[int], *, base_misalign: int = 0,
           min_hist_blocks: int = MIN_HIST_BLOCKS) -> Launch:
    """Run the modelled launch sequence on one flat buffer that starts `base_misalign`
    elements past a 16-byte boundary (a fresh tensor: 0), with the mask 16-byte aligned.
    `min_hist_blocks` stands in for the kernel's MIN_HIST_BLOCKS, so that small inputs can
    take the grouped histogram path too."""
    flat = to_float(values.reshape(-1))
    itemsize = values.element_size()
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
    group = hist_group(num_chunks, min_hist_blocks)
    stats: dict[str, list[int]] = {name: [] for name in (
        "shared_atomics", "matches", "atomic_passes", "global_atomics", "per_value_atomics",
        "per_value_atomic_passes", "per_chunk_flush_atomics")}
    if num_chunks == 0:  # launch_all stops after init
        return Launch(np.zeros(0, dtype=bool), False, mode, prefix, reads, group, **stats,
                      packed_writes=0)
    layout = value_layout(chunks, itemsize, base_misalign)
    row_seg = chunks[layout.chunk, 0]
    row_key = keys[layout.index]
    row_block = layout.chunk // group  # histogram block b takes chunks [b group, (b+1) group)
    # within a block, the chunks of one segment are consecutive (the chunk table is in
    # segment order), so (block, segment) is one run of counts between two flushes
    assert np.all(np.diff(chunks[:, 0]) >= 0)

    for shift, bits in PASSES:
        # histogram: one block per `group` chunks
        first = shift + bits == 32
        high = np.uint32(0) if first else np.uint32((0xFFFFFFFF << (shift + bits)) & 0xFFFFFFFF)
        reading = (mode == NORMAL) | first
        reads += reading & (sizes > 0)
        if first:  # every chunk is read in the first pass
            error = bool(non_finite(flat[layout.index]).any())
        has_bin = (mode[row_seg] == NORMAL) & ((row_key & high) == prefix[row_seg])
        digit = ((row_key[has_bin] >> np.uint32(shift)) & np.uint32((1 << bits) - 1)
                 ).astype(np.int64)
        # warp_count: where MATCH_LANES or more lanes of a warp step have a bin, one shared
        # atomic per distinct bin adding the group's size; fewer lanes add one each
        step = layout.step[has_bin]
        steps, step_of_row, lanes = np.unique(step, return_inverse=True, return_counts=True)
        matched = lanes[step_of_row] >= MATCH_LANES
        # a group: (step, bin) when matched, else the row alone
        group_id = np.where(matched, step * BINS + digit,
                            -1 - np.flatnonzero(has_bin))  # distinct negative ids per row
        groups, first_row, size = np.unique(group_id, return_index=True, return_counts=True)
        g_bin = digit[first_row]
        g_seg = row_seg[has_bin][first_row]
        g_block = row_block[has_bin][first_row]
        assert np.all(size[groups < 0] == 1)
        # serialised passes of each warp step's atomic instruction: the most lanes on one bin
        # (bank conflicts aside); 1 where matched, the lanes' addresses being distinct then
        pairs, pair_lanes = np.unique(step * BINS + digit, return_counts=True)
        worst = np.zeros(len(steps), dtype=np.int64)
        np.maximum.at(worst, np.searchsorted(steps, pairs // BINS), pair_lanes)
        # flush: one global atomic per non-empty bin of each (block, segment)
        runs, run_of_group = np.unique((g_block * num_segments + g_seg) * BINS + g_bin,
                                       return_inverse=True)
        local = np.bincount(run_of_group, weights=size).astype(np.int64)
        run_seg = runs // BINS % num_segments
        counts = np.zeros((num_segments, BINS), dtype=np.int64)
        np.add.at(counts, (run_seg, runs % BINS), local)
        # the same counts as one per value (the kernel before warp aggregation)
        per_value = np.bincount(row_seg[has_bin] * BINS + digit,
                                minlength=num_segments * BINS).reshape(num_segments, BINS)
        assert np.array_equal(counts, per_value), "aggregated counts differ"
        hist += counts
        assert hist.max(initial=0) <= UINT32_MAX and local.max(initial=0) <= UINT32_MAX
        stats["shared_atomics"].append(len(groups))
        stats["matches"].append(int((lanes >= MATCH_LANES).sum()))
        stats["atomic_passes"].append(int(np.where(lanes >= MATCH_LANES, 1, worst).sum()))
        stats["per_value_atomic_passes"].append(int(worst.sum()))
        stats["global_atomics"].append(len(runs))
        stats["per_value_atomics"].append(int(has_bin.sum()))
        stats["per_chunk_flush_atomics"].append(
            len(np.unique(layout.chunk[has_bin] * BINS + digit)))

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

    # tie count: one block per chunk, NORMAL segments only, read through for_each_value
    is_tie = (mode[elem_seg] == NORMAL) & (keys == prefix[elem_seg])  # per value, by index
    row_tie = (mode[row_seg] == NORMAL) & (row_key == prefix[row_seg])
    chunk_ties = np.bincount(layout.chunk, weights=row_tie, minlength=num_chunks).astype(np.int64)
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
    # AT_LEAST: the head and tail one value per thread, the packs VEC values per thread, the
    # mask bytes VEC at a time where mask + mid is aligned (the mask starts 16-byte aligned)
    row_at_least = mode[row_seg] == AT_LEAST
    mask[layout.index[row_at_least]] = row_key[row_at_least] >= prefix[row_seg[row_at_least]]
    at_least_chunks = mode[chunks[:, 0]] == AT_LEAST
    packed_writes = int((at_least_chunks & (layout.mid % layout.vec == 0)
                         & (layout.nvec > 0)).sum())
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
    return Launch(mask.astype(bool), error, mode, prefix, reads, group, **stats,
                  packed_writes=packed_writes)
