// Host emulation of the part of the CUDA runtime and device language that
// csrc/cuda uses. It stands in for the real <cuda_runtime.h> when the kernel
// sources are compiled as C++ (tests/cuda_emulation/build.py). Each CUDA thread
// of a block runs as a fiber (or an OS thread, for TSan); __syncthreads is a
// scheduling point. What it checks and cannot: docs/cuda.md, "Emulation".
#pragma once

// Standard headers first: the macros below (__noinline__ in particular) must
// not reach the library's own attribute spellings.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef TORCHJAC_CUDA_EMULATION
#define TORCHJAC_CUDA_EMULATION 1
#endif

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotSupported = 801,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace cuda_emu {

extern thread_local uint3 thread_idx;
extern thread_local uint3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;

// A barrier of the current block; `file:line` names the call site, so that
// threads waiting at different barriers are caught.
void syncthreads(const char* file, int line);
unsigned char* dynamic_shared_memory();

// Warp-level operations (include/mma.h). A warp is 32 consecutive threads of
// the block. warp_collective blocks until all 32 lanes of the calling warp
// have called it from the same site; the last to arrive runs run(lanes), where
// lanes[l] is the `lane_data` lane l passed, then every lane goes on.
int lane_id();
void warp_collective(const char* file, int line, void* lane_data, void (*run)(void* const* lanes));
// This run's fragment element mappings: a permutation of [0, size) per fragment
// kind, drawn from the fragment seed; the generation changes with the seed.
uint64_t fragment_generation();
const int* fragment_map(const char* kind, int size);
[[noreturn]] void device_fatal(const std::string& what);

// cp.async (include/cuda_pipeline.h): the calling thread's copies, batches and waits.
void pipeline_copy(void* dst, const void* src, size_t size, size_t zfill);
void pipeline_commit();
void pipeline_wait_prior(size_t prior);

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t occupancy_max_active_blocks(int* blocks, const void* kernel, int threads, size_t smem_bytes);
cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t stream);
cudaStream_t current_stream();
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t take_last_error();
cudaError_t peek_last_error();
const char* error_string(cudaError_t err);
std::string last_error_detail();

// Checks a launch and, if it is valid, runs every block to completion now
// (launches on one stream run in order anyway). run_thread(ctx) is the body
// of one CUDA thread.
void launch_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, const char* file,
                 int line, void (*run_thread)(void*), void* ctx);

template <typename... P>
class Launch {
 public:
  using Kernel = void (*)(P...);
  Launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* file, int line)
      : kernel_(kernel), grid_(grid), block_(block), smem_(smem), stream_(stream), file_(file), line_(line) {}

  template <typename... A>
  void operator()(A&&... args) const {
    Frame frame{kernel_, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    launch_grid(reinterpret_cast<const void*>(kernel_), grid_, block_, smem_, stream_, file_, line_, &run, &frame);
  }

 private:
  struct Frame {
    Kernel kernel;
    std::tuple<std::decay_t<P>...> params;
  };
  // Every thread gets its own copy of the parameters, as on a device.
  static void run(void* ctx) {
    const Frame& f = *static_cast<const Frame*>(ctx);
    std::apply(f.kernel, f.params);
  }
  Kernel kernel_;
  dim3 grid_, block_;
  size_t smem_;
  cudaStream_t stream_;
  const char* file_;
  int line_;
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* file,
                    int line) {
  return Launch<P...>(kernel, grid, block, smem, stream, file, line);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx)
#define blockIdx (::cuda_emu::block_idx)
#define blockDim (::cuda_emu::block_dim)
#define gridDim (::cuda_emu::grid_dim)
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// CUDA's device min/max; the kernels call them with equal argument types.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return cuda_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* kernel, int threads, size_t smem) {
  return cuda_emu::occupancy_max_active_blocks(blocks, reinterpret_cast<const void*>(kernel), threads, smem);
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr) {
  return cuda_emu::memset_async(ptr, value, bytes, stream);
}
inline cudaError_t cudaGetDevice(int* device) { return cuda_emu::get_device(device); }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  return cuda_emu::device_get_attribute(value, attr, device);
}
inline cudaError_t cudaGetLastError() { return cuda_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return cuda_emu::error_string(err); }
