// Host tests of the NF4 layout helpers in nf4.cuh (the same functions the dequant kernel runs).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "nf4.cuh"
#include "tests/expect.h"

using namespace fusedlora;

static void test_code_table_is_sorted_and_anchored() {
  EXPECT(nf4_value(0) == -1.0f && nf4_value(7) == 0.0f && nf4_value(15) == 1.0f);
  for (uint32_t q = 1; q < 16; ++q) EXPECT(nf4_value(q - 1) < nf4_value(q));
  EXPECT(nf4_value(16 + 3) == nf4_value(3));  // only the low 4 bits count
}

static void test_code_of_flat_elements() {
  // A row of odd K starts in the middle of a byte: element i's code follows the flat index alone.
  std::mt19937 rng(7);
  std::vector<uint8_t> q(97 * 3), bytes((q.size() + 1) / 2, 0);
  for (auto& v : q) v = static_cast<uint8_t>(rng() & 0xF);
  for (size_t i = 0; i < q.size(); ++i) bytes[i / 2] |= static_cast<uint8_t>(i % 2 ? q[i] : q[i] << 4);
  for (int64_t i = 0; i < static_cast<int64_t>(q.size()); ++i) EXPECT(nf4_code_of(bytes[nf4_byte_index(i)], i) == q[i]);
  // and a 16-byte load (4 little-endian words, decoded by word_code) agrees with the per-element path
  uint32_t words[4];
  std::memcpy(words, bytes.data() + 16, sizeof(words));
  for (int e = 0; e < 32; ++e) EXPECT(word_code(words[e / 8], e % 8) == nf4_code_of(bytes[16 + e / 2], e));
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
  test_code_of_flat_elements();
  test_block_indices_of_flat_elements();
  std::printf("test_nf4_layout: ok\n");
  return 0;
}
