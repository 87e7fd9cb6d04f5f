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

static void test_offsets() {
  // Row n of W[N, K] starts at byte n*K/2; chunk c covers elements 32c..32c+31 of that row.
  EXPECT(chunk_byte_offset(0, 0, 4096) == 0);
  EXPECT(chunk_byte_offset(3, 2, 4096) == 3 * 2048 + 32);
  // int64: row 40000 of a 14336-wide weight is past 2^28 bytes; element index past 2^31.
  EXPECT(chunk_byte_offset(200000, 1, 14336) == int64_t(200000) * 7168 + 16);
  EXPECT(nf4_block(1, 0, 96, 64) == 1);    // element 96 of the flat weight
  EXPECT(nf4_block(1, 32, 96, 64) == 2);   // element 128
  EXPECT(nf4_block(200000, 0, 14336, 64) == int64_t(200000) * 14336 / 64);
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

int main() {
  test_word_code_matches_byte_layout();
  test_offsets();
  test_dq_absmax();
  std::printf("decode_math: all tests passed\n");
  return 0;
}
