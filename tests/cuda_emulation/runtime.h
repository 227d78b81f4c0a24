// Controls of the emulated CUDA runtime (include/cuda_runtime.h), for the
// torch registration in register.cpp and the emulator's own checks.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace cuda_emu {

// How the threads of a block (and the blocks of a grid) are ordered between
// barriers: kForward runs them in index order, kReverse in reverse order,
// kShuffled in a seeded random order that changes at every barrier.
enum class Schedule : int { kForward = 0, kReverse = 1, kShuffled = 2 };
void set_schedule(Schedule schedule, uint64_t seed = 0);

// Emulated devices: 0 models an H100 SXM (132 SMs, 227 KiB opt-in shared
// memory per block, sm_90), 1 an A100 (108 SMs, 163 KiB, sm_80), 2 a V100 (80
// SMs, 96 KiB, sm_70: no TF32 or BF16 tensor cores).
constexpr int kNumDevices = 3;
void set_device(int device);

// Streams the tests can make current: 0 is the legacy default stream, 1 the
// stream current at start, 2 another stream.
void set_current_stream(int index);

// Counters of runtime calls, by name: "func_set_attribute",
// "attribute_lowered", "occupancy_queries", "device_attribute_queries",
// "launches", "blocks", "warp_collectives" (one per warp-wide MMA).
int64_t stat(const std::string& name);
void reset_stats();

// The seed of the fragment element mappings of include/mma.h. The first is
// TORCHJAC_EMU_FRAGMENT_SEED if set, else random; the registration's schedules
// each run under their own seed (register.cpp).
void set_fragment_seed(uint64_t seed);
uint64_t fragment_seed();

// True when blocks run as OS threads (TORCHJAC_EMU_THREADS=1, or a TSan build).
bool thread_backend();

}  // namespace cuda_emu
