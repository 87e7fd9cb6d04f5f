// Tensor-core decode kernel: yᵀ[N, M] = deq(W)[N, K] · xᵀ[K, M] with mma.sync m16n8k16, plus LoRA.
//
// The weight is the 16-row A operand and the tokens sit on the 8-wide N side in NT tiles of 8 (M <= 8: one
// mma per 16x16 weight tile, M <= 16: two; more tokens run decode_lora_wide.cu): the multiply costs almost
// nothing next to streaming W, and M = 1 runs here too (the CUDA-core GEMV spends an FMA per code and token
// on it).
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
#include "decode_mma_step.cuh"

namespace fusedlora {
namespace {

using namespace decode;

constexpr int kMmaWarps = 8;  // also the 8 table pools built at the start, one per warp
constexpr int kMmaRows = 16;

template <typename T, Format F, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32) gemv_lora_mma_kernel(const DecodeArgs a) {
  __shared__ float red[kMmaWarps][kMmaRows][8 * NT];
  uint32_t tab[8];
  load_code_table<T, F>(a, tab);

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
  for (; s0 + kUnroll <= s_end; s0 += kUnroll)
    step_group<T, F, NT, true>(a, tab, lane, s0, kUnroll, n_lo, n_hi, c, GlobalX<T, NT>(a, g, t, int64_t{kStep} * s0));
  if (s0 < s_end)
    step_group<T, F, NT, false>(a, tab, lane, s0, s_end - s0, n_lo, n_hi, c, GlobalX<T, NT>(a, g, t, int64_t{kStep} * s0));

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
  // Token tiles for M: one or two here; more tokens read x from shared memory in the 128-row kernel, where
  // the re-reads of x from L2 that every 16-row block makes here would outgrow the weight's bytes.
  if (a.M > kGemvMaxM || a.M >= a.wide_min_m) return launch_decode_wide<T, F>(a, stream);
  if (a.M <= 8) return launch_kernel(gemv_lora_mma_kernel<T, F, 1>, grid, block, stream, dependent, a);
  return launch_kernel(gemv_lora_mma_kernel<T, F, 2>, grid, block, stream, dependent, a);
}

#define FUSEDLORA_INSTANTIATE(T, F) template cudaError_t launch_decode_mma<T, F>(const DecodeArgs&, cudaStream_t);
FUSEDLORA_FOR_EACH_TYPE_AND_FORMAT(FUSEDLORA_INSTANTIATE)
#undef FUSEDLORA_INSTANTIATE

}  // namespace fusedlora
