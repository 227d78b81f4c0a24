// Emulated c10::cuda::CUDAGuard for tests/cuda_emulation. The emulated kernels
// run on CPU tensors, so there is no device to switch to; the emulated device
// is the runtime's current one (cuda_emu, set by the tests).
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
