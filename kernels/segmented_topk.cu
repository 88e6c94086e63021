// Segmented exact top-k mask: a radix select over the order-preserving integer image of the
// values, every segment in one launch per pass, no host round-trip between passes.
//
// For each segment s (values[offsets[s] .. offsets[s+1]) with k[s]), the mask has exactly
// k[s] ones: every value above the k-th largest, and among the values equal to it the ones
// with the lowest indices. -0.0 and +0.0 are one value. A non-finite value sets *error.
//
// Launch sequence (10 launches whatever the number of segments):
//   init -> 3 x (histogram, select) over 11/11/10-bit digits -> tie count -> tie scan -> write.
// The values of a segment are read 4 times (3 histograms, write) when no run of equal values
// straddles its cut, the usual case; 5 times (plus the tie count) when one does; once (the
// first histogram pass, for the non-finite check) when k = 0 or k = n. The mask is written once.
// Work is split into chunks of CHUNK (4096, slt/cuda_topk.py) consecutive elements that never
// cross a segment; the host builds the chunk table once per segment layout. A histogram block
// takes `group` consecutive chunks (1 to MAX_GROUP, so that there are at least
// MIN_HIST_BLOCKS blocks) and flushes its shared counts to the global histogram once per
// segment it meets, not once per chunk. Values are read 16 bytes at a time (4 fp32 or 8
// fp16/bf16) wherever the address allows, with a scalar head and tail, and the shared
// histogram takes one atomic per distinct bin per warp (__match_any_sync).
// These three changes are desk-checked and modelled (tests/kernel_model.py), not yet run.
// Limits: counts within a segment are uint32 (a segment holds fewer than 2^32 values), and the
// numbers of segments and chunks are int (grid sizes); slt/cuda_topk.py's layout_limit sends
// larger layouts to the torch path, and the binding refuses segment or chunk counts past int.
// Never yet run on a GPU: slt self-checks it against the torch path on first use per device.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace slt_topk {

constexpr int THREADS = 256;
constexpr int WARP = 32;
constexpr int BINS = 2048;  // the widest digit: 11 bits
constexpr int VEC_BYTES = 16;  // one vector load: 4 fp32 or 8 fp16/bf16 values
// Histogram blocks: each takes `group` consecutive chunks, group = num_chunks / MIN_HIST_BLOCKS
// clamped to [1, MAX_GROUP], so that small inputs keep one block per chunk (all the
// parallelism there is) and large ones keep at least MIN_HIST_BLOCKS blocks (about two full
// waves of 8 blocks per SM on a 132-SM H100).
constexpr int MIN_HIST_BLOCKS = 2048;
constexpr int MAX_GROUP = 16;

// Histogram blocks resident per SM that the register budget must allow: a full SM (2048
// threads) on sm_80 and sm_90, 1536 threads on sm_86 and sm_89 (and later consumer parts).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 900)
#define SLT_TOPK_HIST_BLOCKS_PER_SM 8
#else
#define SLT_TOPK_HIST_BLOCKS_PER_SM 6
#endif

// Warp-aggregated shared-memory histogram atomics: 1 (the default) or 0 (one atomic per
// value, as before), for an A/B timing on a GPU (-DSLT_TOPK_WARP_AGGREGATE=0).
#ifndef SLT_TOPK_WARP_AGGREGATE
#define SLT_TOPK_WARP_AGGREGATE 1
#endif

// AT_LEAST: the last pass found that every value equal to the threshold is kept, so the
// mask is key >= threshold, with no ties to rank and no tie-count read of the values.
enum Mode : uint32_t { NORMAL = 0, NONE = 1, ALL = 2, AT_LEAST = 3 };

