// Tensor-core decode kernel: yᵀ[N, M] = deq(W)[N, K] · xᵀ[K, M] with mma.sync m16n8k16, plus LoRA.
//
// The weight is the 16-row A operand and the tokens sit on the 8-wide N side in NT tiles of 8 (M <= 8: one
// mma per 16x16 weight tile, M <= 16: two, up to 6 at M <= 48): the multiply costs almost nothing next to
// streaming W, and M = 1 runs here too (the CUDA-core GEMV spends an FMA per code and token on it).
//
// A block owns 16 rows of W; its kMmaWarps warps split K in steps of 64 codes. A step lies inside one NF4
// block or INT4 group (both are multiples of 64 here), so each mma sums codes of a single scale: the A
// operand is the bare table value (NF4) or q - zero (INT4), rounded to T, and the scale multiplies the
// step's fp32 partial sums after its 4 mmas — 4 FMAs per 16x8 tile instead of one multiply per code. The
// k order inside a step is permuted (decode_math.cuh: mma_physical_k) so that each lane's fragments lie in
// its own loads — no shuffles, and x goes into the B registers as loaded. Lane L (g = L/4, t = L%4) per step:
//   loads codes 16t .. 16t+15 of rows g and g+8 (two 8-byte loads; their one scale each decoded here)
//   and x[token 8j + g][16t .. 16t+15] for each 8-token tile j (two 16-byte loads per tile);
//   decodes each row's 8 bytes into 8 A registers in registers (decode_nf4_word / int4_magic_word);
//   for mma ks = 0..3: A registers 0/1 (rows g, g+8) from byte 2ks of the row loads, registers 2/3 from
//   byte 2ks+1; B registers from words 2ks and 2ks+1 of the x span; C rows g, g+8 x tokens 2t, 2t+1.
// kUnroll steps are loaded together so that several loads of W are in flight per lane.
// Tokens past M read row M-1 (any valid row): their C columns are never stored.
//
// Numerics: the decoded A value is the NF4 table value rounded to T (at most half an ulp of T away from
// it, so the weight code·absmax is within 2^-(p+1)·|w| <= one ulp of T of its exact value, p = T's
// significant bits) or the integer q - zero (exact); products and sums are fp32.
#include "decode_device.cuh"

