// Host tests of the decode kernel's unpacking and indexing helpers (the same functions run on the device).
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "decode_math.cuh"
#include "tests/expect.h"

using namespace fusedlora;

static void test_word_code_matches_byte_layout() {
  // Pack 32 random codes the way the weights are stored (byte j = q[2j] << 4 | q[2j+1]), load them as
  // four little-endian 32-bit words like the kernel's 16-byte load, and decode every element back.
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 100; ++trial) {
    uint8_t q[32], bytes[16];
    for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(rng() & 0xF);
    for (int j = 0; j < 16; ++j) bytes[j] = static_cast<uint8_t>((q[2 * j] << 4) | q[2 * j + 1]);
    uint32_t words[4];
    std::memcpy(words, bytes, sizeof(words));
    for (int w = 0; w < 4; ++w)
      for (int e = 0; e < 8; ++e) EXPECT(word_code(words[w], e) == q[8 * w + e]);
  }
}

static void test_table_offsets() {
  // __byte_perm as CUDA defines it: selector nibbles 0-3 pick x's bytes, 4-7 y's.
  EXPECT(byte_perm(0x03020100u, 0x07060504u, 0x3210u) == 0x03020100u);
  EXPECT(byte_perm(0x03020100u, 0x07060504u, 0x7654u) == 0x07060504u);
  EXPECT(byte_perm(0x44332211u, 0u, 0x4442u) == 0x33u);
  // Every code's table offset, picked from the two masked words, is 4 x its code.
  std::mt19937 rng(4321);
  for (int trial = 0; trial < 1000; ++trial) {
    const uint32_t word = static_cast<uint32_t>(rng());
    for (int e = 0; e < 8; ++e)
      EXPECT(table_entry_address(0u, nibble_offsets(word, e & 1), e >> 1) == 4 * word_code(word, e));
    // With a (256-byte aligned) table base merged in by the same PRMT.
    const uint32_t base = static_cast<uint32_t>(rng()) & ~0xFFu;
    for (int e = 0; e < 8; ++e)
      EXPECT(table_entry_address(base, nibble_offsets(word, e & 1), e >> 1) == base + 4 * word_code(word, e));
  }
}

static void test_offsets() {
  // Row n of W[N, K] starts at byte n*K/2; chunk c covers elements 32c..32c+31 of that row.
  EXPECT(chunk_byte_offset(0, 0, 4096) == 0);
  EXPECT(chunk_byte_offset(3, 2, 4096) == 3 * 2048 + 32);
  // int64: row 40000 of a 14336-wide weight is past 2^28 bytes; element index past 2^31.
  EXPECT(chunk_byte_offset(200000, 1, 14336) == int64_t(200000) * 7168 + 16);
  EXPECT(nf4_block(1, 0, 96, 6) == 1);    // element 96 of the flat weight, blocks of 64
  EXPECT(nf4_block(1, 32, 96, 6) == 2);   // element 128
  EXPECT(nf4_block(200000, 0, 14336, 6) == int64_t(200000) * 14336 / 64);
}

static void test_dq_absmax() {
  std::vector<float> code(256), nested(3);
  for (int i = 0; i < 256; ++i) code[i] = (i - 128) / 127.0f;
  nested = {0.5f, 2.0f, 4.0f};
  std::vector<uint8_t> qa(600);
  for (int i = 0; i < 600; ++i) qa[i] = static_cast<uint8_t>((i * 37) & 0xFF);
  const float offset = 0.125f;
  for (int64_t b : {int64_t(0), int64_t(255), int64_t(256), int64_t(599)}) {
    const float want = code[qa[b]] * nested[b / 256] + offset;
    EXPECT(dq_absmax(qa.data(), nested.data(), code.data(), offset, b) == want);
  }
}

static void test_mma_permutation() {
  // The tensor-core kernel's k order: every mma ks takes 16 distinct codes of the 128-code step, all
  // 8 mmas together take each code once, and a lane's A pair (byte of its row load) and B pair (word of
  // its x span) for the same logical columns are the same two physical codes.
  for (int ks = 0; ks < 8; ++ks) {
    bool seen[128] = {};
    for (int col = 0; col < 16; ++col) {
      const int k = mma_physical_k(ks, col);
      EXPECT(k >= 0 && k < 128 && !seen[k]);
      seen[k] = true;
    }
  }
  bool covered[128] = {};
  for (int ks = 0; ks < 8; ++ks)
    for (int col = 0; col < 16; ++col) covered[mma_physical_k(ks, col)] = true;
  for (bool c : covered) EXPECT(c);
  for (int t = 0; t < 4; ++t)
    for (int ks = 0; ks < 8; ++ks)
      for (int half = 0; half < 2; ++half) {
        const int col = 2 * t + 8 * half;  // the pair's even column; the odd one follows it
        // Byte p of the lane's row load holds codes 32t + 2p (high nibble) and 32t + 2p + 1; word p of its x
        // span holds x[32t + 2p] (low half) and x[32t + 2p + 1]: both start at the same physical code.
        const int first = 32 * t + 2 * mma_pair_index(ks, half);
        EXPECT(first == mma_physical_k(ks, col) && first + 1 == mma_physical_k(ks, col + 1));
      }
}

int main() {
  test_word_code_matches_byte_layout();
  test_table_offsets();
  test_offsets();
  test_dq_absmax();
  test_mma_permutation();
  std::printf("decode_math: all tests passed\n");
  return 0;
}
