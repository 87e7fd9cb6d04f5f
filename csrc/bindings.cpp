// The torch side of fusedlora._C: op schemas (TORCH_LIBRARY), argument checks, CUDA implementations.
// Kernels live in the plain-CUDA .cu files and are reached through their host launchers; this is the
// only file that includes torch headers. The Python side (fusedlora/ops) adds fake impls and its own
// custom ops to the same "fusedlora" namespace as library fragments.
#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "decode_lora.h"
#include "dequant_nf4.h"

// Checks whose messages name the tensor and what was expected: ValueError / TypeError in Python.
#define CHECK_CUDA(x) \
  TORCH_CHECK_VALUE((x).is_cuda(), #x ": expected a CUDA tensor, got one on ", (x).device())
#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK_VALUE((x).is_contiguous(), #x ": expected a contiguous tensor, got strides ", (x).strides())
#define CHECK_DTYPE(x, dt) \
  TORCH_CHECK_TYPE((x).scalar_type() == (dt), #x ": expected dtype ", (dt), ", got ", (x).scalar_type())
#define CHECK_NUMEL(x, n)                                                                                   \
  TORCH_CHECK_VALUE((x).numel() == (n), #x ": expected ", (n), " elements, got ", (x).numel(), " (shape ", \
                    (x).sizes(), ")")
#define CHECK_SAME_DEVICE(x, ref)                                                                           \
  TORCH_CHECK_VALUE((x).device() == (ref).device(), #x ": expected a tensor on ", (ref).device(),         \
                    " (where " #ref " is), got one on ", (x).device())
#define CHECK_ALIGNED16(x)                                                                                  \
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>((x).data_ptr()) % 16 == 0,                                 \
                    #x ": expected a 16-byte aligned data pointer (16-byte vector loads), got one at offset ", \
                    reinterpret_cast<uintptr_t>((x).data_ptr()) % 16)
#define CHECK_INPUT(x, ref)  \
  CHECK_SAME_DEVICE(x, ref); \
  CHECK_CONTIGUOUS(x)

namespace {

constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();  // N, K (the kernels take 32-bit sizes)
constexpr int64_t kNestedBlock = 256;

// A tensor argument of a 4-bit weight: on data's device, contiguous, of `dtype` and `numel` elements.
void check_part(const char* name, const at::Tensor& t, const at::Tensor& data, at::ScalarType dtype,
                int64_t numel) {
  TORCH_CHECK_VALUE(t.device() == data.device(), name, ": expected a tensor on ", data.device(),
                    ", got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel, name, ": expected ", numel, " elements, got ", t.numel(), " (shape ",
                    t.sizes(), ")");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

void check_absent(const char* name, const std::optional<at::Tensor>& t, const char* scheme) {
  TORCH_CHECK_VALUE(!t.has_value(), name, ": expected None for a ", scheme, " weight, got a tensor");
}

const at::Tensor& required(const char* name, const std::optional<at::Tensor>& t, const char* why) {
  TORCH_CHECK_VALUE(t.has_value(), name, ": expected a tensor ", why, ", got None");
  return *t;
}

// The one check of a 4-bit weight's metadata on the C++ side, the rules of fusedlora.formats.check_packed:
// scheme; N, K in 1..2^31-1; block size (NF4 64/128/256, INT4 64/128 dividing K); a finite nested_offset;
// dtype, size, device and contiguity of the codes, absmax (fp32, or uint8 codes with nested_absmax and
// nested_code), scales and zeros. Nothing indexes the tensors before this has passed.
void check_weight_4bit(int64_t scheme, const char* data_name, const at::Tensor& data, const char* absmax_name,
                       const std::optional<at::Tensor>& absmax, const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_code, double nested_offset,
                       const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& zeros,
                       const char* block_name, int64_t block, int64_t n, int64_t k) {
  TORCH_CHECK_VALUE(scheme == 0 || scheme == 1, "scheme: expected 0 (nf4) or 1 (int4), got ", scheme);
  TORCH_CHECK_VALUE(n >= 1 && k >= 1 && n <= kMaxDim && k <= kMaxDim, "n, k: expected a weight shape [N, K] with ",
                    "1 <= N, K <= ", kMaxDim, ", got [", n, ", ", k, "]");
  TORCH_CHECK_VALUE(std::isfinite(nested_offset), "nested_offset: expected a finite number, got ", nested_offset);
  const int64_t numel = n * k;
  if (scheme == 1) {
    TORCH_CHECK_VALUE((block == 64 || block == 128) && k % block == 0, block_name,
                      ": expected an int4 group size of 64 or 128 dividing K=", k, ", got ", block);
    check_absent(absmax_name, absmax, "int4");
    check_absent("nested_absmax", nested_absmax, "int4");
    check_absent("nested_code", nested_code, "int4");
    check_part(data_name, data, data, at::kByte, numel / 2);
    check_part("scales", required("scales", scales, "for scheme int4"), data, at::kFloat, numel / block);
    check_part("zeros", required("zeros", zeros, "for scheme int4"), data, at::kByte, numel / block);
    return;
  }
  TORCH_CHECK_VALUE(block == 64 || block == 128 || block == 256, block_name,
                    ": expected an nf4 blocksize of 64, 128 or 256, got ", block);
  check_absent("scales", scales, "nf4");
  check_absent("zeros", zeros, "nf4");
  check_part(data_name, data, data, at::kByte, (numel + 1) / 2);
  const int64_t n_blocks = (numel + block - 1) / block;
  const bool dq = nested_absmax.has_value();
  TORCH_CHECK_VALUE(dq == nested_code.has_value(), dq ? "nested_code" : "nested_absmax",
                    ": expected a tensor with ", dq ? "nested_absmax" : "nested_code",
                    " (double quantization), got None");
  check_part(absmax_name, required(absmax_name, absmax, "for scheme nf4"), data, dq ? at::kByte : at::kFloat,
             n_blocks);
  if (dq) {
    check_part("nested_absmax", *nested_absmax, data, at::kFloat, (n_blocks + kNestedBlock - 1) / kNestedBlock);
    check_part("nested_code", *nested_code, data, at::kFloat, 256);
  }
}

fusedlora::OutDtype out_dtype_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return fusedlora::OutDtype::kFloat32;
    case at::kHalf: return fusedlora::OutDtype::kFloat16;
    case at::kBFloat16: return fusedlora::OutDtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "dtype: expected float32, float16 or bfloat16, got ", dtype);
  }
}

void check_dequantize_nf4(const at::Tensor& data, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          double nested_offset, int64_t blocksize, int64_t n, int64_t k, at::ScalarType dtype) {
  check_weight_4bit(0, "data", data, "absmax", absmax, nested_absmax, nested_code, nested_offset, std::nullopt,
                    std::nullopt, "blocksize", blocksize, n, k);
  out_dtype_of(dtype);
}

// What the CPU registration of a CUDA op does once its arguments passed every check.
[[noreturn]] void refuse_cpu(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(false, arg, ": expected a CUDA tensor, got one on ", t.device(), " (", op,
                    " runs on the GPU; on the CPU it only checks its arguments)");
  std::abort();  // not reached
}

template <bool kCpu>  // the CPU registration: checks, then refuse_cpu
at::Tensor dequantize_nf4_cuda(const at::Tensor& data, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                               int64_t n, int64_t k, at::ScalarType dtype) {
  check_dequantize_nf4(data, absmax, nested_absmax, nested_code, nested_offset, blocksize, n, k, dtype);
  if constexpr (kCpu) refuse_cpu("dequantize_nf4_cuda", "data", data);
  CHECK_CUDA(data);
  const bool dq = nested_absmax.has_value();
  const c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = at::empty({n, k}, data.options().dtype(dtype));
  fusedlora::DequantNf4Args args{};
  args.data = data.data_ptr<uint8_t>();
  args.absmax = absmax.data_ptr();
  args.double_quant = dq;
  args.nested_absmax = dq ? nested_absmax->data_ptr<float>() : nullptr;
  args.nested_code = dq ? nested_code->data_ptr<float>() : nullptr;
  args.nested_offset = static_cast<float>(nested_offset);
  args.blocksize = static_cast<int>(blocksize);
  args.numel = n * k;
  args.out = out.data_ptr();
  args.out_dtype = out_dtype_of(dtype);
  const cudaError_t err = fusedlora::launch_dequantize_nf4(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dequantize_nf4_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// "" when the extension holds a kernel image that CUDA device `device` can run, else why not.
std::string kernel_image_error(int64_t device) {
  const int64_t count = c10::cuda::device_count();
  TORCH_CHECK_VALUE(device >= 0 && device < count, "device: expected a CUDA device index in [0, ", count,
                    "), got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t err = fusedlora::kernel_image_status();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

// Programmatic dependent launch exists from sm_90 on. The compute capability is asked once per device.
bool supports_dependent_launch(int device) {
  static std::array<std::atomic<int>, 64> major{};  // 0: not asked yet
  if (device < 0 || device >= static_cast<int>(major.size())) return false;
  int m = major[device].load(std::memory_order_relaxed);
  if (m == 0) {
    TORCH_CHECK(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess,
                "decode_lora_cuda: could not read the compute capability of device ", device);
    major[device].store(m, std::memory_order_relaxed);
  }
  return m >= 9;
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Every argument check of decode_lora_cuda (the CUDA implementation and the CPU registration run it).
void check_decode_lora(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                       const std::optional<at::Tensor>& absmax_q, const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_code, double nested_offset,
                       const std::optional<at::Tensor>& code, const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& zeros, int64_t scheme, int64_t block, int64_t n, int64_t k,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& tickets, int64_t splits) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == k, "x: expected shape [M, K=", k, "], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x: expected dtype bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) <= fusedlora::kDecodeMaxM, "x: expected 0 <= M <= ", fusedlora::kDecodeMaxM,
                    " rows, got ", x.size(0));
  CHECK_CONTIGUOUS(x);
  CHECK_ALIGNED16(x);
  CHECK_SAME_DEVICE(w, x);
  TORCH_CHECK_VALUE(k % 32 == 0, "k: expected a multiple of 32 (16-byte loads within a row), got ", k);
  // NF4 without double quantization passes fp32 `absmax`, with it uint8 `absmax_q`: exactly one of them.
  TORCH_CHECK_VALUE(scheme != 0 || absmax.has_value() != absmax_q.has_value(),
                    "absmax, absmax_q: expected exactly one for scheme nf4 (absmax_q with double quantization)");
  TORCH_CHECK_VALUE(!absmax_q.has_value() || nested_absmax.has_value(),
                    "nested_absmax: expected a tensor with absmax_q (double quantization), got None");
  TORCH_CHECK_VALUE(!absmax.has_value() || !nested_absmax.has_value(),
                    "absmax: expected absmax_q (uint8 codes) with nested_absmax, got absmax");
  const bool q = absmax_q.has_value();
  check_weight_4bit(scheme, "w", w, q ? "absmax_q" : "absmax", q ? absmax_q : absmax, nested_absmax, nested_code,
                    nested_offset, scales, zeros, "block", block, n, k);
  CHECK_ALIGNED16(w);
  if (scheme == 0) {
    check_part("code", required("code", code, "(the 16 NF4 values) for scheme nf4"), x, at::kFloat, 16);
  }
  CHECK_INPUT(lora_A, x);
  CHECK_ALIGNED16(lora_A);
  CHECK_DTYPE(lora_A, x.scalar_type());
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == k && lora_A.size(0) >= 1,
                    "lora_A: expected shape [r, K=", k, "], got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  CHECK_INPUT(lora_B, x);
  CHECK_DTYPE(lora_B, x.scalar_type());
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == n && lora_B.size(1) == r,
                    "lora_B: expected shape [N=", n, ", r=", r, "], got ", lora_B.sizes());
  if (bias.has_value()) {
    CHECK_INPUT(*bias, x);
    CHECK_DTYPE(*bias, x.scalar_type());
    CHECK_NUMEL(*bias, n);
  }
  // the 128-row kernel (M > kGemvMaxM) splits K over `splits` blocks, which meet on one counter per 128 rows
  TORCH_CHECK_VALUE(splits >= 1 && splits <= std::max<int64_t>(1, k / fusedlora::kMmaStep),
                    "splits: expected 1 <= splits <= k / ", fusedlora::kMmaStep, " = ", k / fusedlora::kMmaStep,
                    ", got ", splits);
  if (splits > 1) {
    const int64_t blocks = (n + fusedlora::kDecodeWideRows - 1) / fusedlora::kDecodeWideRows;
    const at::Tensor& t = required("tickets", tickets, "(int32 counters, all 0) when splits > 1");
    CHECK_INPUT(t, x);
    CHECK_DTYPE(t, at::kInt);
    TORCH_CHECK_VALUE(t.numel() >= blocks, "tickets: expected at least ", blocks, " counters (one per ",
                      fusedlora::kDecodeWideRows, " rows of n = ", n, "), got ", t.numel());
  }
}

// y[M, N] = x·deq(W)ᵀ + scale·(x·Aᵀ)·Bᵀ + bias, M <= kDecodeMaxM (csrc/decode_lora.cu); x [M, K] bf16/fp16.
// M >= mma_min_m (and K, block multiples of kMmaStep) runs the tensor-core kernel, smaller M (<= kGemvMaxM)
// the CUDA-core GEMV; M = 0 launches nothing. kCpu: the CPU registration (checks, then refuse_cpu).
template <bool kCpu>
at::Tensor decode_lora_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                            const std::optional<at::Tensor>& absmax_q,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, double nested_offset,
                            const std::optional<at::Tensor>& code, const std::optional<at::Tensor>& scales,
                            const std::optional<at::Tensor>& zeros, int64_t scheme, int64_t block, int64_t n,
                            int64_t k, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& bias, double scale, int64_t mma_min_m,
                            const std::optional<at::Tensor>& tickets, int64_t splits, int64_t wide_min_m) {
  check_decode_lora(x, w, absmax, absmax_q, nested_absmax, nested_code, nested_offset, code, scales, zeros, scheme,
                    block, n, k, lora_A, lora_B, bias, tickets, splits);
  if constexpr (kCpu) refuse_cpu("decode_lora_cuda", "x", x);
  CHECK_CUDA(x);
  const int64_t m_rows = x.size(0);
  const int64_t r = lora_A.size(0);
  if (m_rows == 0) return at::empty({0, n}, x.options());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({m_rows, n}, x.options());
  at::Tensor xa = at::empty({m_rows, r}, x.options().dtype(at::kFloat));
  fusedlora::DecodeArgs a{};
  a.x = x.data_ptr();
  a.ldx = k;
  a.w = w.data_ptr<uint8_t>();
  a.absmax = optional_ptr<float>(absmax);
  a.absmax_q = optional_ptr<uint8_t>(absmax_q);
  a.nested_absmax = optional_ptr<float>(nested_absmax);
  a.nested_code = optional_ptr<float>(nested_code);
  a.nested_offset = static_cast<float>(nested_offset);
  a.code = optional_ptr<float>(code);
  a.scales = optional_ptr<float>(scales);
  a.zeros = optional_ptr<uint8_t>(zeros);
  a.block = static_cast<int>(block);
  a.A = lora_A.data_ptr();
  a.B = lora_B.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.xa = xa.data_ptr<float>();
  a.y = y.data_ptr();
  a.M = static_cast<int>(m_rows);
  a.N = static_cast<int>(n);
  a.K = static_cast<int>(k);
  a.r = static_cast<int>(r);
  a.scale = static_cast<float>(scale);
  a.mma_min_m = static_cast<int>(std::min<int64_t>(std::max<int64_t>(mma_min_m, 1), fusedlora::kDecodeMaxM + 1));
  TORCH_CHECK_VALUE(m_rows <= fusedlora::kGemvMaxM ||
                        (m_rows >= a.mma_min_m && k % fusedlora::kMmaStep == 0 && block % fusedlora::kMmaStep == 0),
                    "x: M = ", m_rows, " > ", fusedlora::kGemvMaxM, " rows needs the tensor-core kernel (k and block "
                    "multiples of ", fusedlora::kMmaStep, ", mma_min_m <= M), got k = ", k, ", block = ", block,
                    ", mma_min_m = ", mma_min_m);
  a.overlap = supports_dependent_launch(x.device().index()) ? 1 : 0;
  // the split only applies to the 128-row kernel; a workspace for its fp32 partials
  a.wide_min_m = static_cast<int>(std::min<int64_t>(std::max<int64_t>(wide_min_m, 1), fusedlora::kGemvMaxM + 1));
  a.splits = m_rows >= a.wide_min_m ? static_cast<int>(splits) : 1;
  at::Tensor partials;
  if (a.splits > 1) {
    partials = at::empty({a.splits, m_rows, n}, x.options().dtype(at::kFloat));
    a.partials = partials.data_ptr<float>();
    a.tickets = tickets->data_ptr<int>();
  }
  const auto act = x.scalar_type() == at::kBFloat16 ? fusedlora::Act::kBF16 : fusedlora::Act::kFP16;
  const auto sch = scheme == 0 ? fusedlora::Scheme::kNF4 : fusedlora::Scheme::kINT4;
  const cudaError_t err = fusedlora::decode_lora(a, act, sch, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decode_lora_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY(fusedlora, m) {
  m.def("kernel_image_error(int device) -> str", &kernel_image_error);
  m.def(
      "dequantize_nf4_cuda(Tensor data, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float nested_offset, int blocksize, int n, int k, ScalarType dtype) -> Tensor");
  m.def(
      "decode_lora_cuda(Tensor x, Tensor w, Tensor? absmax, Tensor? absmax_q, Tensor? nested_absmax, "
      "Tensor? nested_code, float nested_offset, Tensor? code, Tensor? scales, Tensor? zeros, int scheme, "
      "int block, int n, int k, Tensor lora_A, Tensor lora_B, Tensor? bias, float scale, int mma_min_m, "
      "Tensor? tickets=None, int splits=1, int wide_min_m=17) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedlora, CUDA, m) {
  m.impl("dequantize_nf4_cuda", &dequantize_nf4_cuda<false>);
  m.impl("decode_lora_cuda", &decode_lora_cuda<false>);
}

// On CPU tensors the CUDA ops run every check of their arguments, then refuse: the binding's checks run
// (and are tested) on machines without a GPU.
TORCH_LIBRARY_IMPL(fusedlora, CPU, m) {
  m.impl("dequantize_nf4_cuda", &dequantize_nf4_cuda<true>);
  m.impl("decode_lora_cuda", &decode_lora_cuda<true>);
}

// `import fusedlora._C` runs the registrations above; the module itself carries nothing (no pybind11,
// which would double this file's compile time).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fusedlora's compiled ops (torch.ops.fusedlora)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
