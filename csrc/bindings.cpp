// The torch side of fusedlora._C: op schemas (TORCH_LIBRARY), argument checks, CUDA implementations.
// Kernels live in the plain-CUDA .cu files and are reached through their host launchers; this is the
// only file that includes torch headers. The Python side (fusedlora/ops) adds fake impls and its own
// custom ops to the same "fusedlora" namespace as library fragments.
#include <Python.h>

#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY(fusedlora, m) {
  m.def(
      "dequantize_nf4_cuda(Tensor data, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float nested_offset, int blocksize, int n, int k, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedlora, CUDA, m) { m.impl("dequantize_nf4_cuda", &dequantize_nf4_cuda); }

// `import fusedlora._C` runs the registrations above; the module itself carries nothing (no pybind11,
// which would double this file's compile time).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fusedlora's compiled ops (torch.ops.fusedlora)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
