// The decode kernels (csrc/decode_lora.cu: x·Aᵀ pre-pass + CUDA-core GEMV; decode_lora_mma.cu: tensor-core
// kernel) run through their host entry point, fusedlora::decode_lora, under the host emulator
// (tests/emulator.h) and are compared with float64 math: NF4 (plain and double-quantized absmax) and INT4,
// bf16 and fp16, M = 1..16 on both main kernels and M = 17..48 (2 to 6 token tiles, odd M on each side of a
// tile) on the tensor-core kernel, odd N, K that leave the tensor-core kernel's warps
// uneven or idle, with and without bias. Outputs and the xa workspace start as NaN, so an element left
// unwritten, or xa read before the pre-pass wrote it, fails the comparison. Inputs are fresh random draws
// on every run (the seed is printed; FUSEDLORA_TEST_SEED=<seed> repeats a run).
//
// The bound (DESIGN.md, numerics of the fast paths): each weight element the kernels multiply may sit up to
// one ulp of T from its exact value (the tensor-core kernel holds the NF4 table rounded to T and applies the
// block scale to fp32 partial sums), so y may differ from the float64 result by Σ_k |x_k|·ulp_T(w_k), plus
// fp32 accumulation and one rounding into T. The bound is per output element, so it is the same for every M:
// a token tile adds columns, never terms to an element's sum.
#include "tests/emulator.h"  // first: routes the kernels' launches and PTX-only points to the host

#include "decode_lora.cu"
#include "decode_lora_mma.cu"
#include "decode_lora_wide.cu"
#include "nf4.cuh"
#include "tests/expect.h"

#include <cinttypes>

using namespace fusedlora;
using emulate::Buffer;

namespace {

enum class Format { kNF4, kNF4DoubleQuant, kINT4 };

const char* format_name(Format f) {
  return f == Format::kNF4 ? "nf4" : f == Format::kNF4DoubleQuant ? "nf4-dq" : "int4";
}

template <typename T>
struct Dtype;
template <>
struct Dtype<__nv_bfloat16> {
  static constexpr Act act = Act::kBF16;
  static constexpr double unit_roundoff = 0x1p-8;  // 8 significant bits
  static constexpr int min_exponent = -126;        // of a normal number; below it the ulp stays 2^(-126-7)
  static constexpr const char* name = "bf16";
  static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Dtype<__half> {
  static constexpr Act act = Act::kFP16;
  static constexpr double unit_roundoff = 0x1p-11;  // 11 significant bits
  static constexpr int min_exponent = -14;
  static constexpr const char* name = "fp16";
  static __half from(float v) { return __float2half_rn(v); }
  static float to(__half v) { return __half2float(v); }
};

struct Case {
  Format format;
  int M, N, K, block, r;
  bool bias;
  int mma_min_m;
  bool overlap;  // main kernel launched as a programmatic dependent of the pre-pass (sm_90) or after it
  int wide_min_m = kGemvMaxM + 1;  // M from which the 128-row kernel runs
  int splits = 1;                  // its K split over blocks
};

uint32_t test_seed() {
  const char* env = std::getenv("FUSEDLORA_TEST_SEED");
  return env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10)) : std::random_device{}();
}
const uint32_t seed = test_seed();
std::mt19937 rng(seed);

// One ulp of T at |v| (2 x the unit roundoff of v's binade; the subnormal spacing below the normal range).
template <typename T>
double ulp(double v) {
  const int e = std::max(std::ilogb(v == 0.0 ? 0x1p-200 : v), Dtype<T>::min_exponent);
  return std::ldexp(2.0 * Dtype<T>::unit_roundoff, e);
}

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
float normal() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

template <typename T>
void fill_normal(const Buffer& b, size_t count, float std) {
  for (size_t i = 0; i < count; ++i) b.as<T>()[i] = Dtype<T>::from(std * normal());
}