namespace fusedlora {
namespace {

using namespace decode;

constexpr int kMmaWarps = 8;  // also the 8 table pools built at the start, one per warp
constexpr int kMmaRows = 16;
constexpr int kStep = kMmaStep;  // codes per row per step (decode_lora.h)
// Steps loaded together: 2 rows x 4 steps = 8 x 8 bytes of W in flight per lane; one step per lane of a
// row pair's group, whose scales that lane decodes.
constexpr int kUnroll = 4;
static_assert(kUnroll == 4, "one step per lane t of a group (the scale shuffles)");

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2],
                                          const __nv_bfloat16*) {
#if defined(FUSEDLORA_EMULATE)
  emulate::mma_m16n8k16(c, a, b, emulate::Operand::kBF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2], const __half*) {
#if defined(FUSEDLORA_EMULATE)
  emulate::mma_m16n8k16(c, a, b, emulate::Operand::kFP16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The INT4 magic (int4_magic_word) of each type, in both halves: 128.0 in bf16, 1024.0 in fp16.
template <typename T>
struct Int4Magic;
template <>
struct Int4Magic<__nv_bfloat16> {
  static constexpr uint32_t bits = 0x43004300u;
  static constexpr float value = 128.f;
};
template <>
struct Int4Magic<__half> {
  static constexpr uint32_t bits = 0x64006400u;
  static constexpr float value = 1024.f;
};

// The 8 A registers of one row's step: pair p = byte p of the row's 8-byte load. ``shift`` (INT4): magic +
// zero in both halves of T.
template <typename T, Format F>
__device__ __forceinline__ void decode_row(uint2 w, const uint32_t tab[8], uint32_t shift, uint32_t pair[8]) {
  if constexpr (F != Format::kINT4) {
    decode_nf4_word(w.x, tab, pair);
    decode_nf4_word(w.y, tab, pair + 4);
  } else {
    int4_magic_word(w.x, Int4Magic<T>::bits, pair);
    int4_magic_word(w.y, Int4Magic<T>::bits, pair + 4);
#pragma unroll
    for (int p = 0; p < 8; ++p) pair[p] = sub_pair(pair[p], shift, static_cast<const T*>(nullptr));
  }
}

// The scale of row n for the step at column k, and (INT4) magic + zero as a pair of T (exact: an integer
// below 2^11).
template <typename T, Format F>
__device__ __forceinline__ void step_scale(const DecodeArgs& a, int64_t n, int64_t k, float& sc, uint32_t& shift) {
  float zp;
  block_scale<F>(a, n, k, sc, zp);
  shift = F == Format::kINT4 ? float2_to_pair(Int4Magic<T>::value + zp, Int4Magic<T>::value + zp,
                                              static_cast<const T*>(nullptr))
                             : 0u;
}

// Steps s0 .. s0 + count - 1 of the lane's rows n_lo (g) and n_hi (g + 8), accumulated into c. kFull: count is
// kUnroll; otherwise the loads past the last step repeat it (unused).
template <typename T, Format F, int NT, bool kFull>
__device__ __forceinline__ void step_group(const DecodeArgs& a, const uint32_t tab[8], int lane, int s0, int count,
                                           int64_t n_lo, int64_t n_hi, float c[NT][4]) {
  const int g = lane >> 2, t = lane & 3;
  const int64_t k_first = static_cast<int64_t>(kStep) * s0;
  const uint8_t* w_lo_p = a.w + n_lo * (a.K / 2) + k_first / 2 + 8 * t;
  const uint8_t* w_hi_p = a.w + n_hi * (a.K / 2) + k_first / 2 + 8 * t;
  auto clamp = [count](int u) { return kFull ? u : min(u, count - 1); };
  uint2 w_lo[kUnroll], w_hi[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    w_lo[u] = load_stream8(w_lo_p + clamp(u) * (kStep / 2));
    w_hi[u] = load_stream8(w_hi_p + clamp(u) * (kStep / 2));
  }
  // The four lanes of a row pair need the same scales: lane t decodes those of step s0 + t and the group
  // shares them, one shuffle per value instead of a scale decode per lane and step.
  float my_sc_lo, my_sc_hi;
  uint32_t my_shift_lo, my_shift_hi;
  const int64_t k_t = k_first + kStep * clamp(t);
  step_scale<T, F>(a, n_lo, k_t, my_sc_lo, my_shift_lo);
  step_scale<T, F>(a, n_hi, k_t, my_sc_hi, my_shift_hi);
  float sc_lo[kUnroll], sc_hi[kUnroll];
  uint32_t shift_lo[kUnroll], shift_hi[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int src = (lane & ~3) | u;
    sc_lo[u] = __shfl_sync(0xffffffffu, my_sc_lo, src);
    sc_hi[u] = __shfl_sync(0xffffffffu, my_sc_hi, src);
    if constexpr (F == Format::kINT4) {
      shift_lo[u] = __shfl_sync(0xffffffffu, my_shift_lo, src);
      shift_hi[u] = __shfl_sync(0xffffffffu, my_shift_hi, src);
    } else {
      shift_lo[u] = shift_hi[u] = 0u;
    }
  }
  const T* x = static_cast<const T*>(a.x);
  const T* xrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xrow[j] = x + static_cast<int64_t>(min(8 * j + g, a.M - 1)) * a.ldx + k_first + 16 * t;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (!kFull && u >= count) break;  // the same for the whole warp
    uint4 xv[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 2; ++q) xv[j][q] = __ldg(reinterpret_cast<const uint4*>(xrow[j] + kStep * u) + q);
    uint32_t lo[8], hi[8];
    decode_row<T, F>(w_lo[u], tab, shift_lo[u], lo);
    decode_row<T, F>(w_hi[u], tab, shift_hi[u], hi);
    float part[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kStep / 16; ++ks) {
      const int p0 = mma_pair_index(ks, 0), p1 = mma_pair_index(ks, 1);
      const uint32_t af[4] = {lo[p0], hi[p0], lo[p1], hi[p1]};  // rows g, g+8 x columns 2t.., then 2t+8..
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t* xw = &xv[j][0].x;  // the lane's 8 words of x, in order
        const uint32_t bf[2] = {xw[p0], xw[p1]};
        mma_16816(part[j], af, bf, x);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {  // C registers 0/1: row g, 2/3: row g+8
      c[j][0] = fmaf(sc_lo[u], part[j][0], c[j][0]);
      c[j][1] = fmaf(sc_lo[u], part[j][1], c[j][1]);
      c[j][2] = fmaf(sc_hi[u], part[j][2], c[j][2]);
      c[j][3] = fmaf(sc_hi[u], part[j][3], c[j][3]);
    }
  }
}

template <typename T, Format F, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32) gemv_lora_mma_kernel(const DecodeArgs a) {
  // NF4: the code table rounded to T, as byte pools (decode_math.cuh: table_byte_pool), built once per block
  // in one copy per lane: each lane reads its own, so the compiler cannot prove the registers uniform and
  // keep them in uniform registers, which PRMT cannot read (a move per use).
  __shared__ uint32_t tab_s[8][32];
  __shared__ float red[kMmaWarps][kMmaRows][8 * NT];
  uint32_t tab[8] = {};
  if constexpr (F != Format::kINT4) {
    {
      const int r = threadIdx.x >> 5;  // kMmaWarps == 8 pools, one per warp
      uint16_t bits[16];
#pragma unroll
      for (int q = 0; q < 16; ++q) bits[q] = value_bits(a.code[q], static_cast<const T*>(nullptr));
      tab_s[r][threadIdx.x & 31] = table_byte_pool(bits, r);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 8; ++r) tab[r] = tab_s[r][threadIdx.x & 31];
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kMmaRows;
  // The rows this lane loads; rows past N (last block) read row N-1 again and are never stored.
  const int64_t n_lo = min(n0 + g, a.N - 1), n_hi = min(n0 + g + 8, a.N - 1);
  const int steps = a.K / kStep;
  const int per_warp = (steps + kMmaWarps - 1) / kMmaWarps;
  const int s_begin = warp * per_warp;
  const int s_end = min(steps, s_begin + per_warp);

  float c[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;

  // Whole groups of kUnroll steps (loads at fixed offsets from pointers that advance), then at most one
  // partial group.
  int s0 = s_begin;
  for (; s0 + kUnroll <= s_end; s0 += kUnroll) step_group<T, F, NT, true>(a, tab, lane, s0, kUnroll, n_lo, n_hi, c);
  if (s0 < s_end) step_group<T, F, NT, false>(a, tab, lane, s0, s_end - s0, n_lo, n_hi, c);

#pragma unroll
  for (int j = 0; j < NT; ++j) {
    red[warp][g][8 * j + 2 * t] = c[j][0];
    red[warp][g][8 * j + 2 * t + 1] = c[j][1];
    red[warp][g + 8][8 * j + 2 * t] = c[j][2];
    red[warp][g + 8][8 * j + 2 * t + 1] = c[j][3];
  }
  __syncthreads();

  wait_for_prerequisite();  // xa comes from the pre-pass
  for (int i = threadIdx.x; i < kMmaRows * 8 * NT; i += kMmaWarps * 32) {
    const int row = i / (8 * NT), m = i % (8 * NT);
    const int n = n0 + row;
    if (n >= a.N || m >= a.M) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) v += red[w][row][m];
    lora_epilogue<T>(a, n, m, v);
  }
}

}  // namespace

template <typename T, Format F>
cudaError_t launch_decode_mma(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid((a.N + kMmaRows - 1) / kMmaRows), block(kMmaWarps * 32);
  const bool dependent = a.overlap != 0;
  // Token tiles for M: each tile adds 4 HMMA + 4 FFMA + 2 loads of x per 64-code step; 6 tiles (M <= 48)
  // is the most that keeps every instantiation free of spills on sm_80 and sm_90 (8 tiles spill 8-44 bytes),
  // and M = 17..48 is where the Triton forward is predicted 1.8-3.6x slower before x's L2 re-reads count
  // (fusedlora/ops/decode.py: decode_max_m, which caps those re-reads).
  if (a.M <= 8) return launch_kernel(gemv_lora_mma_kernel<T, F, 1>, grid, block, stream, dependent, a);
  if (a.M <= 16) return launch_kernel(gemv_lora_mma_kernel<T, F, 2>, grid, block, stream, dependent, a);
  if (a.M <= 32) return launch_kernel(gemv_lora_mma_kernel<T, F, 4>, grid, block, stream, dependent, a);
  return launch_kernel(gemv_lora_mma_kernel<T, F, 6>, grid, block, stream, dependent, a);
}

#define FUSEDLORA_INSTANTIATE(T, F) template cudaError_t launch_decode_mma<T, F>(const DecodeArgs&, cudaStream_t);
FUSEDLORA_INSTANTIATE(__nv_bfloat16, Format::kNF4)
FUSEDLORA_INSTANTIATE(__nv_bfloat16, Format::kNF4DQ)
FUSEDLORA_INSTANTIATE(__nv_bfloat16, Format::kINT4)
FUSEDLORA_INSTANTIATE(__half, Format::kNF4)
FUSEDLORA_INSTANTIATE(__half, Format::kNF4DQ)
FUSEDLORA_INSTANTIATE(__half, Format::kINT4)
#undef FUSEDLORA_INSTANTIATE

}  // namespace fusedlora
