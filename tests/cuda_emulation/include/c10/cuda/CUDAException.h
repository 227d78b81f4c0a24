// Emulated C10_CUDA_CHECK for tests/cuda_emulation: the error message also
// carries the emulator's account of what was wrong with the launch.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                                                      \
  do {                                                                                                            \
    const cudaError_t torchjac_emu_err = (EXPR);                                                                  \
    TORCH_CHECK(torchjac_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(torchjac_emu_err), " (",       \
                ::cuda_emu::last_error_detail(), ")");                                                            \
  } while (0)
