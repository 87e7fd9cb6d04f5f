// The one launch path of the kernels in csrc/: stream-ordered, or ``dependent`` — allowed to start while
// the previous kernel in the stream still runs (programmatic dependent launch, sm_90; the kernel waits
// with griddepcontrol.wait where it needs that kernel's results, elsewhere the launches serialize as usual).
// Under FUSEDLORA_EMULATE (csrc/tests/emulator.h) the launch runs on the host instead.
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace fusedlora {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool dependent,
                          Args&&... args) {
#if defined(FUSEDLORA_EMULATE)
  (void)stream;
  return emulate::launch(kernel, grid, block, dependent, std::forward<Args>(args)...);
#else
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = dependent ? attr : nullptr;
  cfg.numAttrs = dependent ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  return err != cudaSuccess ? err : cudaGetLastError();
#endif
}

}  // namespace fusedlora
