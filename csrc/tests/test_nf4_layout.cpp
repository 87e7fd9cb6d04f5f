// Host tests of the NF4 layout helpers in nf4.cuh (the same functions the dequant kernel runs).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "nf4.cuh"

using namespace fusedlora;

// Always on (assert disappears in a Release build).
#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

static void test_code_table_is_sorted_and_anchored() {
  EXPECT(nf4_value(0) == -1.0f && nf4_value(7) == 0.0f && nf4_value(15) == 1.0f);
  for (uint32_t q = 1; q < 16; ++q) EXPECT(nf4_value(q - 1) < nf4_value(q));
  EXPECT(nf4_value(16 + 3) == nf4_value(3));  // only the low 4 bits count
}

static void test_16_byte_load_decodes_element_order() {
  // Pack codes as stored (byte j = q[2j] << 4 | q[2j+1]), read the 16 bytes as four little-endian
  // words like the kernel's uint4 load, and check every element comes back in order.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    uint8_t q[32], bytes[16];
    for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(rng() & 0xF);
    for (int j = 0; j < 16; ++j) bytes[j] = static_cast<uint8_t>((q[2 * j] << 4) | q[2 * j + 1]);
    uint32_t words[4];
    std::memcpy(words, bytes, sizeof(words));
    for (int w = 0; w < 4; ++w) {
      uint32_t codes[8];
      nf4_unpack_word(words[w], codes);
      for (int j = 0; j < 8; ++j) EXPECT(codes[j] == q[8 * w + j]);
    }
    for (int64_t i = 0; i < 32; ++i) EXPECT(nf4_code_of(bytes[nf4_byte_index(i)], i) == q[i]);
  }
}

static void test_block_indices_of_flat_elements() {
  // W[N, K] with odd K: blocks cross rows and rows start mid-byte; indices follow the flat element.
  const int64_t n = 59, k = 97, numel = n * k;
  EXPECT(nf4_num_bytes(numel) == 2862);
  for (int blocksize : {64, 128, 256}) {
    EXPECT(nf4_num_blocks(numel, blocksize) == (numel + blocksize - 1) / blocksize);
    for (int64_t row = 0; row < n; ++row) {
      const int64_t i = row * k + (k - 1);  // the last element of each row
      EXPECT(nf4_block_index(i, blocksize) == i / blocksize);
      EXPECT(nf4_byte_index(i) == i / 2);
    }
    // a 32-element aligned chunk never straddles two blocks: one absmax per 16-byte load
    for (int64_t c = 0; c < numel / kElementsPer16B; ++c) {
      const int64_t first = c * kElementsPer16B;
      EXPECT(nf4_block_index(first, blocksize) == nf4_block_index(first + kElementsPer16B - 1, blocksize));
    }
  }
  EXPECT(nf4_nested_index(255) == 0 && nf4_nested_index(256) == 1);
}

int main() {
  test_code_table_is_sorted_and_anchored();
  test_16_byte_load_decodes_element_order();
  test_block_indices_of_flat_elements();
  std::printf("test_nf4_layout: ok\n");
  return 0;
}
