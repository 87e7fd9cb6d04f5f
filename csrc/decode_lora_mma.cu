// Tensor-core decode kernel: yᵀ[N, M] = deq(W)[N, K] · xᵀ[K, M] with mma.sync m16n8k16, plus LoRA.
//
// The weight is the 16-row A operand and the tokens sit on the 8-wide N side, so M <= 8 pads to 8 columns
// (one mma per 16x16 weight tile) and M <= 16 to two: the multiply costs almost nothing next to streaming
// W, where the CUDA-core GEMV's FMAs grow with M.
//
// A block owns 16 rows of W; its kMmaWarps warps split K in steps of 128 codes. The k order inside a step
// is permuted (decode_math.cuh: mma_physical_k) so that each lane's fragments lie in its own loads — no
// shuffles, and x goes into the B registers as loaded. Lane L (g = L/4, t = L%4) per step:
//   loads codes 32t .. 32t+31 of rows g and g+8 (two 16-byte loads; their one scale each decoded here)
//   and x[token 8j + g][32t .. 32t+31] for each 8-token tile j (four 16-byte loads per tile);
//   for mma ks = 0..7: A registers 0/1 (rows g, g+8) from byte 2ks of the row loads, registers 2/3 from
//   byte 2ks+1; B registers from words 2ks and 2ks+1 of the x span; C rows g, g+8 x tokens 2t, 2t+1.
// kUnroll steps are loaded together so that several 16-byte loads of W are in flight per lane.
// Tokens past M read row M-1 (any valid row): their C columns are never stored.
#include "decode_device.cuh"

namespace fusedlora {
namespace {

using namespace decode;

constexpr int kMmaWarps = 8;
constexpr int kMmaRows = 16;
constexpr int kStep = kMmaStep;  // codes per row per step (decode_lora.h)
constexpr int kUnroll = 2;  // steps loaded together: 2 rows x 2 steps = 4 x 16 bytes of W in flight per lane

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

// One A register: the two codes of byte ``b`` of a word (even column from the high nibble, in the low half),
// dequantized in fp32 and rounded to T. even/odd are the word's nibble_offsets.
template <typename T, Format F>
__device__ __forceinline__ uint32_t dequant_pair(const SharedTable& table, uint32_t even, uint32_t odd, int b,
                                                 float sc, float zp) {
  return float2_to_pair(dequant<F>(table_load(table, table_entry_address(table.base, even, b)), sc, zp),
                        dequant<F>(table_load(table, table_entry_address(table.base, odd, b)), sc, zp),
                        static_cast<const T*>(nullptr));
}

template <typename T, Format F, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32) gemv_lora_mma_kernel(const DecodeArgs a) {
  // The code table: NF4 values, or for INT4 the codes themselves (0..15). 256-byte aligned: an entry's
  // address is one PRMT away from its offset (table_entry_address).
  __shared__ __align__(256) float code_s[16];
  __shared__ float red[kMmaWarps][kMmaRows][8 * NT];
  if (threadIdx.x < 16) code_s[threadIdx.x] = F != Format::kINT4 ? a.code[threadIdx.x] : static_cast<float>(threadIdx.x);
  __syncthreads();
  const SharedTable table = shared_table(code_s);

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int64_t K = a.K;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kMmaRows;
  // The rows this lane loads; rows past N (last block) read row N-1 again and are never stored.
  const int64_t n_lo = min(n0 + g, a.N - 1), n_hi = min(n0 + g + 8, a.N - 1);
  const int steps = a.K / kStep;
  const int per_warp = (steps + kMmaWarps - 1) / kMmaWarps;
  const int s_begin = warp * per_warp;
  const int s_end = min(steps, s_begin + per_warp);

  const T* xrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xrow[j] = x + static_cast<int64_t>(min(8 * j + g, a.M - 1)) * a.ldx + 32 * t;

  float c[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;

  for (int s0 = s_begin; s0 < s_end; s0 += kUnroll) {
    uint4 w_lo[kUnroll], w_hi[kUnroll];
    float sc_lo[kUnroll], sc_hi[kUnroll], zp_lo[kUnroll], zp_hi[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // The lane's 32 codes of a row are 32-element chunk 4s + t of that row.
      const int64_t chunk = 4 * static_cast<int64_t>(min(s0 + u, s_end - 1)) + t;  // past the range: a repeat, unused
      w_lo[u] = load_stream(a.w + chunk_byte_offset(n_lo, chunk, K));
      w_hi[u] = load_stream(a.w + chunk_byte_offset(n_hi, chunk, K));
      chunk_scale<F>(a, n_lo, chunk, sc_lo[u], zp_lo[u]);
      chunk_scale<F>(a, n_hi, chunk, sc_hi[u], zp_hi[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (s0 + u >= s_end) break;  // the same for the whole warp
      const int64_t k0 = static_cast<int64_t>(kStep) * (s0 + u);
      uint4 xv[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[j][q] = __ldg(reinterpret_cast<const uint4*>(xrow[j] + k0) + q);
#pragma unroll
      for (int wd = 0; wd < 4; ++wd) {  // word wd of the row loads holds the bytes of mmas 2wd and 2wd + 1
        const uint32_t lo = (&w_lo[u].x)[wd], hi = (&w_hi[u].x)[wd];
        const uint32_t lo_even = nibble_offsets(lo, 0), lo_odd = nibble_offsets(lo, 1);
        const uint32_t hi_even = nibble_offsets(hi, 0), hi_odd = nibble_offsets(hi, 1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ks = 2 * wd + h;
          const int b0 = mma_pair_index(ks, 0) & 3, b1 = mma_pair_index(ks, 1) & 3;  // bytes within word wd
          const uint32_t af[4] = {
              dequant_pair<T, F>(table, lo_even, lo_odd, b0, sc_lo[u], zp_lo[u]),  // row g,   columns 2t, 2t+1
              dequant_pair<T, F>(table, hi_even, hi_odd, b0, sc_hi[u], zp_hi[u]),  // row g+8, columns 2t, 2t+1
              dequant_pair<T, F>(table, lo_even, lo_odd, b1, sc_lo[u], zp_lo[u]),  // row g,   columns 2t+8, 2t+9
              dequant_pair<T, F>(table, hi_even, hi_odd, b1, sc_hi[u], zp_hi[u]),  // row g+8, columns 2t+8, 2t+9
          };
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t* xw = &xv[j][0].x;  // the lane's 16 words of x, in order
            const uint32_t bf[2] = {xw[mma_pair_index(ks, 0)], xw[mma_pair_index(ks, 1)]};
            mma_16816(c[j], af, bf, x);
          }
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

template <typename T, Format F>
cudaError_t launch_decode_mma(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid((a.N + kMmaRows - 1) / kMmaRows), block(kMmaWarps * 32);
  const bool dependent = a.overlap != 0;
  if (a.M <= 8) return launch_kernel(gemv_lora_mma_kernel<T, F, 1>, grid, block, stream, dependent, a);
  return launch_kernel(gemv_lora_mma_kernel<T, F, 2>, grid, block, stream, dependent, a);
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
