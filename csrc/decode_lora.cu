// Decode-time fused 4-bit linear + LoRA for small M (plain CUDA, no torch headers).
//
//   xa = x·Aᵀ                                    [M, r] fp32   (pre-pass: M·r dot products of length K)
//   y  = x·deq(W)ᵀ + scale·xa·Bᵀ (+ bias)        [M, N]        (main kernel)
//
// On sm_90 the two launches overlap (programmatic dependent launch, DecodeArgs::overlap, which the caller
// sets from the device's compute capability): the main kernel starts while the pre-pass runs, streams W
// and accumulates, and waits for xa only before its epilogue; elsewhere they run back to back.
//
// Two main kernels, both reading W once with 16-byte loads that bypass L1, and both limited by issuing
// instructions about as much as by HBM (bench/sass_loops.py counts them per byte of W):
// - this file's CUDA-core GEMV (M < mma_min_m): each block owns kRows rows of W (8 at M = 1, else 4); each
//   thread streams 16-byte chunks (32 codes) of all kRows rows per step, so kRows loads are in flight. A code
//   costs one byte pick, one shared-table read and one FMA per token, so its cost grows with M;
// - the tensor-core kernels (M >= mma_min_m, K and block multiples of 64), whose cost grows slowly with M:
//   decode_lora_mma.cu's, 16 rows of W per block, up to M = 16, and decode_lora_wide.cu's, 128 rows per
//   block sharing x, from wide_min_m (at most 17) to 64 (the GEMV serves M <= 16 only).
// Scales (NF4 absmax, plain or double-quantized, or INT4 scale + zero) are decoded in the same pass.
// Accumulation is fp32.
#include "decode_device.cuh"

namespace fusedlora {
namespace {

using namespace decode;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Rows of W per block (and 16-byte loads in flight per thread): 8 at M = 1, where the x loads and
// conversions shared by the rows are a visible share of the loop; 4 above, where registers grow with M.
template <int MT>
struct RowsPerBlock {
  static constexpr int value = MT == 1 ? 8 : 4;
};

// xa[m, j] = x[m, :]·A[j, :], one block per (j, m). 16-byte loads of 8 elements each (rows are 16-byte
// aligned: K % 32 == 0 and both bases aligned), so at K = 4096 each thread makes two rounds of loads
// rather than sixteen dependent ones; on sm_80, where nothing overlaps this pass, that is its latency.
template <typename T>
__global__ void __launch_bounds__(256) xa_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ A,
                                                 float* __restrict__ xa, int K, int r) {
  __shared__ float partial[8];
  allow_dependent_launch();
  const int j = blockIdx.x, m = blockIdx.y;
  const uint4* xr = reinterpret_cast<const uint4*>(x + m * ldx);
  const uint4* ar = reinterpret_cast<const uint4*>(A + static_cast<int64_t>(j) * K);
  float acc = 0.f;
  for (int v = threadIdx.x; v < K / 8; v += blockDim.x) {
    const uint4 xv = __ldg(xr + v), av = __ldg(ar + v);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float2 xf = pair_to_float2((&xv.x)[p], x), af = pair_to_float2((&av.x)[p], x);
      acc = fmaf(xf.x, af.x, acc);
      acc = fmaf(xf.y, af.y, acc);
    }
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
    v = warp_sum(v);
    if (threadIdx.x == 0) xa[m * r + j] = v;
  }
}

template <typename T, Format F, int MT>
__global__ void __launch_bounds__(kThreads) gemv_lora_kernel(const DecodeArgs a) {
  constexpr int kRows = RowsPerBlock<MT>::value;
  // The code table: NF4 values, or for INT4 the codes themselves (0..15), whose zero point is applied
  // per chunk below. 256-byte aligned: an entry's address is one PRMT away from its offset.
  __shared__ __align__(256) float code_s[16];
  __shared__ float red[kWarps][kRows * MT];
  if (threadIdx.x < 16) code_s[threadIdx.x] = F != Format::kINT4 ? a.code[threadIdx.x] : static_cast<float>(threadIdx.x);
  __syncthreads();
  const SharedTable table = shared_table(code_s);

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int64_t K = a.K;
  const int chunks = a.K / 32;
  const int n0 = blockIdx.x * kRows;
  float acc[kRows][MT];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[rr][m] = 0.f;

  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    uint4 wv[kRows];
    float sc[kRows], zp[kRows];
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      // Rows past N (last block) read row N-1 again; their sums are never stored.
      const int64_t n = min(n0 + rr, a.N - 1);
      wv[rr] = load_stream(a.w + chunk_byte_offset(n, c, K));
      chunk_scale<F>(a, n, c, sc[rr], zp[rr]);
    }
    // M <= 2 (kFold): the scale (and INT4 zero point) is constant over the chunk's 32 codes, so the inner
    // loop sums table[q]·x — one table read and one FMA per code and token — and the chunk's sum is scaled
    // once: sc·Σ table[q]·x for NF4, sc·(Σ q·x − zero·Σ x) for INT4. Larger M scales each code instead:
    // that multiply is shared by M FMAs, and the chunk sums would cost kRows·M more registers.
    constexpr bool kFold = MT <= 2;
    float part[kRows][MT], xsum[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      xsum[m] = 0.f;
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) part[rr][m] = 0.f;
    }
