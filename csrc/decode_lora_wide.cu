// Tensor-core decode kernel for 17..64 tokens (and from 10 where wide_min_m says so): the step of
// decode_lora_mma.cu (decode_mma_step.cuh), with x shared by 128 rows of W instead of 16.
//
// Why: decode_lora_mma.cu gives each block 16 rows and splits K over its 8 warps, so every block reads all
// of x again from L2 — M·K·2 bytes per 16 rows, M / 4 times the weight's own bytes (M = 64 on a
// 4096 -> 14336 projection: 470 MB of L2 reads per call for a 29 MB weight). Here each of the 8 warps owns
// 16 rows and all of them walk the same K range, reading x from shared memory, where the block stages
// it once per group of kUnroll steps: L2 reads of x drop 8-fold (M·K·2 per 128 rows).
//
// 128-row blocks leave too few blocks for the chip when N is small (32 at N = 4096), so K is also split
// over gridDim.y blocks (``DecodeArgs::splits``): each writes its fp32 partial tile to ``partials``
// [splits, M, N], takes a ticket (``tickets``, one int32 counter per 128-row block, 0 between launches),
// and the block that takes the last one adds the partials in split order (the same sum whichever block
// finishes last), runs the LoRA epilogue and puts the counter back to 0. With one split the epilogue
// runs from registers.
//
// Staging: a group's x tile is [kUnroll steps][8·NT tokens][64 codes], rows padded to 144 bytes so that the
// lanes' 16-byte reads (token 8j + g, codes 16t .. 16t+15) fall in distinct banks; each thread copies NT
// 16-byte pieces of it. W is what comes from HBM: each warp issues the next group's W loads (and its scales)
// before computing the current group, so they are in flight during the math and x's staging; x comes from
// L2 (every block reads it) and waits for its barrier. Tokens past M read row M - 1 (never stored).
// The numerics are decode_lora_mma.cu's: the same decode, the scale applied to each step's fp32 partials.
#include "decode_mma_step.cuh"