// The dequantized weight as the kernels define it, in fp32 (code·absmax or (q - zero)·scale, one rounding).
std::vector<float> reference_weight(const Case& c, const Buffer& w, const Buffer* absmax, const Buffer* absmax_q,
                                    const Buffer* nested_absmax, const Buffer* nested_code, float offset,
                                    const Buffer* scales, const Buffer* zeros) {
  std::vector<float> out(static_cast<size_t>(c.N) * c.K);
  const uint8_t* bytes = w.as<uint8_t>();
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t i = n * c.K + k;
      const uint32_t q = nf4_code_of(bytes[nf4_byte_index(i)], i);  // same nibble order for INT4 rows
      float v;
      if (c.format == Format::kINT4) {
        const int64_t g = n * (c.K / c.block) + k / c.block;
        volatile float centered = static_cast<float>(q) - static_cast<float>(zeros->as<uint8_t>()[g]);
        v = centered * scales->as<float>()[g];
      } else {
        const int64_t b = i / c.block;
        float am;
        if (c.format == Format::kNF4) {
          am = absmax->as<float>()[b];
        } else {
          const float code_value = nested_code->as<float>()[absmax_q->as<uint8_t>()[b]];
          volatile float prod = code_value * nested_absmax->as<float>()[b / 256];
          am = prod + offset;
        }
        v = nf4_value(q) * am;
      }
      out[i] = v;
    }
  return out;
}

