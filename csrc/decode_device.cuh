// Device helpers shared by the two decode kernels (decode_lora.cu: CUDA cores, decode_lora_mma.cu:
// tensor cores): conversions, the streaming load of W, the per-chunk scale, the LoRA epilogue.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

#include "decode_lora.h"
#include "decode_math.cuh"
#include "launch.cuh"

namespace fusedlora {
namespace decode {

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

// Register reinterpretations go through memcpy (a plain move after optimization): a pointer cast between
// the 32-bit word and the paired type would break strict aliasing.
__device__ __forceinline__ float2 pair_to_float2(uint32_t v, const __nv_bfloat16*) {
  __nv_bfloat162_raw h;
  memcpy(&h, &v, sizeof(h));
  return __bfloat1622float2(__nv_bfloat162(h));
}
__device__ __forceinline__ float2 pair_to_float2(uint32_t v, const __half*) {
  __half2_raw h;
  memcpy(&h, &v, sizeof(h));
  return __half22float2(__half2(h));
}

// Two floats rounded into one 32-bit register of the activation type, ``lo`` in the low half (the
// element with the smaller index, as the mma fragments expect).
__device__ __forceinline__ uint32_t float2_to_pair(float lo, float hi, const __nv_bfloat16*) {
  const __nv_bfloat162_raw h = __floats2bfloat162_rn(lo, hi);
  uint32_t v;
  memcpy(&v, &h, sizeof(v));
  return v;
}
__device__ __forceinline__ uint32_t float2_to_pair(float lo, float hi, const __half*) {
  const __half2_raw h = __floats2half2_rn(lo, hi);
  uint32_t v;
  memcpy(&v, &h, sizeof(v));
  return v;
}

// A float rounded to T, as its 16-bit pattern.
__device__ __forceinline__ uint16_t value_bits(float v, const __nv_bfloat16*) {
  return __nv_bfloat16_raw(__float2bfloat16_rn(v)).x;
}
__device__ __forceinline__ uint16_t value_bits(float v, const __half*) { return __half_raw(__float2half_rn(v)).x; }

// a - b on two packed values of T, rounded to T (Pair2: T's packed type, Raw2: its storage).
template <typename Pair2, typename Raw2>
__device__ __forceinline__ uint32_t sub_packed(uint32_t a, uint32_t b) {
  Raw2 ra, rb;
  memcpy(&ra, &a, sizeof(ra));
  memcpy(&rb, &b, sizeof(rb));
  const Raw2 d = __hsub2(Pair2(ra), Pair2(rb));
  uint32_t v;
  memcpy(&v, &d, sizeof(v));
  return v;
}
__device__ __forceinline__ uint32_t sub_pair(uint32_t a, uint32_t b, const __nv_bfloat16*) {
  return sub_packed<__nv_bfloat162, __nv_bfloat162_raw>(a, b);
}
__device__ __forceinline__ uint32_t sub_pair(uint32_t a, uint32_t b, const __half*) {
  return sub_packed<__half2, __half2_raw>(a, b);
}

// W is read exactly once: keep it out of L1 so x and the scales stay there.
__device__ __forceinline__ uint4 load_stream(const void* p) {
#if defined(FUSEDLORA_EMULATE)
  return emulate::load<uint4>(p);
#else
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
}

__device__ __forceinline__ uint2 load_stream8(const void* p) {
#if defined(FUSEDLORA_EMULATE)
  return emulate::load<uint2>(p);
#else
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
#endif
}

// Programmatic dependent launch (sm_90+): the pre-pass lets the main kernel launch early; the main kernel
// waits for the pre-pass to complete (and its writes to be visible) before reading xa.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite() {
#if defined(FUSEDLORA_EMULATE)
  emulate::wait_for_prerequisite();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Scale (and INT4 zero point) of the elements of row n from column k on, up to the next multiple of 32:
// one per 32 elements, since every NF4 blocksize and INT4 group size is a multiple of 32.
template <Format F>
__device__ __forceinline__ void block_scale(const DecodeArgs& a, int64_t n, int64_t k, float& sc, float& zp) {
  const int64_t K = a.K;
  if constexpr (F != Format::kINT4) {
    const int64_t b = nf4_block(n, k, K, a.block_shift);
    if constexpr (F == Format::kNF4) {
      sc = __ldg(a.absmax + b);
    } else {
      sc = dq_absmax(a.absmax_q, a.nested_absmax, a.nested_code, a.nested_offset, b);
    }
    zp = 0.f;
  } else {
    const int64_t g = n * (K >> a.block_shift) + (k >> a.block_shift);
    sc = __ldg(a.scales + g);
    zp = static_cast<float>(__ldg(a.zeros + g));
  }
}
// The same for the 32-element chunk c of row n.
template <Format F>
__device__ __forceinline__ void chunk_scale(const DecodeArgs& a, int64_t n, int64_t c, float& sc, float& zp) {
  block_scale<F>(a, n, 32 * c, sc, zp);
}

// A code table in shared memory addressed by 32-bit shared-window addresses (table_entry_address): the
// address of an entry comes from its byte offset in one PRMT, with no add of the table's base.
struct SharedTable {
  uint32_t base;       // shared-window address of entry 0, 256-byte aligned
  const float* entry;  // the same table as a pointer (host emulation)
};
__device__ __forceinline__ SharedTable shared_table(const float* table) {
#if defined(FUSEDLORA_EMULATE)
  return {0u, table};
#else
  return {static_cast<uint32_t>(__cvta_generic_to_shared(table)), table};
#endif
}
__device__ __forceinline__ float table_load(const SharedTable& t, uint32_t address) {
#if defined(FUSEDLORA_EMULATE)
  return t.entry[(address - t.base) / 4];
#else
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(address));
  return v;
#endif
}

// A weight in fp32 from its code-table entry (the NF4 value, or the INT4 code as a float).
template <Format F>
__device__ __forceinline__ float dequant(float table_value, float sc, float zp) {
  return F != Format::kINT4 ? table_value * sc : (table_value - zp) * sc;
}

// y[m, n] = base + scale·xa[m, :]·B[n, :] (+ bias[n]), rounded once into the activation type.
template <typename T>
__device__ __forceinline__ void lora_epilogue(const DecodeArgs& a, int n, int m, float base) {
  const T* __restrict__ B = static_cast<const T*>(a.B);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  float lora = 0.f;
  for (int j = 0; j < a.r; ++j) lora = fmaf(a.xa[m * a.r + j], to_float(B[static_cast<int64_t>(n) * a.r + j]), lora);
  float v = fmaf(a.scale, lora, base);
  if (bias != nullptr) v += to_float(bias[n]);
  store(static_cast<T*>(a.y) + static_cast<int64_t>(m) * a.N + n, v);
}

}  // namespace decode
}  // namespace fusedlora
