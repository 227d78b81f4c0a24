// Kernel launches and dynamic shared memory, spelled once so that the host
// emulation in tests/cuda_emulation can compile the kernels unchanged: there
// they expand to calls into the emulated runtime instead of CUDA syntax.
#pragma once

#if defined(TORCHJAC_CUDA_EMULATION)
// kernel comes last: template arguments hold commas.
#define TORCHJAC_LAUNCH(grid, block, smem_bytes, stream, ...) \
  ::cuda_emu::launch(__VA_ARGS__, grid, block, smem_bytes, stream, __FILE__, __LINE__)
#define TORCHJAC_DYNAMIC_SMEM(name) unsigned char* const name = ::cuda_emu::dynamic_shared_memory()
#else
#define TORCHJAC_LAUNCH(grid, block, smem_bytes, stream, ...) __VA_ARGS__<<<grid, block, smem_bytes, stream>>>
#define TORCHJAC_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]  // WMMA needs 32
#endif