template <typename T>
void run_case(const Case& c) {
  using D = Dtype<T>;
  const int64_t NK = static_cast<int64_t>(c.N) * c.K;
  const int64_t n_blocks = (NK + c.block - 1) / c.block;
  const bool tensor_cores = c.M >= c.mma_min_m && c.K % kMmaStep == 0 && c.block % kMmaStep == 0;  // decode_lora's

  Buffer x(sizeof(T) * c.M * c.K, "x"), w(NK / 2, "w"), A(sizeof(T) * c.r * c.K, "A"), B(sizeof(T) * c.N * c.r, "B");
  Buffer bias(sizeof(T) * c.N, "bias"), xa(sizeof(float) * c.M * c.r, "xa"), y(sizeof(T) * c.M * c.N, "y");
  Buffer code(16 * sizeof(float), "code");
  std::unique_ptr<Buffer> absmax, absmax_q, nested_absmax, nested_code, scales, zeros;
  float offset = 0.f;

  fill_normal<T>(x, c.M * c.K, 1.f);
  fill_normal<T>(A, c.r * c.K, 1.f / std::sqrt(static_cast<float>(c.K)));
  fill_normal<T>(B, c.N * c.r, 1.f);
  fill_normal<T>(bias, c.N, 1.f);
  for (int64_t i = 0; i < NK / 2; ++i) w.as<uint8_t>()[i] = static_cast<uint8_t>(rng() & 0xFF);
  for (int i = 0; i < 16; ++i) code.as<float>()[i] = nf4_value(i);
  if (c.format == Format::kNF4) {
    absmax = std::make_unique<Buffer>(n_blocks * sizeof(float), "absmax");
    for (int64_t b = 0; b < n_blocks; ++b) absmax->as<float>()[b] = uniform(0.25f, 2.f);
  } else if (c.format == Format::kNF4DoubleQuant) {
    absmax_q = std::make_unique<Buffer>(n_blocks, "absmax_q");
    nested_absmax = std::make_unique<Buffer>(((n_blocks + 255) / 256) * sizeof(float), "nested_absmax");
    nested_code = std::make_unique<Buffer>(256 * sizeof(float), "nested_code");
    for (int64_t b = 0; b < n_blocks; ++b) absmax_q->as<uint8_t>()[b] = static_cast<uint8_t>(rng() & 0xFF);
    for (int64_t b = 0; b < (n_blocks + 255) / 256; ++b) nested_absmax->as<float>()[b] = uniform(0.2f, 0.5f);
    for (int i = 0; i < 256; ++i) nested_code->as<float>()[i] = uniform(-1.f, 1.f);
    offset = uniform(0.8f, 1.2f);
  } else {
    const int64_t groups = NK / c.block;
    scales = std::make_unique<Buffer>(groups * sizeof(float), "scales");
    zeros = std::make_unique<Buffer>(groups, "zeros");
    for (int64_t g = 0; g < groups; ++g) {
      scales->as<float>()[g] = uniform(0.01f, 0.2f);
      zeros->as<uint8_t>()[g] = static_cast<uint8_t>(rng() & 0xF);
    }
  }
  for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.r; ++i) xa.as<float>()[i] = NAN;
  for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.N; ++i) y.as<T>()[i] = D::from(NAN);
  const std::vector<char> w_before(w.as<char>(), w.as<char>() + w.bytes());
  const std::vector<char> x_before(x.as<char>(), x.as<char>() + x.bytes());

  DecodeArgs a{};
  a.x = x.as<void>();
  a.ldx = c.K;
  a.w = w.as<uint8_t>();
  a.absmax = absmax ? absmax->as<float>() : nullptr;
  a.absmax_q = absmax_q ? absmax_q->as<uint8_t>() : nullptr;
  a.nested_absmax = nested_absmax ? nested_absmax->as<float>() : nullptr;
  a.nested_code = nested_code ? nested_code->as<float>() : nullptr;
  a.nested_offset = offset;
  a.code = code.as<float>();
  a.scales = scales ? scales->as<float>() : nullptr;
  a.zeros = zeros ? zeros->as<uint8_t>() : nullptr;
  a.block = c.block;
  a.A = A.as<void>();
  a.B = B.as<void>();
  a.bias = c.bias ? bias.as<void>() : nullptr;
  a.xa = xa.as<float>();
  a.y = y.as<void>();
  a.M = c.M;
  a.N = c.N;
  a.K = c.K;
  a.r = c.r;
  a.scale = uniform(0.5f, 2.f);
  a.mma_min_m = c.mma_min_m;
  a.overlap = c.overlap ? 1 : 0;
  a.wide_min_m = c.wide_min_m;
  a.splits = c.splits;
  // the 128-row kernel's split: partials start as NaN (a slice left unwritten shows), counters at 0
  const int counters = (c.N + kDecodeWideRows - 1) / kDecodeWideRows;
  Buffer partials(sizeof(float) * c.splits * c.M * c.N, "partials"), tickets(sizeof(int) * counters, "tickets");
  for (int64_t i = 0; i < static_cast<int64_t>(c.splits) * c.M * c.N; ++i) partials.as<float>()[i] = NAN;
  for (int i = 0; i < counters; ++i) tickets.as<int>()[i] = 0;
  a.partials = partials.as<float>();
  a.tickets = tickets.as<int>();
  const Scheme scheme = c.format == Format::kINT4 ? Scheme::kINT4 : Scheme::kNF4;
  EXPECT(decode_lora(a, D::act, scheme, nullptr) == cudaSuccess);
  emulate::synchronize();
  for (int i = 0; i < counters; ++i) EXPECT(tickets.as<int>()[i] == 0);  // each launch leaves them at 0
  const bool wide = tensor_cores && (c.M > kGemvMaxM || c.M >= c.wide_min_m);

  // Float64 reference on the exact weight (the fp32 dequantization, bit-exact with bitsandbytes).
  const std::vector<float> wf = reference_weight(c, w, absmax.get(), absmax_q.get(), nested_absmax.get(),
                                                 nested_code.get(), offset, scales.get(), zeros.get());
  auto xv = [&](int m, int k) { return static_cast<double>(D::to(x.as<T>()[static_cast<int64_t>(m) * c.K + k])); };
  double worst = 0.0;
  for (int m = 0; m < c.M; ++m) {
    std::vector<double> xa_ref(c.r), xa_abs(c.r);
    for (int j = 0; j < c.r; ++j) {
      for (int k = 0; k < c.K; ++k) {
        const double p = xv(m, k) * D::to(A.as<T>()[static_cast<int64_t>(j) * c.K + k]);
        xa_ref[j] += p;
        xa_abs[j] += std::fabs(p);
      }
      // The pre-pass sums K fp32 products (exact: 2 x 11 bits) in some order: error <= K·2^-24·Σ|p|.
      const double xa_err = std::fabs(xa.as<float>()[m * c.r + j] - xa_ref[j]);
      EXPECT(xa_err <= c.K * 0x1p-24 * xa_abs[j] + 1e-30);
    }
    for (int n = 0; n < c.N; ++n) {
      double base = 0.0, magnitude = 0.0, weight_rounding = 0.0;
      for (int k = 0; k < c.K; ++k) {
        const double wk = wf[static_cast<int64_t>(n) * c.K + k];
        base += xv(m, k) * wk;
        magnitude += std::fabs(xv(m, k) * wk);
        weight_rounding += std::fabs(xv(m, k)) * ulp<T>(wk);  // the one-ulp rule, element by element
      }
      double lora = 0.0, lora_magnitude = 0.0;
      for (int j = 0; j < c.r; ++j) {
        const double bj = D::to(B.as<T>()[static_cast<int64_t>(n) * c.r + j]);
        lora += xa_ref[j] * bj;
        lora_magnitude += xa_abs[j] * std::fabs(bj);
      }
      const double b = c.bias ? D::to(bias.as<T>()[n]) : 0.0;
      const double expected = base + a.scale * lora + b;
      // Weights within one ulp of T each (weight_rounding); fp32 accumulation of K (+ r + bias) terms in any
      // order, plus one fp32 product by the block scale per 64-code step: <= (K + r + 2)·2^-24 per unit of
      // Σ|terms| (doubled for the xa rounding carried into the LoRA term and the per-step scaling); then one
      // rounding into T (half an ulp, bounded by the unit roundoff of |expected|).
      const double sum_abs = magnitude + a.scale * lora_magnitude + std::fabs(b);
      const double tol = D::unit_roundoff * std::fabs(expected) + weight_rounding +
                         2.0 * (c.K + c.r + 2) * 0x1p-24 * sum_abs + 0x1p-24;
      const double got = D::to(y.as<T>()[static_cast<int64_t>(m) * c.N + n]);
      if (!(std::fabs(got - expected) <= tol)) {
        std::fprintf(stderr,
                     "%s %s M=%d N=%d K=%d block=%d r=%d bias=%d mma_min_m=%d splits=%d (%s): y[%d, %d] = %.8g, "
                     "expected %.8g (tolerance %.3g, seed %u)\n",
                     D::name, format_name(c.format), c.M, c.N, c.K, c.block, c.r, c.bias, c.mma_min_m, c.splits,
                     wide ? "128-row" : tensor_cores ? "tensor cores" : "CUDA cores", m, n, got, expected, tol, seed);
        std::exit(1);
      }
      worst = std::max(worst, std::fabs(got - expected) / tol);
    }
  }
  EXPECT(std::memcmp(w_before.data(), w.as<char>(), w.bytes()) == 0);
  EXPECT(std::memcmp(x_before.data(), x.as<char>(), x.bytes()) == 0);
  std::printf("ok %s %-6s M=%2d N=%3d K=%4d block=%3d r=%2d bias=%d overlap=%d splits=%d %-12s worst error %.2f of "
              "tolerance\n",
              D::name, format_name(c.format), c.M, c.N, c.K, c.block, c.r, c.bias, c.overlap, c.splits,
              wide ? "128-row" : tensor_cores ? "tensor cores" : "CUDA cores", worst);
}

