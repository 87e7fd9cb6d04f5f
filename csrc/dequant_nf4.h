// Host entry point of the NF4 dequantize kernel (csrc/dequant_nf4.cu); no torch types.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedlora {

enum class OutDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct DequantNf4Args {
  const uint8_t* data;          // [ceil(numel/2)] packed codes
  const void* absmax;           // float [n_blocks], or uint8 codes [n_blocks] when double_quant
  bool double_quant;
  const float* nested_absmax;   // [ceil(n_blocks/256)]   (double_quant only)
  const float* nested_code;     // [256]                  (double_quant only)
  float nested_offset;          //                        (double_quant only)
  int blocksize;                // 64, 128 or 256
  int64_t numel;                // N*K
  void* out;                    // [numel] of out_dtype
  OutDtype out_dtype;
};

// Launches on `stream`; returns the launch error (cudaSuccess when none).
cudaError_t launch_dequantize_nf4(const DequantNf4Args& args, cudaStream_t stream);

// cudaSuccess when this build holds a kernel image the current device can run, else the error a launch
// would return (cudaErrorNoKernelImageForDevice): the build's architectures do not include the device's.
cudaError_t kernel_image_status();

}  // namespace fusedlora