#pragma unroll
    for (int wd = 0; wd < 4; ++wd) {
      float wf[kRows][8];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        const uint32_t word = (&wv[rr].x)[wd];
        const uint32_t even = nibble_offsets(word, 0), odd = nibble_offsets(word, 1);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          wf[rr][2 * b] = table_load(table, table_entry_address(table.base, even, b));
          wf[rr][2 * b + 1] = table_load(table, table_entry_address(table.base, odd, b));
        }
        if constexpr (!kFold) {
#pragma unroll
          for (int e = 0; e < 8; ++e) wf[rr][e] = dequant<F>(wf[rr][e], sc[rr], zp[rr]);
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < a.M) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * a.ldx + 32 * static_cast<int64_t>(c) + 8 * wd));
          float xf[8];
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            const float2 f = pair_to_float2((&xv.x)[p], x);
            xf[2 * p] = f.x;
            xf[2 * p + 1] = f.y;
          }
          if constexpr (kFold && F == Format::kINT4) {
#pragma unroll
            for (int e = 0; e < 8; ++e) xsum[m] += xf[e];
          }
          float(&sum)[kRows][MT] = kFold ? part : acc;
#pragma unroll
          for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
            for (int e = 0; e < 8; ++e) sum[rr][m] = fmaf(wf[rr][e], xf[e], sum[rr][m]);
        }
      }
    }
    if constexpr (kFold) {
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float chunk_sum = F != Format::kINT4 ? part[rr][m] : fmaf(-zp[rr], xsum[m], part[rr][m]);
          acc[rr][m] = fmaf(sc[rr], chunk_sum, acc[rr][m]);
        }
    }
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = warp_sum(acc[rr][m]);
      if (lane == 0) red[warp][rr * MT + m] = v;
    }
  __syncthreads();

  wait_for_prerequisite();  // xa comes from the pre-pass
  for (int i = threadIdx.x; i < kRows * MT; i += kThreads) {
    const int rr = i / MT, m = i % MT;
    const int n = n0 + rr;
    if (n >= a.N || m >= a.M) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][i];
    lora_epilogue<T>(a, n, m, v);
  }
}

template <typename T, Format F, int MT>
cudaError_t launch_main(const DecodeArgs& a, cudaStream_t stream) {
  constexpr int kRows = RowsPerBlock<MT>::value;
  return launch_kernel(gemv_lora_kernel<T, F, MT>, dim3((a.N + kRows - 1) / kRows), dim3(kThreads), stream,
                       /*dependent=*/a.overlap != 0, a);
}

template <typename T, Format F>
cudaError_t launch_for_m(const DecodeArgs& a, cudaStream_t stream) {
  if (a.M >= a.mma_min_m && a.K % kMmaStep == 0 && a.block % kMmaStep == 0) return launch_decode_mma<T, F>(a, stream);
  // One instantiation per power-of-two bucket of M: the accumulators live in registers, sized at compile time.
  if (a.M <= 1) return launch_main<T, F, 1>(a, stream);
  if (a.M <= 2) return launch_main<T, F, 2>(a, stream);
  if (a.M <= 4) return launch_main<T, F, 4>(a, stream);
  if (a.M <= 8) return launch_main<T, F, 8>(a, stream);
  return launch_main<T, F, 16>(a, stream);
}

template <typename T>
cudaError_t launch_typed(const DecodeArgs& a, Scheme scheme, cudaStream_t stream) {
  const cudaError_t err = launch_kernel(xa_kernel<T>, dim3(a.r, a.M), dim3(256), stream, /*dependent=*/false,
                                        static_cast<const T*>(a.x), a.ldx, static_cast<const T*>(a.A), a.xa, a.K, a.r);
  if (err != cudaSuccess) return err;
  if (scheme == Scheme::kINT4) return launch_for_m<T, Format::kINT4>(a, stream);
  return a.absmax != nullptr ? launch_for_m<T, Format::kNF4>(a, stream) : launch_for_m<T, Format::kNF4DQ>(a, stream);
}

}  // namespace

cudaError_t decode_lora(const DecodeArgs& args, Act act, Scheme scheme, cudaStream_t stream) {
  if (args.M < 1 || args.M > kDecodeMaxM || args.K % 32 != 0 || args.r < 1) return cudaErrorInvalidValue;
  const bool mma = args.M >= args.mma_min_m && args.K % kMmaStep == 0 && args.block % kMmaStep == 0;
  if (args.M > kGemvMaxM && !mma) return cudaErrorInvalidValue;  // the GEMV is built up to kGemvMaxM
  if (args.block < 32 || (args.block & (args.block - 1)) != 0) return cudaErrorInvalidValue;
  DecodeArgs a = args;
  a.block_shift = 0;
  while ((1 << a.block_shift) < a.block) ++a.block_shift;
  return act == Act::kBF16 ? launch_typed<__nv_bfloat16>(a, scheme, stream) : launch_typed<__half>(a, scheme, stream);
}

}  // namespace fusedlora
