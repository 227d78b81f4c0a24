// Emulated c10::cuda streams for tests/cuda_emulation: the current stream is the
// emulated runtime's, which every launch is checked against.
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  explicit CUDAStream(cudaStream_t stream) : stream_(stream) {}
  cudaStream_t stream() const { return stream_; }
  operator cudaStream_t() const { return stream_; }

 private:
  cudaStream_t stream_;
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(::cuda_emu::current_stream()); }

}  // namespace cuda
}  // namespace c10
