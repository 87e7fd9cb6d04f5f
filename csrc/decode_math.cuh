// Index and unpacking helpers of the decode kernel, shared by device code and the host tests.
//
// A 16-byte load of a 4-bit row holds 32 consecutive elements of that row (K must be a multiple of 32,
// so the load is aligned and never straddles two rows). Word w (0..3) of the load holds elements
// 8w..8w+7; byte b of the word (little-endian) holds elements 2b (high nibble) and 2b+1 (low nibble).
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace fusedlora {

// Code of element e (0..7) of a 32-bit word holding 8 packed elements.
FL_HD uint32_t word_code(uint32_t word, int e) {
  const uint32_t byte = (word >> (8 * (e >> 1))) & 0xFFu;
  return (e & 1) ? (byte & 0xFu) : (byte >> 4);
}

// NF4 block of the element at (row n, column k) of W[N, K]: blocks run over the flattened weight.
FL_HD int64_t nf4_block(int64_t n, int64_t k, int64_t K, int blocksize) { return (n * K + k) / blocksize; }

// Byte offset of the 16-byte chunk c (elements 32c..32c+31) of row n; K even makes rows whole bytes.
FL_HD int64_t chunk_byte_offset(int64_t n, int64_t c, int64_t K) { return n * (K / 2) + 16 * c; }

// absmax of a double-quantized NF4 block: nested_code[qa] * nested_absmax[block / 256] + offset, each
// product and sum rounded to fp32 separately (the order of the reference dequantization).
FL_HD float dq_absmax(const uint8_t* qa, const float* nested_absmax, const float* nested_code, float offset,
                      int64_t block) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(nested_code[qa[block]], nested_absmax[block / 256]), offset);
#else
  volatile float prod = nested_code[qa[block]] * nested_absmax[block / 256];
  return prod + offset;
#endif
}

}  // namespace fusedlora
