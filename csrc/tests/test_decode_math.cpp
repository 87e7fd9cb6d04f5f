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
  // The tensor-core kernel's k order: every mma ks takes 16 distinct codes of the 64-code step, all
  // 4 mmas together take each code once, and a lane's A pair (byte of its row load) and B pair (word of
  // its x span) for the same logical columns are the same two physical codes.
  constexpr int kMmas = 4, kCodes = 64;
  for (int ks = 0; ks < kMmas; ++ks) {
    bool seen[kCodes] = {};
    for (int col = 0; col < 16; ++col) {
      const int k = mma_physical_k(ks, col);
      EXPECT(k >= 0 && k < kCodes && !seen[k]);
      seen[k] = true;
    }
  }
  bool covered[kCodes] = {};
  for (int ks = 0; ks < kMmas; ++ks)
    for (int col = 0; col < 16; ++col) covered[mma_physical_k(ks, col)] = true;
  for (bool c : covered) EXPECT(c);
  for (int t = 0; t < 4; ++t)
    for (int ks = 0; ks < kMmas; ++ks)
      for (int half = 0; half < 2; ++half) {
        const int col = 2 * t + 8 * half;  // the pair's even column; the odd one follows it
        // Byte p of the lane's 8-byte row load holds codes 16t + 2p (high nibble) and 16t + 2p + 1; word p of
        // its x span holds x[16t + 2p] (low half) and x[16t + 2p + 1]: both start at the same physical code.
        const int first = 16 * t + 2 * mma_pair_index(ks, half);
        EXPECT(first == mma_physical_k(ks, col) && first + 1 == mma_physical_k(ks, col + 1));
      }
}

static void test_prmt_sign_replication() {
  // Selector nibbles 0-7 pick bytes like byte_perm; with bit 3 set, the picked byte's sign fills the byte.
  const uint32_t x = 0x80017F02u, y = 0xFF00C033u;
  EXPECT(prmt(x, y, 0x3210u) == x && prmt(x, y, 0x7654u) == y);
  EXPECT(prmt(x, y, 0x8888u) == 0x00000000u);  // byte 0 of x (0x02): positive
  EXPECT(prmt(x, y, 0xBBBBu) == 0xFFFFFFFFu);  // byte 3 of x (0x80): negative
  EXPECT(prmt(x, y, 0xF9D0u) == 0xFF00FF02u);  // y.b3 (0xFF) -, x.b1 (0x7F) +, y.b1 (0xC0) -, plain x.b0
  std::mt19937 rng(99);
  for (int trial = 0; trial < 1000; ++trial) {  // without bit 3 the two agree
    const uint32_t a = static_cast<uint32_t>(rng()), b = static_cast<uint32_t>(rng());
    const uint32_t sel = static_cast<uint32_t>(rng()) & 0x7777u;
    EXPECT(prmt(a, b, sel) == byte_perm(a, b, sel));
  }
}

static void test_register_decode() {
  // decode_nf4_word against a direct lookup, for random 16-bit tables and every code in every position:
  // pair i of a word holds table[high nibble of byte i] in its low half and table[low nibble] in its high half.
  std::mt19937 rng(2027);
  for (int trial = 0; trial < 2000; ++trial) {
    uint16_t values[16];
    for (uint16_t& v : values) v = static_cast<uint16_t>(rng());
    if (trial == 0)
      for (int q = 0; q < 16; ++q) values[q] = static_cast<uint16_t>(0x8080u | (q << 8) | q);  // sign bits set
    uint32_t tab[8];
    for (int r = 0; r < 8; ++r) tab[r] = table_byte_pool(values, r);
    const uint32_t w = trial < 16 ? 0x11111111u * static_cast<uint32_t>(trial) : static_cast<uint32_t>(rng());
    uint32_t pair[4];
    decode_nf4_word(w, tab, pair);
    for (int i = 0; i < 4; ++i) {
      EXPECT((pair[i] & 0xFFFFu) == values[word_code(w, 2 * i)]);
      EXPECT((pair[i] >> 16) == values[word_code(w, 2 * i + 1)]);
    }
    // INT4: the same layout with magic | code in each half.
    for (uint32_t magic : {0x43004300u, 0x64006400u}) {
      int4_magic_word(w, magic, pair);
      for (int i = 0; i < 4; ++i) {
        EXPECT((pair[i] & 0xFFFFu) == ((magic & 0xFFFFu) | word_code(w, 2 * i)));
        EXPECT((pair[i] >> 16) == ((magic >> 16) | word_code(w, 2 * i + 1)));
      }
    }
  }
}

int main() {
  test_word_code_matches_byte_layout();
  test_table_offsets();
  test_offsets();
  test_dq_absmax();
  test_mma_permutation();
  test_prmt_sign_replication();
  test_register_decode();
  std::printf("decode_math: all tests passed\n");
  return 0;
}