struct SegmentState {
  uint32_t prefix;  // high digits of the threshold key found so far
  uint32_t remain;  // how many of the values matching `prefix` still belong to the top k
  uint32_t mode;
  uint32_t pad;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Order-preserving map float -> uint32 (larger float, larger key), with -0.0 folded onto +0.0.
__device__ __forceinline__ uint32_t key_of(float v) {
  uint32_t b = __float_as_uint(v);
  if ((b << 1) == 0u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// This block's chunk: (segment, begin, end) from the host-built chunk table.
struct Chunk {
  int64_t seg, begin, end;
};

__device__ __forceinline__ Chunk chunk_of(const int64_t* chunks) {
  return Chunk{chunks[3 * blockIdx.x], chunks[3 * blockIdx.x + 1], chunks[3 * blockIdx.x + 2]};
}

__device__ __forceinline__ bool non_finite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// VEC values of type T read by one 16-byte load.
template <typename T>
struct alignas(VEC_BYTES) Pack {
  static constexpr int VEC = VEC_BYTES / static_cast<int>(sizeof(T));
  T v[VEC];
};

// The pack at p (16-byte aligned), through the read-only data path.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T> pack;
  memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

// [begin, end) cut so that values + mid is 16-byte aligned: a head [begin, mid) and a tail
// [tail, end) of fewer than VEC values each, read one value per thread, and nvec whole packs
// [mid, tail) between them. A chunk shorter than its head is all head (mid = tail = end).
struct Split {
  int64_t mid, nvec, tail;
};

template <typename T>
__device__ __forceinline__ Split split_of(const T* values, int64_t begin, int64_t end) {
  constexpr int VEC = Pack<T>::VEC;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(values + begin);  // a multiple of sizeof(T)
  int64_t head = static_cast<int64_t>((VEC_BYTES - addr % VEC_BYTES) % VEC_BYTES / sizeof(T));
  if (head > end - begin) head = end - begin;
  const int64_t mid = begin + head;
  const int64_t nvec = (end - mid) / VEC;
  return Split{mid, nvec, mid + nvec * VEC};
}

// Calls f(v, ok) once for every value of [begin, end), in no particular order, with every
// thread of the block calling f together (ok = false on lanes with nothing to read), so f may
// use warp-wide intrinsics. Warp 0 takes the head and tail (at most 2 (VEC - 1) <= 14 values,
// one per lane); then in rounds of THREADS packs, thread t takes pack round + t, its VEC
// values in order.
template <typename T, typename F>
__device__ __forceinline__ void for_each_value(const T* __restrict__ values, int64_t begin,
                                               int64_t end, F&& f) {
  constexpr int VEC = Pack<T>::VEC;
  const Split sp = split_of(values, begin, end);
  if (threadIdx.x < WARP) {  // warp-uniform
    const int64_t head = sp.mid - begin;
    const int64_t lane = threadIdx.x;
    const int64_t i = lane < head ? begin + lane : sp.tail + (lane - head);
    const bool ok = i < end;  // lane < head implies i < mid <= end
    f(ok ? to_float(__ldg(values + i)) : 0.0f, ok);
  }
  const T* body = values + sp.mid;
  const int nvec = static_cast<int>(sp.nvec);  // a chunk is at most CHUNK values
  for (int round = 0; round < nvec; round += THREADS) {  // block-uniform
    const int p = round + static_cast<int>(threadIdx.x);
    const bool ok = p < nvec;
    Pack<T> pack{};
    if (ok) pack = load_pack(body + p * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f(to_float(pack.v[j]), ok);
  }
}

// local[bin] += 1 for every lane with `has_bin`. Where MATCH_LANES or more lanes of the warp
// have a bin, one shared atomic per distinct bin (the lowest lane of each group of equal bins
// adds the group's size), so equal values no longer queue up on one address: 32 equal values
// cost one atomic, not 32 serialised ones. Fewer lanes add one each, as before: their worst
// conflict (MATCH_LANES - 1 lanes on one bin) costs about what a MATCH would, and in the
// later passes, where few values match the prefix, the MATCH would mostly find distinct bins.
// `bin` must be ~0u on lanes without one. Every lane of the warp must call it together.
constexpr int MATCH_LANES = 8;

__device__ __forceinline__ void warp_count(uint32_t* local, bool has_bin, uint32_t bin) {
#if SLT_TOPK_WARP_AGGREGATE
  const unsigned lanes = __ballot_sync(0xffffffffu, has_bin);
  if (__popc(lanes) < MATCH_LANES) {  // warp-uniform
    if (has_bin) atomicAdd(&local[bin], 1u);
    return;
  }
  const unsigned peers = __match_any_sync(0xffffffffu, bin);  // lanes without one: ~0u
  const int lane = static_cast<int>(threadIdx.x) & (WARP - 1);
  if (has_bin && __ffs(peers) - 1 == lane) atomicAdd(&local[bin], __popc(peers));
#else
  if (has_bin) atomicAdd(&local[bin], 1u);
#endif
}

// One block per segment: zero its histogram and settle its mode (k = 0 and k = n need no
// select). The error flag is not touched here: the binding allocates it zeroed.
__global__ void init_kernel(const int64_t* offsets, const int64_t* ks, int num_segments,
                            SegmentState* state, uint32_t* hist) {
  const int s = blockIdx.x;
  if (s >= num_segments) return;
  uint32_t* h = hist + static_cast<size_t>(s) * BINS;
  for (int b = threadIdx.x; b < BINS; b += blockDim.x) h[b] = 0u;
  if (threadIdx.x == 0) {
    int64_t n = offsets[s + 1] - offsets[s];
    int64_t k = ks[s];
    SegmentState st;
    st.prefix = 0u;
    st.remain = static_cast<uint32_t>(k);
    st.mode = (k <= 0) ? NONE : (k >= n ? ALL : NORMAL);
    st.pad = 0u;
    state[s] = st;
  }
}

// One block per `group` consecutive chunks. The digit is `bits` wide at `shift`; digits above
// it must match the prefix found by the earlier passes. Counts go to a shared histogram that is
// flushed (one global atomic per non-empty bin) when the block moves on to another segment and
// at its end, so a block whose chunks all lie in one segment flushes once. Only the first pass
// (shift + bits == 32) checks that the values are finite: it reads every segment, whatever its
// k, and the later passes read only segments still in NORMAL mode, so one check covers every
// value.
template <typename T>
__global__ void __launch_bounds__(THREADS, SLT_TOPK_HIST_BLOCKS_PER_SM)
histogram_kernel(const T* __restrict__ values, const int64_t* __restrict__ chunks,
                 int num_chunks, int group, const SegmentState* __restrict__ state,
                 uint32_t* hist, int shift, int bits, int* error) {
  __shared__ uint32_t local[BINS];
  const int nbins = 1 << bits;
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) local[b] = 0u;
  const bool first = (shift + bits == 32);
  const uint32_t high = first ? 0u : (0xffffffffu << (shift + bits));
  const uint32_t digit_mask = static_cast<uint32_t>(nbins - 1);
  const int64_t c_begin = static_cast<int64_t>(blockIdx.x) * group;
  const int64_t c_end = c_begin + group < num_chunks ? c_begin + group : num_chunks;
  int64_t counted = -1;  // the segment whose counts `local` holds, -1 before the first
  bool bad = false;
  for (int64_t c = c_begin; c < c_end; ++c) {  // everything below is block-uniform but f
    const int64_t seg = chunks[3 * c], begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
    const SegmentState st = state[seg];
    const bool counting = st.mode == NORMAL;
    if (!counting && !first) continue;
    if (counting && seg != counted) {
      __syncthreads();  // zeroed, or the last segment's counts complete
      if (counted >= 0) {  // flush and re-zero: each bin is one thread's
        uint32_t* h = hist + static_cast<size_t>(counted) * BINS;
        for (int b = threadIdx.x; b < nbins; b += blockDim.x) {
          if (local[b]) {
            atomicAdd(&h[b], local[b]);
            local[b] = 0u;
          }
        }
        __syncthreads();
      }
      counted = seg;
    }
    const uint32_t prefix = st.prefix;
    for_each_value(values, begin, end, [&](float v, bool ok) {
      if (first) bad |= ok && non_finite(v);  // every segment, whatever its k
      const uint32_t key = key_of(v);
      const bool has_bin = counting && ok && (key & high) == prefix;
      warp_count(local, has_bin, has_bin ? (key >> shift) & digit_mask : 0xffffffffu);
    });
  }
  if (bad) atomicExch(error, 1);
  if (counted >= 0) {
    __syncthreads();
    uint32_t* h = hist + static_cast<size_t>(counted) * BINS;
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) {
      if (local[b]) atomicAdd(&h[b], local[b]);
    }
  }
}

// One block per segment. Thread t sums a run of bins taken from the top; a block-wide
// exclusive scan gives the count above each run, and the one thread whose run holds the
// k-th largest walks it to find the bin. It extends the prefix, subtracts the count above the
// bin from `remain`, and after the last digit sets AT_LEAST when the bin (now one key) holds
// exactly `remain` values. The histogram is zeroed for the next pass.
__global__ void select_kernel(SegmentState* state, uint32_t* hist, int shift, int bits) {
  using Scan = cub::BlockScan<uint32_t, THREADS>;
  __shared__ typename Scan::TempStorage temp;
  const int s = blockIdx.x;
  const int nbins = 1 << bits;
  const int per = nbins / THREADS;
  const int top = nbins - 1 - threadIdx.x * per;  // this thread's bins: top, top-1, ...
  uint32_t* h = hist + static_cast<size_t>(s) * BINS;
  uint32_t mine = 0u;
  for (int j = 0; j < per; ++j) mine += h[top - j];
  uint32_t before;
  Scan(temp).ExclusiveSum(mine, before);
  SegmentState st = state[s];
  if (st.mode == NORMAL && before < st.remain && st.remain <= before + mine) {
    uint32_t above = before;
    int b = top;
    for (int j = 0; j < per; ++j, --b) {
      if (above + h[b] >= st.remain) break;
      above += h[b];
    }
    st.prefix |= static_cast<uint32_t>(b) << shift;
    st.remain -= above;
    if (shift == 0 && h[b] == st.remain) st.mode = AT_LEAST;  // no tie straddles the cut
    state[s] = st;
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) h[b] = 0u;
}

// Per chunk: how many values equal the segment's threshold (ties, resolved by index later).
// Reads nothing, and writes 0, in segments not in NORMAL mode.
template <typename T>
__global__ void tie_count_kernel(const T* __restrict__ values, const int64_t* __restrict__ chunks,
                                 const SegmentState* __restrict__ state, uint32_t* chunk_ties) {
  using Reduce = cub::BlockReduce<uint32_t, THREADS>;
  __shared__ typename Reduce::TempStorage temp;
  const Chunk c = chunk_of(chunks);
  const int64_t seg = c.seg, begin = c.begin, end = c.end;
  const SegmentState st = state[seg];
  uint32_t count = 0u;
  if (st.mode == NORMAL) {
    const uint32_t prefix = st.prefix;
    for_each_value(values, begin, end, [&](float v, bool ok) {
      count += ok && key_of(v) == prefix ? 1u : 0u;
    });
  }
  const uint32_t total = Reduce(temp).Sum(count);  // valid in thread 0
  if (threadIdx.x == 0) chunk_ties[blockIdx.x] = total;
}

// One block per segment: exclusive scan, in place, of the tie counts of its chunks
// (seg_chunks[s] .. seg_chunks[s+1], in order), THREADS chunks at a time, so each chunk learns
// how many ties precede it in its segment. Only NORMAL segments rank ties; the others return
// at once (a 2^26-value global segment has 16 k chunks, too many for one thread to walk).
__global__ void tie_scan_kernel(const int64_t* __restrict__ seg_chunks,
                                const SegmentState* __restrict__ state, uint32_t* chunk_ties) {
  using Scan = cub::BlockScan<uint32_t, THREADS>;
  __shared__ typename Scan::TempStorage temp;
  const int s = blockIdx.x;
  if (state[s].mode != NORMAL) return;  // the same for the whole block
  const int64_t first = seg_chunks[s], last = seg_chunks[s + 1];
  uint32_t running = 0u;
  for (int64_t tile = first; tile < last; tile += THREADS) {
    const int64_t c = tile + threadIdx.x;
    const uint32_t here = c < last ? chunk_ties[c] : 0u;
    uint32_t before;
    uint32_t tile_total;
    Scan(temp).ExclusiveSum(here, before, tile_total);
    if (c < last) chunk_ties[c] = running + before;
    running += tile_total;
    __syncthreads();  // temp storage is reused by the next tile
  }
}

// One block per chunk. AT_LEAST: key >= threshold. NONE / ALL: a constant, reading nothing.
// NORMAL: key > threshold, or a tie whose rank in its segment (ties in earlier chunks, from the
// tie scan, plus ties earlier in this chunk, tile by tile) is below `remain`.
template <typename T>
__global__ void write_kernel(const T* __restrict__ values, const int64_t* __restrict__ chunks,
                             const SegmentState* __restrict__ state,
                             const uint32_t* __restrict__ chunk_ties, bool* __restrict__ mask) {
  using Scan = cub::BlockScan<uint32_t, THREADS>;
  __shared__ typename Scan::TempStorage temp;
  const Chunk c = chunk_of(chunks);
  const int64_t seg = c.seg, begin = c.begin, end = c.end;
  const SegmentState st = state[seg];
  if (st.mode == AT_LEAST) {  // the usual case: packs in, packed mask bytes out
    constexpr int VEC = Pack<T>::VEC;
    const Split sp = split_of(values, begin, end);
    const int64_t head = sp.mid - begin, edge = head + (end - sp.tail);  // < 2 VEC
    if (threadIdx.x < edge) {
      const int64_t i = threadIdx.x < head ? begin + threadIdx.x : sp.tail + (threadIdx.x - head);
      mask[i] = key_of(to_float(__ldg(values + i))) >= st.prefix;
    }
    // VEC mask bytes in one 4- or 8-byte store where mask + mid is aligned to it (when values
    // and mask both start 16-byte aligned, as fresh torch tensors do), else byte by byte
    using Bytes = typename std::conditional<VEC == 4, uint32_t, uint2>::type;
    const bool packed = reinterpret_cast<uintptr_t>(mask + sp.mid) % sizeof(Bytes) == 0;
    for (int64_t p = threadIdx.x; p < sp.nvec; p += blockDim.x) {
      const Pack<T> pack = load_pack(values + sp.mid + p * VEC);
      uint32_t word[2] = {0u, 0u};
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const uint32_t keep = key_of(to_float(pack.v[j])) >= st.prefix ? 1u : 0u;
        word[j / 4] |= keep << (8 * (j % 4));
      }
      bool* out = mask + sp.mid + p * VEC;
      if (packed) {
        Bytes bytes;
        memcpy(&bytes, word, sizeof(Bytes));
        *reinterpret_cast<Bytes*>(out) = bytes;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = (word[j / 4] >> (8 * (j % 4))) & 1u;
      }
    }
    return;
  }
  if (st.mode != NORMAL) {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) mask[i] = (st.mode == ALL);
    return;
  }
  uint32_t ties_before = chunk_ties[blockIdx.x];
  // tiles of THREADS consecutive elements, in order, so tie ranks follow the index
  for (int64_t tile = begin; tile < end; tile += THREADS) {
    const int64_t i = tile + threadIdx.x;
    uint32_t key = 0u;
    if (i < end) key = key_of(to_float(__ldg(values + i)));
    const uint32_t is_tie = (i < end && key == st.prefix) ? 1u : 0u;
    uint32_t rank;
    uint32_t tile_ties;
    Scan(temp).ExclusiveSum(is_tie, rank, tile_ties);
    if (i < end) mask[i] = key > st.prefix || (is_tie && ties_before + rank < st.remain);
    ties_before += tile_ties;
    __syncthreads();  // temp storage is reused by the next tile
  }
}

