// One 64-code step of the tensor-core decode kernels (decode_lora_mma.cu: 16 rows per block, K split over
// its warps; decode_lora_wide.cu: 16 rows per warp, x shared through shared memory): the code table, the
// decode of a row's codes into mma A registers, the step's scale, and a group of kUnroll steps accumulated
// into a warp's 16 rows x NT token tiles. decode_lora_mma.cu's header describes the lane layout and the
// numerics; the two kernels differ only in where x comes from (an XSpan) and how many rows share it.
#pragma once
#include "decode_device.cuh"

namespace fusedlora {
namespace decode {

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

// NF4: the code table rounded to T, as byte pools (decode_math.cuh: table_byte_pool), built once per block
// (8 warps, one pool each) in one copy per lane: each lane reads its own, so the compiler cannot prove the
// registers uniform and keep them in uniform registers, which PRMT cannot read (a move per use). INT4 needs
// none. Every thread of the block calls it (a barrier inside).
template <typename T, Format F>
__device__ __forceinline__ void load_code_table(const DecodeArgs& a, uint32_t tab[8]) {
#pragma unroll
  for (int r = 0; r < 8; ++r) tab[r] = 0u;
  if constexpr (F != Format::kINT4) {
    __shared__ uint32_t tab_s[8][32];
    {
      const int r = (threadIdx.x >> 5) & 7;
      uint16_t bits[16];
#pragma unroll
      for (int q = 0; q < 16; ++q) bits[q] = value_bits(a.code[q], static_cast<const T*>(nullptr));
      tab_s[r][threadIdx.x & 31] = table_byte_pool(bits, r);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 8; ++r) tab[r] = tab_s[r][threadIdx.x & 31];
  }
}

// x read straight from global memory (L1/L2): the lane's 16 codes' worth of token 8j + g at each step.
template <typename T, int NT>
struct GlobalX {
  const T* row[NT];
  __device__ __forceinline__ GlobalX(const DecodeArgs& a, int g, int t, int64_t k_first) {
    const T* x = static_cast<const T*>(a.x);
#pragma unroll
    for (int j = 0; j < NT; ++j) row[j] = x + static_cast<int64_t>(min(8 * j + g, a.M - 1)) * a.ldx + k_first + 16 * t;
  }
  __device__ __forceinline__ uint4 get(int j, int u, int q) const {
    return __ldg(reinterpret_cast<const uint4*>(row[j] + kStep * u) + q);
  }
};

// The loads of a group of kUnroll steps (s0 .. s0 + count - 1) of a lane's rows n_lo (g) and n_hi (g + 8):
// W's codes, and the scales of step s0 + t (lane t; shared by the row pair's four lanes in compute_group).
// kFull: count is kUnroll; otherwise the loads past the last step repeat it (unused). Apart from
// compute_group so that a kernel can have a group's loads in flight while it computes the previous one.
struct GroupLoads {
  uint2 w_lo[kUnroll], w_hi[kUnroll];
  float sc_lo, sc_hi;
  uint32_t shift_lo, shift_hi;
};

template <typename T, Format F, bool kFull>
__device__ __forceinline__ GroupLoads load_group(const DecodeArgs& a, int lane, int s0, int count, int64_t n_lo,
                                                 int64_t n_hi) {
  const int t = lane & 3;
  const int64_t k_first = static_cast<int64_t>(kStep) * s0;
  const uint8_t* w_lo_p = a.w + n_lo * (a.K / 2) + k_first / 2 + 8 * t;
  const uint8_t* w_hi_p = a.w + n_hi * (a.K / 2) + k_first / 2 + 8 * t;
  auto clamp = [count](int u) { return kFull ? u : min(u, count - 1); };
  GroupLoads ld;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    ld.w_lo[u] = load_stream8(w_lo_p + clamp(u) * (kStep / 2));
    ld.w_hi[u] = load_stream8(w_hi_p + clamp(u) * (kStep / 2));
  }
  const int64_t k_t = k_first + kStep * clamp(t);
  step_scale<T, F>(a, n_lo, k_t, ld.sc_lo, ld.shift_lo);
  step_scale<T, F>(a, n_hi, k_t, ld.sc_hi, ld.shift_hi);
  return ld;
}

// Steps of ``ld`` (count of them) accumulated into c, the warp's 16 rows x NT token tiles, with x from
// ``xs`` (xs.get(j, u, q): the lane's q-th 16 bytes of token 8j + g at step u), kPass of the NT token tiles
// at a time.
template <typename T, Format F, int NT, bool kFull, int kPass, typename XSpan>
__device__ __forceinline__ void compute_group(const GroupLoads& ld, const uint32_t tab[8], int lane, int count,
                                              float c[NT][4], const XSpan& xs) {
  // The four lanes of a row pair need the same scales: lane t decoded those of step s0 + t and the group
  // shares them, one shuffle per value instead of a scale decode per lane and step.
  float sc_lo[kUnroll], sc_hi[kUnroll];
  uint32_t shift_lo[kUnroll], shift_hi[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int src = (lane & ~3) | u;
    sc_lo[u] = __shfl_sync(0xffffffffu, ld.sc_lo, src);
    sc_hi[u] = __shfl_sync(0xffffffffu, ld.sc_hi, src);
    if constexpr (F == Format::kINT4) {
      shift_lo[u] = __shfl_sync(0xffffffffu, ld.shift_lo, src);
      shift_hi[u] = __shfl_sync(0xffffffffu, ld.shift_hi, src);
    } else {
      shift_lo[u] = shift_hi[u] = 0u;
    }
  }
  const uint2* w_lo = ld.w_lo;
  const uint2* w_hi = ld.w_hi;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (!kFull && u >= count) break;  // the same for the whole warp
    uint32_t lo[8], hi[8];
    decode_row<T, F>(w_lo[u], tab, shift_lo[u], lo);
    decode_row<T, F>(w_hi[u], tab, shift_hi[u], hi);
    // C registers 0/1: row g, 2/3: row g+8; the step's scale applied to its fp32 partial sums
    auto scale_into = [&](float cj[4], const float part[4]) {
      cj[0] = fmaf(sc_lo[u], part[0], cj[0]);
      cj[1] = fmaf(sc_lo[u], part[1], cj[1]);
      cj[2] = fmaf(sc_hi[u], part[2], cj[2]);
      cj[3] = fmaf(sc_hi[u], part[3], cj[3]);
    };
    // for mma ks: A from bytes 2ks, 2ks+1 of the rows (rows g, g+8 x columns 2t.., then 2t+8..), B from
    // words 2ks, 2ks+1 of the lane's 8 words of x
    auto mma_step = [&](float part[4], const uint32_t xw[8], int ks) {
      const int p0 = mma_pair_index(ks, 0), p1 = mma_pair_index(ks, 1);
      const uint32_t af[4] = {lo[p0], hi[p0], lo[p1], hi[p1]};
      const uint32_t bf[2] = {xw[p0], xw[p1]};
      mma_16816(part, af, bf, static_cast<const T*>(nullptr));
    };
    // kPass token tiles at a time: their x, then the 4 mma steps over them (independent mmas side by side),
    // then their scales; fewer tiles per pass hold fewer registers of x and partial sums
#pragma unroll
    for (int j0 = 0; j0 < NT; j0 += kPass) {
      uint4 xv[kPass][2];
      float part[kPass][4];
#pragma unroll
      for (int jj = 0; jj < kPass; ++jj) {
        xv[jj][0] = xs.get(j0 + jj, u, 0);
        xv[jj][1] = xs.get(j0 + jj, u, 1);
        part[jj][0] = part[jj][1] = part[jj][2] = part[jj][3] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < kStep / 16; ++ks)
#pragma unroll
        for (int jj = 0; jj < kPass; ++jj) mma_step(part[jj], &xv[jj][0].x, ks);
#pragma unroll
      for (int jj = 0; jj < kPass; ++jj) scale_into(c[j0 + jj], part[jj]);
    }
  }
}

// One group, loaded and computed in turn.
template <typename T, Format F, int NT, bool kFull, typename XSpan>
__device__ __forceinline__ void step_group(const DecodeArgs& a, const uint32_t tab[8], int lane, int s0, int count,
                                           int64_t n_lo, int64_t n_hi, float c[NT][4], const XSpan& xs) {
  compute_group<T, F, NT, kFull, NT>(load_group<T, F, kFull>(a, lane, s0, count, n_lo, n_hi), tab, lane,
                                             count, c, xs);
}

}  // namespace decode
}  // namespace fusedlora