// Shapes: K = 96 (NF4 blocks of 64 cross rows; INT4 groups of 32): the GEMV only; N < 16 and N odd (the last
// block's rows past N); the 16-row tensor-core kernel's 64-code steps over 8 warps: K = 256 (one step per
// warp), 1088 (17: uneven shares, idle warps), 2048 (4 per warp: whole unrolled groups only), 2176 and 4224
// (34 and 66: whole groups and a partial one); K = 256 with block 128 and r = 16, K = 2048 with block 256.
// The 128-row kernel (M > 16, and from M = 9 where wide_min_m says so: its 2-tile build): N = 150 and 300
// (a partial last block, two and three blocks), and N < 128; its K split over 1 or 3 blocks (K = 256:
// 4 steps, so one split has none; 1088: 6, 6 and 5 steps, partial groups).
void run_all() {
  struct Shape {
    int N, K, nf4_block, int4_group, r;
  };
  const Shape shapes[] = {{37, 96, 64, 32, 3},      {9, 256, 64, 64, 1},     {50, 256, 128, 128, 16},
                          {21, 1088, 64, 64, 8},    {19, 2048, 256, 128, 5}, {17, 2176, 128, 64, 4},
                          {23, 4224, 64, 128, 2},   {150, 256, 64, 64, 4},   {300, 1088, 128, 64, 8}};
  const int Ms[] = {1, 2, 3, 4, 7, 8, 9, 16, 17, 24, 31, 32, 33, 41, 47, 48, 56, 64};
  int count = 0;
  for (const Shape& s : shapes)
    for (Format f : {Format::kNF4, Format::kNF4DoubleQuant, Format::kINT4}) {
      const int block = f == Format::kINT4 ? s.int4_group : s.nf4_block;
      for (int M : Ms) {
        const bool small = s.K <= 256 && s.N <= 64;
        if (!small && M != 1 && M != 9 && M != 16 && M != 33 && M != 48 && M != 64) continue;  // few long cases
        // Every main kernel for every M it serves: the GEMV (tensor cores never chosen) up to kGemvMaxM, the
        // 16-row tensor-core kernel up to kGemvMaxM, the 128-row one (also from M = 9 when asked to)
        for (int mma_min_m : {kDecodeMaxM + 1, 1}) {
          if (mma_min_m == 1 && (s.K % kMmaStep != 0 || block % kMmaStep != 0)) continue;
          if (mma_min_m != 1 && M > kGemvMaxM) continue;
          for (int wide_min_m : {kGemvMaxM + 1, 9}) {
            if (wide_min_m != kGemvMaxM + 1 && (mma_min_m != 1 || M < wide_min_m || M > kGemvMaxM)) continue;
            const bool wide = mma_min_m == 1 && M >= wide_min_m;
            // dtype, bias and the split alternate across the paths, so each combination meets every kernel
            Case c{f, M, s.N, s.K, block, s.r, (count / 4) % 2 == 0, mma_min_m, (count / 8) % 4 != 0};
            c.wide_min_m = wide_min_m;
            c.splits = wide && count % 2 == 1 ? 3 : 1;
            if ((count / 2) % 2 == 0) {
              run_case<__nv_bfloat16>(c);
            } else {
              run_case<__half>(c);
            }
            ++count;
          }
        }
      }
    }
  std::printf("%d cases, seed %u\n", count, seed);
}

