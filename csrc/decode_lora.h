// Decode-time fused 4-bit linear + LoRA (plain CUDA, no torch headers): y = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fusedlora {

enum class Act { kBF16 = 0, kFP16 = 1 };
enum class Scheme { kNF4 = 0, kINT4 = 1 };
// What the kernels are instantiated for: the scheme, and for NF4 whether absmax is double-quantized (a
// branch per row and chunk otherwise, and one loop serving two formats).
enum class Format { kNF4 = 0, kNF4DQ = 1, kINT4 = 2 };

struct DecodeArgs {
  const void* x;        // [M, K] activations, row stride ldx elements
  int64_t ldx;
  const uint8_t* w;     // packed codes; row n starts at byte n*K/2 (NF4 flat layout and INT4 rows agree)
  // NF4: absmax fp32 [n_blocks], or (double quant) absmax_q uint8 [n_blocks] + nested_* (absmax == null)
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  const float* code;    // NF4 code table, 16 fp32 values
  // INT4: scales fp32 [N, K/group], zeros uint8 [N, K/group]
  const float* scales;
  const uint8_t* zeros;
  int block;            // NF4 blocksize or INT4 group size: a power of two, >= 32
  int block_shift;      // log2(block), set by decode_lora
  const void* A;        // [r, K] in the activation dtype
  const void* B;        // [N, r]
  const void* bias;     // [N] or null
  float* xa;            // [M, r] fp32 workspace (written by the pre-pass)
  void* y;              // [M, N]
  int M, N, K, r;
  float scale;
  int mma_min_m;        // M from which the tensor-core kernel runs (when K and block are multiples of kMmaStep)
  int overlap;          // 1 on sm_90+: the main kernel is launched as a programmatic dependent of the pre-pass
};

// Largest M each main kernel is built for; larger M goes to the Triton GEMM. The tensor-core kernel serves
// up to 6 token tiles (kDecodeMaxM; fusedlora/ops/decode.py says why there), the GEMV up to kGemvMaxM.
constexpr int kDecodeMaxM = 48;
constexpr int kGemvMaxM = 16;
// The tensor-core kernel walks K in steps of this many codes, each inside one block (NF4) or group (INT4);
// other K, and blocks of 32, run the CUDA-core GEMV.
constexpr int kMmaStep = 64;

// Launches the x·Aᵀ pre-pass and the fused GEMV on ``stream``; returns the first launch error.
cudaError_t decode_lora(const DecodeArgs& args, Act act, Scheme scheme, cudaStream_t stream);

// The tensor-core main kernel (decode_lora_mma.cu), instantiated there for T in {__nv_bfloat16, __half} and
// every Format.
template <typename T, Format F>
cudaError_t launch_decode_mma(const DecodeArgs& args, cudaStream_t stream);

}  // namespace fusedlora
