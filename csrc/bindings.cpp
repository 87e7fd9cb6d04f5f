// The torch side of fusedlora._C: op schemas (TORCH_LIBRARY), argument checks, CUDA implementations.
// Kernels live in the plain-CUDA .cu files and are reached through their host launchers; this is the
// only file that includes torch headers. The Python side (fusedlora/ops) adds fake impls and its own
// custom ops to the same "fusedlora" namespace as library fragments.
#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "decode_lora.h"
#include "dequant_nf4.h"

// Checks whose messages name the tensor and what was expected.
#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x ": expected a CUDA tensor, got one on ", (x).device())
#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x ": expected a contiguous tensor, got strides ", (x).strides())
#define CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x ": expected dtype ", (dt), ", got ", (x).scalar_type())
#define CHECK_NUMEL(x, n) \
  TORCH_CHECK((x).numel() == (n), #x ": expected ", (n), " elements, got ", (x).numel(), " (shape ", (x).sizes(), ")")
#define CHECK_SAME_DEVICE(x, ref)                                                                     \
  TORCH_CHECK((x).device() == (ref).device(), #x ": expected a tensor on ", (ref).device(), " (where " #ref \
              " is), got one on ",                                                                    \
              (x).device())
#define CHECK_ALIGNED16(x)                                                                           \
  TORCH_CHECK(reinterpret_cast<uintptr_t>((x).data_ptr()) % 16 == 0, #x ": expected a 16-byte aligned data " \
              "pointer (16-byte vector loads), got one at offset ",                                       \
              reinterpret_cast<uintptr_t>((x).data_ptr()) % 16)
#define CHECK_INPUT(x, ref) \
  CHECK_CUDA(x);            \
  CHECK_SAME_DEVICE(x, ref); \
  CHECK_CONTIGUOUS(x)

namespace {

fusedlora::OutDtype out_dtype_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return fusedlora::OutDtype::kFloat32;
    case at::kHalf: return fusedlora::OutDtype::kFloat16;
    case at::kBFloat16: return fusedlora::OutDtype::kBFloat16;
    default: TORCH_CHECK(false, "dtype: expected float32, float16 or bfloat16, got ", dtype);
  }
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& data, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                               int64_t n, int64_t k, at::ScalarType dtype) {
  TORCH_CHECK(n >= 1 && k >= 1, "n, k: expected a weight shape [N, K] with N, K >= 1, got [", n, ", ", k, "]");
  TORCH_CHECK(blocksize == 64 || blocksize == 128 || blocksize == 256,
              "blocksize: expected 64, 128 or 256, got ", blocksize);
  const int64_t numel = n * k;
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  CHECK_CUDA(data);
  CHECK_CONTIGUOUS(data);
  CHECK_DTYPE(data, at::kByte);
  CHECK_NUMEL(data, (numel + 1) / 2);
  CHECK_INPUT(absmax, data);
  CHECK_NUMEL(absmax, n_blocks);
  const bool dq = nested_absmax.has_value();
  TORCH_CHECK(dq == nested_code.has_value(),
              "nested_absmax, nested_code: expected both (double quantization) or neither, got ",
              dq ? "nested_absmax only" : "nested_code only");
  if (dq) {
    CHECK_DTYPE(absmax, at::kByte);
    CHECK_INPUT(*nested_absmax, data);
    CHECK_DTYPE(*nested_absmax, at::kFloat);
    CHECK_NUMEL(*nested_absmax, (n_blocks + 255) / 256);
    CHECK_INPUT(*nested_code, data);
    CHECK_DTYPE(*nested_code, at::kFloat);
    CHECK_NUMEL(*nested_code, 256);
  } else {
    CHECK_DTYPE(absmax, at::kFloat);
  }
  const fusedlora::OutDtype out_dtype = out_dtype_of(dtype);

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
  args.numel = numel;
  args.out = out.data_ptr();
  args.out_dtype = out_dtype;
  const cudaError_t err = fusedlora::launch_dequantize_nf4(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dequantize_nf4_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return out;
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

// y[M, N] = x·deq(W)ᵀ + scale·(x·Aᵀ)·Bᵀ + bias for M <= 16 (csrc/decode_lora.cu); x [M, K] bf16/fp16.
// M >= mma_min_m (and K % 128 == 0) runs the tensor-core kernel, smaller M the CUDA-core GEMV.
at::Tensor decode_lora_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                            const std::optional<at::Tensor>& absmax_q,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, double nested_offset,
                            const std::optional<at::Tensor>& code, const std::optional<at::Tensor>& scales,
                            const std::optional<at::Tensor>& zeros, int64_t scheme, int64_t block, int64_t n,
                            int64_t k, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& bias, double scale, int64_t mma_min_m) {
  CHECK_CUDA(x);
  CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x: expected shape [M, K=", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x: expected dtype bfloat16 or float16, got ", x.scalar_type());
  const int64_t m_rows = x.size(0);
  TORCH_CHECK(m_rows >= 1 && m_rows <= fusedlora::kDecodeMaxM, "x: expected 1 <= M <= ", fusedlora::kDecodeMaxM,
              " rows, got ", m_rows);
  TORCH_CHECK(k % 32 == 0, "k: expected a multiple of 32 (16-byte loads within a row), got ", k);
  TORCH_CHECK(block >= 32 && (block & (block - 1)) == 0,
              "block: expected a power of two >= 32 (one scale per 16-byte load), got ", block);
  TORCH_CHECK(scheme == 0 || scheme == 1, "scheme: expected 0 (nf4) or 1 (int4), got ", scheme);
  CHECK_ALIGNED16(x);
  CHECK_INPUT(w, x);
  CHECK_ALIGNED16(w);
  CHECK_DTYPE(w, at::kByte);
  CHECK_NUMEL(w, n * k / 2);
  const int64_t n_blocks = (n * k + block - 1) / block;
  if (scheme == 0) {
    TORCH_CHECK(code.has_value(), "code: expected the 16 NF4 values for scheme nf4, got None");
    CHECK_INPUT(*code, x);
    CHECK_NUMEL(*code, 16);
    TORCH_CHECK(absmax.has_value() != absmax_q.has_value(),
                "absmax, absmax_q: expected exactly one (absmax_q with double quantization)");
    if (absmax.has_value()) {
      CHECK_INPUT(*absmax, x);
      CHECK_DTYPE(*absmax, at::kFloat);
      CHECK_NUMEL(*absmax, n_blocks);
    } else {
      CHECK_INPUT(*absmax_q, x);
      CHECK_DTYPE(*absmax_q, at::kByte);
      CHECK_NUMEL(*absmax_q, n_blocks);
      TORCH_CHECK(nested_absmax.has_value() && nested_code.has_value(),
                  "nested_absmax, nested_code: expected both with absmax_q");
      CHECK_INPUT(*nested_absmax, x);
      CHECK_DTYPE(*nested_absmax, at::kFloat);
      CHECK_INPUT(*nested_code, x);
      CHECK_NUMEL(*nested_code, 256);
    }
  } else {
    TORCH_CHECK(scales.has_value() && zeros.has_value(), "scales, zeros: expected both for scheme int4");
    CHECK_INPUT(*scales, x);
    CHECK_DTYPE(*scales, at::kFloat);
    CHECK_NUMEL(*scales, n_blocks);
    CHECK_INPUT(*zeros, x);
    CHECK_DTYPE(*zeros, at::kByte);
    CHECK_NUMEL(*zeros, n_blocks);
  }
  CHECK_INPUT(lora_A, x);
  CHECK_ALIGNED16(lora_A);
  CHECK_DTYPE(lora_A, x.scalar_type());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == k && lora_A.size(0) >= 1,
              "lora_A: expected shape [r, K=", k, "], got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  CHECK_INPUT(lora_B, x);
  CHECK_DTYPE(lora_B, x.scalar_type());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == n && lora_B.size(1) == r,
              "lora_B: expected shape [N=", n, ", r=", r, "], got ", lora_B.sizes());
  if (bias.has_value()) {
    CHECK_INPUT(*bias, x);
    CHECK_DTYPE(*bias, x.scalar_type());
    CHECK_NUMEL(*bias, n);
  }

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
  a.overlap = supports_dependent_launch(x.device().index()) ? 1 : 0;
  const auto act = x.scalar_type() == at::kBFloat16 ? fusedlora::Act::kBF16 : fusedlora::Act::kFP16;
  const auto sch = scheme == 0 ? fusedlora::Scheme::kNF4 : fusedlora::Scheme::kINT4;
  const cudaError_t err = fusedlora::decode_lora(a, act, sch, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decode_lora_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY(fusedlora, m) {
  m.def(
      "dequantize_nf4_cuda(Tensor data, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float nested_offset, int blocksize, int n, int k, ScalarType dtype) -> Tensor");
  m.def(
      "decode_lora_cuda(Tensor x, Tensor w, Tensor? absmax, Tensor? absmax_q, Tensor? nested_absmax, "
      "Tensor? nested_code, float nested_offset, Tensor? code, Tensor? scales, Tensor? zeros, int scheme, "
      "int block, int n, int k, Tensor lora_A, Tensor lora_B, Tensor? bias, float scale, int mma_min_m) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedlora, CUDA, m) {
  m.impl("dequantize_nf4_cuda", &dequantize_nf4_cuda);
  m.impl("decode_lora_cuda", &decode_lora_cuda);
}

// `import fusedlora._C` runs the registrations above; the module itself carries nothing (no pybind11,
// which would double this file's compile time).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fusedlora's compiled ops (torch.ops.fusedlora)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
