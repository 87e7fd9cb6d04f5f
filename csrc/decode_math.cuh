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

// Byte offsets (4·code) into a 16-entry fp32 table for the 8 codes of a word, two masks per word: byte b
// of nibble_offsets(word, 0) is the offset of element 2b (the high nibble of byte b), byte b of
// nibble_offsets(word, 1) that of element 2b + 1. One byte pick per code (table_entry_address) then
// addresses the table.
FL_HD uint32_t nibble_offsets(uint32_t word, int odd) { return (odd ? word << 2 : word >> 2) & 0x3C3C3C3Cu; }

// __byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8 bytes {y:x} (x the low four).
// The host version follows that definition, so the selectors below are tested off the device too.
FL_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t pool = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((pool >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  return r;
#endif
}

// NF4 block of the element at (row n, column k) of W[N, K]: blocks (2^block_shift elements) run over the
// flattened weight. Block sizes are powers of two, so this is a shift, not a 64-bit division.
FL_HD int64_t nf4_block(int64_t n, int64_t k, int64_t K, int block_shift) { return (n * K + k) >> block_shift; }

// Byte offset of the 16-byte chunk c (elements 32c..32c+31) of row n; K even makes rows whole bytes.
FL_HD int64_t chunk_byte_offset(int64_t n, int64_t c, int64_t K) { return n * (K / 2) + 16 * c; }

// Tensor-core kernel (decode_lora_mma.cu). The reduction over k may run in any order, so each 128-code
// step of a 16-row tile feeds its 8 mmas (ks = 0..7) a permuted k order in which every fragment lies in
// the lane's own loads. Logical column ``col`` (0..15) of mma ks is the step's physical code
FL_HD int mma_physical_k(int ks, int col) { return 32 * ((col & 7) >> 1) + 4 * ks + 2 * (col >> 3) + (col & 1); }
// so lane (g, t), whose m16n8k16 fragments hold columns 2t, 2t+1 (A registers 0/1, B register 0) and
// 2t+8, 2t+9 (A registers 2/3, B register 1), needs codes 32t .. 32t+31 of rows g and g+8 — one 16-byte
// load per row — and x[token g][32t .. 32t+31] — four 16-byte loads. Within those, the pair for mma ks
// and ``half`` (0: columns 2t, 2t+1; 1: columns 2t+8, 2t+9) is byte mma_pair_index(ks, half) of the row
// load (high nibble first: the even column) and 32-bit word mma_pair_index(ks, half) of the x span.
FL_HD int mma_pair_index(int ks, int half) { return 2 * ks + half; }

// The shared-memory address of a table entry in one PRMT: byte b of ``offsets`` as the low byte, the upper
// three bytes of the table's address (256-byte aligned, so its low byte is zero) above it.
FL_HD uint32_t table_entry_address(uint32_t table_base, uint32_t offsets, int b) {
  return byte_perm(offsets, table_base, 0x7650u | static_cast<uint32_t>(b));
}

// fp32 product and sum rounded separately (never contracted into an FMA), on the device and the host alike.
FL_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;
  return p;
#endif
}
FL_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float s = a + b;
  return s;
#endif
}

// Nested block of NF4 block b: double quantization scales 256 absmax codes with one nested absmax.
FL_HD int64_t nf4_nested_index(int64_t block) { return block / 256; }

// absmax of a double-quantized NF4 block: nested_code[qa] * nested_absmax[block / 256] + offset, each
// product and sum rounded to fp32 separately (the order of the reference dequantization).
FL_HD float dq_absmax(const uint8_t* qa, const float* nested_absmax, const float* nested_code, float offset,
                      int64_t block) {
  return add_rn(mul_rn(nested_code[qa[block]], nested_absmax[nf4_nested_index(block)]), offset);
}

}  // namespace fusedlora