void test_rejected_arguments() {
  // decode_lora refuses what it is not built for, before launching anything.
  // Each case breaks one argument of an otherwise valid set.
  DecodeArgs a{};
  a.N = 16;
  a.K = 64;
  a.r = 1;
  a.block = 64;
  a.M = 0;
  EXPECT(decode_lora(a, Act::kBF16, Scheme::kNF4, nullptr) == cudaErrorInvalidValue);
  a.M = kDecodeMaxM + 1;
  EXPECT(decode_lora(a, Act::kBF16, Scheme::kNF4, nullptr) == cudaErrorInvalidValue);
  // past the GEMV's largest M: K not a multiple of kMmaStep, or the tensor cores not chosen for this M
  a.M = kGemvMaxM + 1;
  a.K = 96;
  EXPECT(decode_lora(a, Act::kBF16, Scheme::kNF4, nullptr) == cudaErrorInvalidValue);
  a.K = 64;
  a.mma_min_m = kGemvMaxM + 2;
  EXPECT(decode_lora(a, Act::kBF16, Scheme::kNF4, nullptr) == cudaErrorInvalidValue);
  a.M = 1;
  a.K = 48;
  EXPECT(decode_lora(a, Act::kFP16, Scheme::kINT4, nullptr) == cudaErrorInvalidValue);
  a.K = 64;
  a.r = 0;
  EXPECT(decode_lora(a, Act::kFP16, Scheme::kNF4, nullptr) == cudaErrorInvalidValue);
  a.r = 1;
  a.block = 96;  // a multiple of 32 but not a power of two
  EXPECT(decode_lora(a, Act::kBF16, Scheme::kINT4, nullptr) == cudaErrorInvalidValue);
}

}  // namespace

int main() {
  std::printf("seed %u (FUSEDLORA_TEST_SEED=%u repeats this run)\n", seed, seed);
  test_rejected_arguments();
  run_all();
  return 0;
}
