// NF4 -> bf16/fp16/fp32 dequantize, bit-identical to the plain-torch reference (fusedlora/formats/nf4.py).
//
// out[i] = cast(nf4[q_i] * absmax[i / blocksize]), i over the flat N*K elements (layout: nf4.cuh).
// Each thread takes 16 packed bytes = 32 elements with one 16-byte load, decodes its single absmax
// (double quantization included, in the same pass) and writes 32 outputs with 16-byte stores.
// The <32-element tail, and buffers that are not 16-byte aligned, take the scalar path.
// Products and sums use mul_rn / add_rn (decode_math.cuh) so that no FMA contraction or fast-math flag changes
// a bit relative to the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "dequant_nf4.h"
#include "launch.cuh"
#include "nf4.cuh"

namespace fusedlora {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <bool kDoubleQuant>
__device__ __forceinline__ float block_absmax(const void* absmax, const float* nested_absmax,
                                              const float* nested_code, float offset, int64_t block) {
  if constexpr (kDoubleQuant) {
    return dq_absmax(static_cast<const uint8_t*>(absmax), nested_absmax, nested_code, offset, block);
  } else {
    return __ldg(static_cast<const float*>(absmax) + block);
  }
}

template <typename OutT, bool kDoubleQuant, bool kVector>
__global__ void __launch_bounds__(kThreads) dequantize_nf4_kernel(
    const uint8_t* __restrict__ data, const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_code, float offset, int blocksize, int64_t numel, OutT* __restrict__ out) {
  // 16 entries in 16 banks: lanes reading different codes never conflict, equal codes broadcast.
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = nf4_value(threadIdx.x);
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t full_chunks = kVector ? numel / kElementsPer16B : 0;

  for (int64_t c = tid; c < full_chunks; c += stride) {
    const int64_t first = c * kElementsPer16B;
    const uint4 packed = __ldg(reinterpret_cast<const uint4*>(data) + c);
    const float scale =
        block_absmax<kDoubleQuant>(absmax, nested_absmax, nested_code, offset, nf4_block_index(first, blocksize));
    alignas(16) OutT vals[kElementsPer16B];
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int j = 0; j < 8; ++j) vals[8 * w + j] = from_float<OutT>(mul_rn(code[word_code(words[w], j)], scale));
    }
    // 16-byte stores; the values reach them through memcpy (register moves), not a pointer cast of vals.
    uint4* dst = reinterpret_cast<uint4*>(out + first);
#pragma unroll
    for (int s = 0; s < static_cast<int>(sizeof(vals)) / 16; ++s) {
      uint4 v;
      memcpy(&v, reinterpret_cast<const char*>(vals) + 16 * s, sizeof(v));
      dst[s] = v;
    }
  }

  // Scalar path: the tail after the full 32-element chunks (all elements when not vectorized).
  for (int64_t i = full_chunks * kElementsPer16B + tid; i < numel; i += stride) {
    const uint8_t byte = data[nf4_byte_index(i)];
    const float scale =
        block_absmax<kDoubleQuant>(absmax, nested_absmax, nested_code, offset, nf4_block_index(i, blocksize));
    out[i] = from_float<OutT>(mul_rn(code[nf4_code_of(byte, i)], scale));
  }
}

template <typename OutT, bool kDoubleQuant>
cudaError_t launch_typed(const DequantNf4Args& a, cudaStream_t stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(a.data) % 16 == 0) && (reinterpret_cast<uintptr_t>(a.out) % 16 == 0);
  const int64_t work = aligned ? (a.numel + kElementsPer16B - 1) / kElementsPer16B : a.numel;
  // Enough blocks to fill any current GPU many times over; the grid-stride loops cover the rest.
  const int64_t blocks = work == 0 ? 1 : (work + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  OutT* out = static_cast<OutT*>(a.out);
  auto kernel =
      aligned ? dequantize_nf4_kernel<OutT, kDoubleQuant, true> : dequantize_nf4_kernel<OutT, kDoubleQuant, false>;
  return launch_kernel(kernel, dim3(grid), dim3(kThreads), stream, /*dependent=*/false, a.data, a.absmax,
                       a.nested_absmax, a.nested_code, a.nested_offset, a.blocksize, a.numel, out);
}

template <typename OutT>
cudaError_t launch_dq(const DequantNf4Args& a, cudaStream_t stream) {
  return a.double_quant ? launch_typed<OutT, true>(a, stream) : launch_typed<OutT, false>(a, stream);
}

}  // namespace

#if !defined(FUSEDLORA_EMULATE)
cudaError_t kernel_image_status() {
  // Asking for a kernel's attributes loads the module for the current device: it fails, as a launch would,
  // when the build holds neither a binary for the device's architecture nor PTX it can compile. Every .cu
  // of the build is compiled for the same architectures, so one kernel answers for all.
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, dequantize_nf4_kernel<float, false, true>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky: clear it so that later launches see none
  return err;
}
#endif

cudaError_t launch_dequantize_nf4(const DequantNf4Args& args, cudaStream_t stream) {
  if (args.numel <= 0) return cudaSuccess;
  if (args.blocksize <= 0 || args.blocksize % kElementsPer16B != 0) return cudaErrorInvalidValue;
  switch (args.out_dtype) {
    case OutDtype::kFloat32: return launch_dq<float>(args, stream);
    case OutDtype::kFloat16: return launch_dq<__half>(args, stream);
    case OutDtype::kBFloat16: return launch_dq<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedlora
