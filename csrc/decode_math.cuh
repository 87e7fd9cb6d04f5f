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

// prmt.b32 with its full selector: a nibble with bit 3 set gives the sign of the byte it selects,
// replicated (0x00 or 0xFF). The tensor-core decode builds its byte masks with it; __byte_perm documents
// only the low three bits, so the device side is the PTX instruction itself.
FL_HD uint32_t prmt(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const uint64_t pool = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t n = (s >> (4 * i)) & 0xFu;
    uint32_t b = static_cast<uint32_t>(pool >> (8 * (n & 7))) & 0xFFu;
    if (n & 8) b = (b & 0x80u) ? 0xFFu : 0u;
    r |= b << (8 * i);
  }
  return r;
#endif
}

// NF4 block of the element at (row n, column k) of W[N, K]: blocks (2^block_shift elements) run over the
// flattened weight. Block sizes are powers of two, so this is a shift, not a 64-bit division.
// Unsigned shift: no sign fix-up for a value that is never negative.
FL_HD int64_t nf4_block(int64_t n, int64_t k, int64_t K, int block_shift) {
  return static_cast<int64_t>(static_cast<uint64_t>(n * K + k) >> block_shift);
}

// Byte offset of the 16-byte chunk c (elements 32c..32c+31) of row n; K even makes rows whole bytes.
FL_HD int64_t chunk_byte_offset(int64_t n, int64_t c, int64_t K) { return n * (K / 2) + 16 * c; }

// Tensor-core kernel (decode_lora_mma.cu). The reduction over k may run in any order, so each 64-code
// step of a 16-row tile (one NF4 block or INT4 group, or a slice of one) feeds its 4 mmas (ks = 0..3) a
// permuted k order in which every fragment lies in the lane's own loads. Logical column ``col`` (0..15) of
// mma ks is the step's physical code
FL_HD int mma_physical_k(int ks, int col) { return 16 * ((col & 7) >> 1) + 4 * ks + 2 * (col >> 3) + (col & 1); }
// so lane (g, t), whose m16n8k16 fragments hold columns 2t, 2t+1 (A registers 0/1, B register 0) and
// 2t+8, 2t+9 (A registers 2/3, B register 1), needs codes 16t .. 16t+15 of rows g and g+8 — one 8-byte
// load per row — and x[token g][16t .. 16t+15] — two 16-byte loads. Within those, the pair for mma ks
// and ``half`` (0: columns 2t, 2t+1; 1: columns 2t+8, 2t+9) is byte mma_pair_index(ks, half) of the row
// load (high nibble first: the even column) and 32-bit word mma_pair_index(ks, half) of the x span.
FL_HD int mma_pair_index(int ks, int half) { return 2 * ks + half; }

// Register decode of the tensor-core kernel: the 8 codes of a 32-bit word of W become four A-operand
// registers, pair i holding the two codes of byte i (the high nibble, the even element, in the low half).
//
// NF4: the 16 table values, 16-bit (bf16 or fp16), are split into low and high bytes, four entries per
// register: tab[0..3] hold the low bytes of entries 0-3, 4-7, 8-11, 12-15, tab[4..7] the high bytes. A PRMT
// picks one byte per code from 8 entries by the code's low three bits; its bit 3 chooses between the pick
// from entries 0-7 and from 8-15 through a byte mask (a sign-replicating PRMT of the byte holding it), and
// two PRMTs interleave low and high bytes into pairs: 21 instructions for 8 codes, no memory access.
FL_HD uint32_t table_byte_pool(const uint16_t values[16], int r) {
  const int shift = r < 4 ? 0 : 8;
  uint32_t v = 0;
  for (int j = 0; j < 4; ++j) v |= static_cast<uint32_t>((values[4 * (r & 3) + j] >> shift) & 0xFFu) << (8 * j);
  return v;
}
// One byte per code for the four codes whose low three bits are the selector nibbles of ``sel``; ``m`` has
// 0xFF where the code is 8 or more.
FL_HD uint32_t table_bytes(const uint32_t pool[4], uint32_t sel, uint32_t m) {
  const uint32_t low = prmt(pool[0], pool[1], sel), high = prmt(pool[2], pool[3], sel);
  return (low & ~m) | (high & m);
}
FL_HD void decode_nf4_word(uint32_t w, const uint32_t tab[8], uint32_t pair[4]) {
  // Selector nibbles of bytes 0-1 are codes [1, 0, 3, 2] (low nibble first), of bytes 2-3 codes [5, 4, 7, 6].
  const uint32_t sel = w & 0x77777777u, sel_hi = sel >> 16;
  // Bit 3 of an even code is its byte's bit 7, of an odd code bit 3 (bit 7 of w << 4): replicated to masks
  // in the selectors' code order.
  const uint32_t w4 = w << 4;
  const uint32_t m_lo = prmt(w, w4, 0x9D8Cu), m_hi = prmt(w, w4, 0xBFAEu);
  for (int h = 0; h < 2; ++h) {
    const uint32_t s = h ? sel_hi : sel, m = h ? m_hi : m_lo;
    const uint32_t lo = table_bytes(tab, s, m), hi = table_bytes(tab + 4, s, m);
    pair[2 * h] = prmt(lo, hi, 0x4051u);      // codes 0, 1 of the half: bytes 1 and 0 of lo/hi
    pair[2 * h + 1] = prmt(lo, hi, 0x6273u);  // codes 2, 3: bytes 3 and 2
  }
}

// INT4: pair i = {magic | code, magic | code} as 16-bit patterns, where ``magic2`` (both halves) is a power
// of two whose low mantissa bits are free (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400): the halves are
// magic + q exactly, and one packed subtraction of magic + zero gives q - zero, exact in either type.
FL_HD void int4_magic_word(uint32_t w, uint32_t magic2, uint32_t pair[4]) {
  const uint32_t even = (w >> 4) & 0x0F0F0F0Fu, odd = w & 0x0F0F0F0Fu;
  for (int i = 0; i < 4; ++i) {
    // bytes: even[i], 0 (the sign of a code byte: 0), odd[i], 0
    const uint32_t s = static_cast<uint32_t>(i) | (8u | i) << 4 | (4u + i) << 8 | (8u | i) << 12;
    pair[i] = prmt(even, odd, s) | magic2;
  }
}

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
FL_HD int64_t nf4_nested_index(int64_t block) { return static_cast<int64_t>(static_cast<uint64_t>(block) >> 8); }

// absmax of a double-quantized NF4 block: nested_code[qa] * nested_absmax[block / 256] + offset, each
// product and sum rounded to fp32 separately (the order of the reference dequantization).
FL_HD float dq_absmax(const uint8_t* qa, const float* nested_absmax, const float* nested_code, float offset,
                      int64_t block) {
  return add_rn(mul_rn(nested_code[qa[block]], nested_absmax[nf4_nested_index(block)]), offset);
}

}  // namespace fusedlora
