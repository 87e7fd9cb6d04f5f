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
  // The wide kernel (M > kGemvMaxM): K split over this many blocks per 128 rows; with more than one, fp32
  // partials [splits, M, N] and one int32 counter per 128-row block, all 0 before the launch (left 0 after)
  int splits;
  float* partials;
  int* tickets;
  int wide_min_m;       // M from which the 128-row kernel runs (always above kGemvMaxM)
};

// Largest M each main kernel is built for; larger M goes to the Triton GEMM. Up to kGemvMaxM tokens the
// GEMV or the 16-row tensor-core kernel runs, above it the 128-row one (decode_lora_wide.cu), up to
// kDecodeMaxM (fusedlora/ops/decode.py says why there).
constexpr int kDecodeMaxM = 64;
constexpr int kGemvMaxM = 16;
constexpr int kDecodeWideRows = 128;  // rows of W per block of the wide kernel (one counter each)
// The tensor-core kernel walks K in steps of this many codes, each inside one block (NF4) or group (INT4);
// other K, and blocks of 32, run the CUDA-core GEMV.
constexpr int kMmaStep = 64;

// Calls X(T, F) for every activation type and Format the kernels are instantiated for.
#define FUSEDLORA_FOR_EACH_TYPE_AND_FORMAT(X)                                                        \
  X(__nv_bfloat16, Format::kNF4) X(__nv_bfloat16, Format::kNF4DQ) X(__nv_bfloat16, Format::kINT4) \
  X(__half, Format::kNF4) X(__half, Format::kNF4DQ) X(__half, Format::kINT4)

// Launches the x·Aᵀ pre-pass and the fused GEMV on ``stream``; returns the first launch error.
cudaError_t decode_lora(const DecodeArgs& args, Act act, Scheme scheme, cudaStream_t stream);

// The tensor-core main kernel (decode_lora_mma.cu), instantiated there for T in {__nv_bfloat16, __half} and
// every Format.
template <typename T, Format F>
cudaError_t launch_decode_mma(const DecodeArgs& args, cudaStream_t stream);
// The 128-row tensor-core kernel for kGemvMaxM < M <= kDecodeMaxM (decode_lora_wide.cu).
template <typename T, Format F>
cudaError_t launch_decode_wide(const DecodeArgs& args, cudaStream_t stream);

}  // namespace fusedlora
