// Tensor-core decode kernel: yᵀ[N, M] = deq(W)[N, K] · xᵀ[K, M] with mma.sync m16n8k16, plus LoRA.
//
// The weight is the 16-row A operand and the tokens sit on the 8-wide N side, so M <= 8 pads to 8 columns
// (one mma per 16x16 weight tile) and M <= 16 to two: the multiply costs almost nothing next to streaming
// W, where the CUDA-core GEMV's FMAs grow with M.
//
// A block owns 16 rows of W; its kMmaWarps warps split K. Per 64-element step a warp loads its 16 rows x
// 64 codes as one 16-byte load per lane (lane L: row L/2, 32-code half L%2), kUnroll steps at a time so
// that several loads are in flight. Fragments of m16n8k16 (g = L/4, t = L%4):
//   A (W, row-major 16x16): rows g and g+8, columns 2t, 2t+1 and 2t+8, 2t+9. Packed, that is byte t of
//       the two 32-bit words of the row's 8-byte segment; segment s (of 4 per step) of row r sits in the
//       load of lane 2r + s/2, words 2(s%2) and 2(s%2)+1: four shuffles per segment bring it over.
//   B (xᵀ, col-major 16x8): x[token g][2t, 2t+1] and x[token g][2t+8, 2t+9], one 32-bit load each.
//   C (16x8 fp32): rows g, g+8 x tokens 2t, 2t+1.
// Tokens past M read row M-1 (any valid row): their C columns are never stored.
#include "decode_device.cuh"

namespace fusedlora {
namespace {

using namespace decode;

constexpr int kMmaWarps = 8;
constexpr int kMmaRows = 16;
constexpr int kUnroll = 4;  // 64-element steps loaded together: 4 x 16 bytes in flight per lane

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

// The two codes of ``byte`` (high nibble first: the even column) as one register.
template <typename T, Scheme S>
__device__ __forceinline__ uint32_t dequant_pair(const float* code_s, uint32_t byte, float sc, float zp) {
  return float2_to_pair(dequant<S>(code_s, byte >> 4, sc, zp), dequant<S>(code_s, byte & 0xFu, sc, zp),
                        static_cast<const T*>(nullptr));
}

template <typename T, Scheme S, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32) gemv_lora_mma_kernel(const DecodeArgs a) {
  __shared__ float code_s[16];
  __shared__ float red[kMmaWarps][kMmaRows][8 * NT];
  if (S == Scheme::kNF4 && threadIdx.x < 16) code_s[threadIdx.x] = a.code[threadIdx.x];
  __syncthreads();

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int64_t K = a.K;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kMmaRows;
  // The row this lane loads; rows past N (last block) read row N-1 again and are never stored.
  const int64_t n_ld = min(n0 + mma_load_row(lane), a.N - 1);
  const int half = mma_load_half(lane);
  const int steps = a.K / 64;
  const int per_warp = (steps + kMmaWarps - 1) / kMmaWarps;
  const int s_begin = warp * per_warp;
  const int s_end = min(steps, s_begin + per_warp);

  const T* xrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xrow[j] = x + static_cast<int64_t>(min(8 * j + g, a.M - 1)) * a.ldx;

  float c[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;

  for (int s0 = s_begin; s0 < s_end; s0 += kUnroll) {
    uint4 wv[kUnroll];
    float sc[kUnroll], zp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = 2 * static_cast<int64_t>(min(s0 + u, s_end - 1)) + half;  // past the range: a repeat, unused
      wv[u] = load_stream(a.w + chunk_byte_offset(n_ld, chunk, K));
      chunk_scale<S>(a, n_ld, chunk, sc[u], zp[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (s0 + u >= s_end) break;  // the same for the whole warp
      const int64_t k0 = 64 * static_cast<int64_t>(s0 + u);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const int src_lo = mma_source_lane(g, ks), src_hi = mma_source_lane(g + 8, ks);
        const uint32_t w0 = (&wv[u].x)[mma_source_word(ks)];
        const uint32_t w1 = (&wv[u].x)[mma_source_word(ks) + 1];
        const uint32_t lo0 = __shfl_sync(0xffffffffu, w0, src_lo), lo1 = __shfl_sync(0xffffffffu, w1, src_lo);
        const uint32_t hi0 = __shfl_sync(0xffffffffu, w0, src_hi), hi1 = __shfl_sync(0xffffffffu, w1, src_hi);
        const float sc_lo = __shfl_sync(0xffffffffu, sc[u], src_lo), sc_hi = __shfl_sync(0xffffffffu, sc[u], src_hi);
        float zp_lo = 0.f, zp_hi = 0.f;
        if constexpr (S == Scheme::kINT4) {
          zp_lo = __shfl_sync(0xffffffffu, zp[u], src_lo);
          zp_hi = __shfl_sync(0xffffffffu, zp[u], src_hi);
        }
        const uint32_t af[4] = {
            dequant_pair<T, S>(code_s, mma_pair_byte(lo0, t), sc_lo, zp_lo),  // row g,   columns 2t, 2t+1
            dequant_pair<T, S>(code_s, mma_pair_byte(hi0, t), sc_hi, zp_hi),  // row g+8, columns 2t, 2t+1
            dequant_pair<T, S>(code_s, mma_pair_byte(lo1, t), sc_lo, zp_lo),  // row g,   columns 2t+8, 2t+9
            dequant_pair<T, S>(code_s, mma_pair_byte(hi1, t), sc_hi, zp_hi),  // row g+8, columns 2t+8, 2t+9
        };
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const T* xp = xrow[j] + k0 + 16 * ks + 2 * t;
          const uint32_t bf[2] = {__ldg(reinterpret_cast<const unsigned int*>(xp)),
                                  __ldg(reinterpret_cast<const unsigned int*>(xp + 8))};
          mma_16816(c[j], af, bf, x);
        }
      }
    }
  }

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

template <typename T, Scheme S>
cudaError_t launch_decode_mma(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid((a.N + kMmaRows - 1) / kMmaRows), block(kMmaWarps * 32);
  if (a.M <= 8) return launch_kernel(gemv_lora_mma_kernel<T, S, 1>, grid, block, stream, /*dependent=*/true, a);
  return launch_kernel(gemv_lora_mma_kernel<T, S, 2>, grid, block, stream, /*dependent=*/true, a);
}

template cudaError_t launch_decode_mma<__nv_bfloat16, Scheme::kNF4>(const DecodeArgs&, cudaStream_t);
template cudaError_t launch_decode_mma<__nv_bfloat16, Scheme::kINT4>(const DecodeArgs&, cudaStream_t);
template cudaError_t launch_decode_mma<__half, Scheme::kNF4>(const DecodeArgs&, cudaStream_t);
template cudaError_t launch_decode_mma<__half, Scheme::kINT4>(const DecodeArgs&, cudaStream_t);

}  // namespace fusedlora
