// Host emulation of the cp.async primitives of <cuda_pipeline.h> that csrc/cuda
// uses. A thread's copies are recorded and carried out at the latest moment the
// API allows: when a __pipeline_wait_prior of that thread covers their batch.
// Until then the destination holds NaN bytes (all bits set), so a read before
// the wait, or by another thread without a barrier after it, gives a wrong
// result. The checks: sizes 4, 8 or 16 bytes, both pointers aligned to the
// size, the destination in the block's shared memory, zfill <= size.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  cuda_emu::pipeline_copy(dst_shared, src_global, size_and_align, zfill);
}
inline void __pipeline_commit() { cuda_emu::pipeline_commit(); }
inline void __pipeline_wait_prior(size_t prior) { cuda_emu::pipeline_wait_prior(prior); }
