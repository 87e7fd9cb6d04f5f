// NF4 layout helpers shared by the CUDA kernels and the host-side tests (plain C++ outside nvcc).
//
// W[N, K] is flattened row-major, i = n*K + k. Byte i >> 1 holds two codes, the even element in the
// HIGH nibble. Element i is scaled by absmax[i / blocksize]; with double quantization that absmax is
//     absmax[b] = nested_code[qa[b]] * nested_absmax[b / 256] + offset     (two fp32 roundings, no FMA)
// A 16-byte load covers 32 elements; blocksize (64, 128, 256) is a multiple of 32, so a 16-byte
// aligned load never straddles two blocks: one absmax per load.
// The unpacking of a 32-bit word (word_code) and the double-quant absmax (dq_absmax) are shared with the
// decode kernel and live in decode_math.cuh.
#pragma once

#include <cstdint>

#include "decode_math.cuh"

namespace fusedlora {

constexpr int kElementsPer16B = 32;

// The 16 NF4 values (bitsandbytes' table), as a function so device code needs no constant array.
FL_HD float nf4_value(uint32_t q) {
  switch (q & 0xF) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// Code of flat element i given its byte.
FL_HD uint32_t nf4_code_of(uint8_t byte, int64_t i) { return (i & 1) ? (byte & 0xFu) : (byte >> 4); }

FL_HD int64_t nf4_byte_index(int64_t i) { return i >> 1; }
FL_HD int64_t nf4_block_index(int64_t i, int blocksize) { return i / blocksize; }
FL_HD int64_t nf4_num_bytes(int64_t numel) { return (numel + 1) >> 1; }
FL_HD int64_t nf4_num_blocks(int64_t numel, int blocksize) { return (numel + blocksize - 1) / blocksize; }

}  // namespace fusedlora