template <typename T>
void launch_all(const T* values, const int64_t* offsets, const int64_t* ks, int num_segments,
                const int64_t* chunks, int num_chunks, const int64_t* seg_chunks,
                SegmentState* state, uint32_t* hist, uint32_t* chunk_ties, bool* mask,
                int* error, cudaStream_t stream) {
  if (num_segments == 0) return;
  init_kernel<<<num_segments, THREADS, 0, stream>>>(offsets, ks, num_segments, state, hist);
  if (num_chunks == 0) return;
  const int shifts[3] = {21, 10, 0};
  const int widths[3] = {11, 11, 10};
  int group = num_chunks / MIN_HIST_BLOCKS;
  group = group < 1 ? 1 : (group > MAX_GROUP ? MAX_GROUP : group);
  const int hist_blocks = (num_chunks - 1) / group + 1;
  for (int pass = 0; pass < 3; ++pass) {
    histogram_kernel<T><<<hist_blocks, THREADS, 0, stream>>>(
        values, chunks, num_chunks, group, state, hist, shifts[pass], widths[pass], error);
    select_kernel<<<num_segments, THREADS, 0, stream>>>(state, hist, shifts[pass], widths[pass]);
  }
  tie_count_kernel<T><<<num_chunks, THREADS, 0, stream>>>(values, chunks, state, chunk_ties);
  tie_scan_kernel<<<num_segments, THREADS, 0, stream>>>(seg_chunks, state, chunk_ties);
  write_kernel<T><<<num_chunks, THREADS, 0, stream>>>(values, chunks, state, chunk_ties, mask);
}

}  // namespace slt_topk

