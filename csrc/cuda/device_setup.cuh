// The once-per-device setup of a kernel file: the device's SM count, compute
// capability and opt-in shared memory per block, with the dynamic shared memory limit of each of the
// file's kernels raised to the latter. The limit is a per-kernel setting: set
// per call to that call's size, a concurrent call could lower it between another
// call's set and its launch.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>

namespace torchjac {
namespace cuda {

struct DeviceSetup {
  cudaError_t error = cudaSuccess;
  int max_smem_optin = 0;
  int sms = 0;
  int cc_major = 0;  // compute capability: tensor-core products need 8 (sm_80) or more
};

// Kernels::list() returns the file's kernels as const void*.
template <typename Kernels>
const DeviceSetup& device_setup(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceSetup> setups;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = setups.find(device);
  if (it != setups.end()) return it->second;
  DeviceSetup setup;
  setup.error = cudaDeviceGetAttribute(&setup.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (setup.error == cudaSuccess) setup.error = cudaDeviceGetAttribute(&setup.sms, cudaDevAttrMultiProcessorCount, device);
  if (setup.error == cudaSuccess) {
    setup.error = cudaDeviceGetAttribute(&setup.cc_major, cudaDevAttrComputeCapabilityMajor, device);
  }
  for (const void* kernel : Kernels::list()) {
    if (setup.error != cudaSuccess) break;
    setup.error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, setup.max_smem_optin);
  }
  if (setup.error != cudaSuccess) cudaGetLastError();  // clear the error we caused
  return setups.emplace(device, setup).first->second;
}

}  // namespace cuda
}  // namespace torchjac
