// The NF4 dequantize kernel (csrc/dequant_nf4.cu) run through launch_dequantize_nf4 under the host emulator
// (tests/emulator.h): every output must equal, bit for bit, fp32(code[q]·absmax) cast once to the output
// type — plain and double-quantized absmax, fp32/fp16/bf16 outputs, the vector path and the scalar path
// (misaligned buffers), sizes with a partial 32-element tail and more than 256 blocks (several nested
// absmax). Outputs start as NaN and the buffers end on a guard page, so a missed or extra write fails.
#include "tests/emulator.h"  // first: routes the kernel's launch and PTX-only points to the host

#include "dequant_nf4.cu"
#include "tests/expect.h"

#include <cinttypes>
#include <type_traits>

using namespace fusedlora;
using emulate::Buffer;

namespace {

std::mt19937 rng(777);

uint16_t bits_of(__half v) { return static_cast<__half_raw>(v).x; }
uint16_t bits_of(__nv_bfloat16 v) { return static_cast<__nv_bfloat16_raw>(v).x; }
uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}
template <typename T>
T cast(float v);
template <>
float cast<float>(float v) { return v; }
template <>
__half cast<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 cast<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
constexpr OutDtype out_dtype() {
  return std::is_same<T, float>::value ? OutDtype::kFloat32
                                       : std::is_same<T, __half>::value ? OutDtype::kFloat16 : OutDtype::kBFloat16;
}

// misalign: start the packed codes one byte and the output one element past a 16-byte boundary.
template <typename T>
void run_case(int64_t numel, int blocksize, bool double_quant, bool misalign) {
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize, n_nested = (n_blocks + 255) / 256;
  const int64_t n_bytes = (numel + 1) / 2;
  Buffer data(n_bytes + 1, "data"), out(sizeof(T) * (numel + 1), "out");
  Buffer absmax(double_quant ? n_blocks : n_blocks * sizeof(float), "absmax");
  Buffer nested_absmax(n_nested * sizeof(float), "nested_absmax"), nested_code(256 * sizeof(float), "nested_code");
  uint8_t* codes = data.as<uint8_t>() + (misalign ? 1 : 0);
  T* dst = out.as<T>() + (misalign ? 1 : 0);
  for (int64_t i = 0; i < n_bytes; ++i) codes[i] = static_cast<uint8_t>(rng() & 0xFF);
  std::uniform_real_distribution<float> u(0.1f, 2.f), c(-1.f, 1.f);
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (double_quant) {
      absmax.as<uint8_t>()[b] = static_cast<uint8_t>(rng() & 0xFF);
    } else {
      absmax.as<float>()[b] = u(rng);
    }
  }
  for (int64_t i = 0; i < n_nested; ++i) nested_absmax.as<float>()[i] = u(rng);
  for (int i = 0; i < 256; ++i) nested_code.as<float>()[i] = c(rng);
  const float offset = u(rng);
  for (int64_t i = 0; i < numel + 1; ++i) out.as<T>()[i] = cast<T>(NAN);

  DequantNf4Args a{};
  a.data = codes;
  a.absmax = absmax.as<void>();
  a.double_quant = double_quant;
  a.nested_absmax = nested_absmax.as<float>();
  a.nested_code = nested_code.as<float>();
  a.nested_offset = offset;
  a.blocksize = blocksize;
  a.numel = numel;
  a.out = dst;
  a.out_dtype = out_dtype<T>();
  EXPECT(launch_dequantize_nf4(a, nullptr) == cudaSuccess);
  emulate::synchronize();

  for (int64_t i = 0; i < numel; ++i) {
    const int64_t b = i / blocksize;
    float scale;
    if (double_quant) {
      volatile float prod = nested_code.as<float>()[absmax.as<uint8_t>()[b]] * nested_absmax.as<float>()[b / 256];
      scale = prod + offset;
    } else {
      scale = absmax.as<float>()[b];
    }
    const uint8_t byte = codes[i >> 1];
    const float v = nf4_value((i & 1) ? (byte & 0xF) : (byte >> 4)) * scale;
    if (bits_of(dst[i]) != bits_of(cast<T>(v))) {
      std::fprintf(stderr, "numel=%" PRId64 " blocksize=%d dq=%d misalign=%d: element %" PRId64 " differs\n", numel,
                   blocksize, double_quant, misalign, i);
      std::exit(1);
    }
  }
  // The element past the end (aligned case) or before the start (misaligned case) keeps its poison.
  const T untouched = misalign ? out.as<T>()[0] : out.as<T>()[numel];
  EXPECT(bits_of(untouched) == bits_of(cast<T>(NAN)));
}

template <typename T>
void run_sizes() {
  for (int64_t numel : {int64_t(1), int64_t(31), int64_t(33), int64_t(64 * 3 + 17), int64_t(4096 + 40), int64_t(70001)})
    for (int blocksize : {64, 256})
      for (bool dq : {false, true})
        for (bool misalign : {false, true}) run_case<T>(numel, blocksize, dq, misalign);
}

}  // namespace

int main() {
  DequantNf4Args bad{};
  bad.numel = 64;
  bad.blocksize = 48;
  EXPECT(launch_dequantize_nf4(bad, nullptr) == cudaErrorInvalidValue);
  run_sizes<float>();
  run_sizes<__half>();
  run_sizes<__nv_bfloat16>();
  std::printf("ok: dequantize_nf4 equals the reference bit for bit\n");
  return 0;
}