// C entry point for the torch binding: dtype 0 = float32, 1 = float16, 2 = bfloat16.
// `workspace` holds num_segments SegmentStates, then num_segments * BINS (2048) uint32
// histogram bins, then num_chunks uint32 tie counts (see slt_topk_workspace_bytes): 8 KiB per
// segment plus 4 bytes per chunk. `error` must be zeroed by the caller (no kernel clears it);
// it becomes 1 when any value is NaN or infinite. The caller keeps num_segments and num_chunks
// within int (grid sizes) and every segment below 2^32 values.
extern "C" size_t slt_topk_workspace_bytes(int64_t num_segments, int64_t num_chunks) {
  return sizeof(slt_topk::SegmentState) * static_cast<size_t>(num_segments) +
         sizeof(uint32_t) * (static_cast<size_t>(num_segments) * slt_topk::BINS +
                             static_cast<size_t>(num_chunks));
}

extern "C" int slt_topk_launch(const void* values, int dtype, const int64_t* offsets,
                               const int64_t* ks, int num_segments, const int64_t* chunks,
                               int num_chunks, const int64_t* seg_chunks, void* workspace,
                               bool* mask, int* error, cudaStream_t stream) {
  auto* state = static_cast<slt_topk::SegmentState*>(workspace);
  auto* hist = reinterpret_cast<uint32_t*>(state + num_segments);
  auto* ties = hist + static_cast<size_t>(num_segments) * slt_topk::BINS;
  switch (dtype) {
    case 0:
      slt_topk::launch_all(static_cast<const float*>(values), offsets, ks, num_segments, chunks,
                           num_chunks, seg_chunks, state, hist, ties, mask, error, stream);
      break;
    case 1:
      slt_topk::launch_all(static_cast<const __half*>(values), offsets, ks, num_segments, chunks,
                           num_chunks, seg_chunks, state, hist, ties, mask, error, stream);
      break;
    case 2:
      slt_topk::launch_all(static_cast<const __nv_bfloat16*>(values), offsets, ks, num_segments,
                           chunks, num_chunks, seg_chunks, state, hist, ties, mask, error, stream);
      break;
    default:
      return 1;
  }
  return static_cast<int>(cudaGetLastError());
}