namespace fusedlora {
namespace {

using namespace decode;

constexpr int kWideWarps = 8;
constexpr int kWideThreads = kWideWarps * 32;
constexpr int kWideRows = 16 * kWideWarps;
static_assert(kWideRows == kDecodeWideRows, "decode_lora.h");
constexpr int kXRow = kStep + 8;  // staged row: 64 codes' x + 16 bytes of padding
// token tiles per pass of compute_group: the mmas of one tile's 4 k-slices depend on each other, so tiles
// are interleaved; 4 at a time leave 47 NOPs between dependent mmas per 2 KB of weight at 8 tiles (2 at a
// time: 76), and all 8 at once spill
constexpr int kWidePass = 4;
template <int NT>
constexpr int kPassOf = NT < kWidePass ? NT : kWidePass;

// The staged x of one group, read as decode_mma_step's XSpan.
template <typename T, int NT>
struct SharedX {
  const T* tile;
  int g, t;
  __device__ __forceinline__ uint4 get(int j, int u, int q) const {
    return *reinterpret_cast<const uint4*>(tile + (u * 8 * NT + 8 * j + g) * kXRow + 16 * t + 8 * q);
  }
};

__device__ __forceinline__ void fence_gpu() {
#if !defined(FUSEDLORA_EMULATE)
  __threadfence();
#endif
}
__device__ __forceinline__ int take_ticket(int* counter) {
#if defined(FUSEDLORA_EMULATE)
  return (*counter)++;  // the emulator runs blocks one after another
#else
  return atomicAdd(counter, 1);
#endif
}
// Another block's partial: from L2, past this SM's L1.
__device__ __forceinline__ float load_partial(const float* p) {
#if defined(FUSEDLORA_EMULATE)
  return emulate::load<float>(p);
#else
  return __ldcg(p);
#endif
}

// ptxas's register budget per instantiation: without a minimum it caps 4 token tiles at 128 registers and
// spills; with a minimum of one block per SM it lets 8 tiles hoist loads up to 255 and spill. These are the
// settings under which every instantiation compiles without spills for sm_80 and sm_90 (CMakeLists.txt
// fails the build on a spill).
template <int NT>
constexpr int kWideMinBlocks = NT <= 4 ? 1 : 0;

template <typename T, Format F, int NT>
__global__ void __launch_bounds__(kWideThreads, kWideMinBlocks<NT>) gemv_lora_wide_kernel(const DecodeArgs a) {
  constexpr int kTokens = 8 * NT;
  __shared__ __align__(16) T xs[kUnroll * kTokens * kXRow];
  __shared__ int last;
  uint32_t tab[8];
  load_code_table<T, F>(a, tab);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kWideRows + 16 * warp;
  const int64_t n_lo = min(n0 + g, a.N - 1), n_hi = min(n0 + g + 8, a.N - 1);
  const int steps = a.K / kStep;
  const int per_split = (steps + gridDim.y - 1) / gridDim.y;
  const int s_begin = min(steps, static_cast<int>(blockIdx.y) * per_split);
  const int s_end = min(steps, s_begin + per_split);

  // The thread's NT pieces of a group's tile: piece i is 16 bytes of (step u, token row, eighth q8).
  const T* x = static_cast<const T*>(a.x);
  uint4 stage[NT];
  auto piece = [](int i, int& u, int& row, int& q8) {
    const int c = static_cast<int>(threadIdx.x) + kWideThreads * i;
    u = c / (8 * kTokens);
    row = (c / 8) % kTokens;
    q8 = c % 8;
  };
  auto fetch = [&](int s0, int count) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      int u, row, q8;
      piece(i, u, row, q8);
      const int64_t k = int64_t{kStep} * (s0 + min(u, count - 1)) + 8 * q8;
      stage[i] = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(row, a.M - 1)) * a.ldx + k));
    }
  };
  static_assert(kUnroll * kTokens * 8 == NT * kWideThreads, "one piece per thread per token tile");

  float c[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;

  // A group's x: fetched (from L2) into registers, then stored into the tile once every warp is done with
  // the previous group's.
  auto stage_x = [&](int s0, int count) {
    fetch(s0, count);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      int u, row, q8;
      piece(i, u, row, q8);
      *reinterpret_cast<uint4*>(xs + (u * kTokens + row) * kXRow + 8 * q8) = stage[i];
    }
    __syncthreads();
  };
  const SharedX<T, NT> span{xs, g, t};

  // Whole groups, each computed while the next one's W (and scales) is in flight; then at most one partial
  // group. The loop holds one group's loads, staging and math, nothing of the partial one.
  int s0 = s_begin;
  if (s_end - s_begin >= kUnroll) {
    GroupLoads now = load_group<T, F, true>(a, lane, s0, kUnroll, n_lo, n_hi);
    for (; s0 + 2 * kUnroll <= s_end; s0 += kUnroll) {
      stage_x(s0, kUnroll);
      const GroupLoads next = load_group<T, F, true>(a, lane, s0 + kUnroll, kUnroll, n_lo, n_hi);
      compute_group<T, F, NT, true, kPassOf<NT>>(now, tab, lane, kUnroll, c, span);
      now = next;
    }
    stage_x(s0, kUnroll);
    compute_group<T, F, NT, true, kPassOf<NT>>(now, tab, lane, kUnroll, c, span);
    s0 += kUnroll;
  }
  if (s0 < s_end) {
    stage_x(s0, s_end - s0);
    compute_group<T, F, NT, false, kPassOf<NT>>(load_group<T, F, false>(a, lane, s0, s_end - s0, n_lo, n_hi), tab,
                                                lane, s_end - s0, c, span);
  }

  wait_for_prerequisite();  // xa comes from the pre-pass
  if (gridDim.y == 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // C registers 0/1: row g, 2/3: row g+8; tokens 2t, 2t+1
        const int n = n0 + g + 8 * (i >> 1), m = 8 * j + 2 * t + (i & 1);
        if (n < a.N && m < a.M) lora_epilogue<T>(a, n, m, c[j][i]);
      }
    return;
  }
  float* mine = a.partials + static_cast<int64_t>(blockIdx.y) * a.M * a.N;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + g + 8 * (i >> 1), m = 8 * j + 2 * t + (i & 1);
      if (n < a.N && m < a.M) mine[static_cast<int64_t>(m) * a.N + n] = c[j][i];
    }
  fence_gpu();      // this thread's partials visible to the whole GPU ...
  __syncthreads();  // ... for every thread, before the ticket is taken
  if (threadIdx.x == 0) last = take_ticket(a.tickets + blockIdx.x) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  fence_gpu();
  const int nb = blockIdx.x * kWideRows;
  for (int i = threadIdx.x; i < kWideRows * a.M; i += kWideThreads) {
    const int m = i / kWideRows, n = nb + i % kWideRows;
    if (n >= a.N) continue;
    float v = 0.f;
    for (int s = 0; s < static_cast<int>(gridDim.y); ++s)
      v += load_partial(a.partials + (static_cast<int64_t>(s) * a.M + m) * a.N + n);
    lora_epilogue<T>(a, n, m, v);
  }
  if (threadIdx.x == 0) a.tickets[blockIdx.x] = 0;  // for the next launch (stream-ordered after this one)
}

}  // namespace

template <typename T, Format F>
cudaError_t launch_decode_wide(const DecodeArgs& a, cudaStream_t stream) {
  if (a.splits < 1 || (a.splits > 1 && (a.partials == nullptr || a.tickets == nullptr))) return cudaErrorInvalidValue;
  const dim3 grid((a.N + kWideRows - 1) / kWideRows, a.splits), block(kWideThreads);
  const bool dependent = a.overlap != 0;
  // 2, 4 or 8 token tiles: x staged for 4 steps of 64 codes is 9, 18 or 37 KB of shared memory. 2 tiles run
  // where the 128-row kernel takes over below 17 tokens (the 14336-wide shapes): half the mma work and x
  // of 4 tiles
  if (a.M <= 16) return launch_kernel(gemv_lora_wide_kernel<T, F, 2>, grid, block, stream, dependent, a);
  if (a.M <= 32) return launch_kernel(gemv_lora_wide_kernel<T, F, 4>, grid, block, stream, dependent, a);
  return launch_kernel(gemv_lora_wide_kernel<T, F, 8>, grid, block, stream, dependent, a);
}

#define FUSEDLORA_INSTANTIATE(T, F) template cudaError_t launch_decode_wide<T, F>(const DecodeArgs&, cudaStream_t);
FUSEDLORA_FOR_EACH_TYPE_AND_FORMAT(FUSEDLORA_INSTANTIATE)
#undef FUSEDLORA_INSTANTIATE

}  // namespace fusedlora
