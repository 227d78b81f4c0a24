// The emulated CUDA runtime: device models, launch checks and the scheduler
// that runs each CUDA thread of a block as a fiber (or an OS thread).
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define CUDA_EMU_SANITIZED 1
#endif
#endif

namespace cuda_emu {

thread_local uint3 thread_idx{0, 0, 0};
thread_local uint3 block_idx{0, 0, 0};
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

namespace {

[[noreturn]] void fatal(const std::string& what) {
  std::fprintf(stderr, "cuda emulation: FATAL: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

struct DeviceModel {
  const char* name;
  int sms;
  int smem_per_block;        // without opting in
  int smem_per_block_optin;  // the most cudaFuncSetAttribute may allow
  int smem_per_sm;
  int max_threads_per_sm;
  int max_blocks_per_sm;
  int cc_major;
};
constexpr DeviceModel kDevices[kNumDevices] = {
    {"H100 SXM (emulated)", 132, 48 * 1024, 227 * 1024, 228 * 1024, 2048, 32, 9},
    {"A100 (emulated)", 108, 48 * 1024, 163 * 1024, 164 * 1024, 2048, 32, 8},
    {"V100 (emulated)", 80, 48 * 1024, 96 * 1024, 96 * 1024, 2048, 32, 7},
};
constexpr int kReservedSmemPerBlock = 1024;  // the driver's share of each block's shared memory

// Stream handles: index 0 is the legacy default stream (null).
CUstream_st* stream_handle(int index) {
  static char streams[3];
  return index == 0 ? nullptr : reinterpret_cast<CUstream_st*>(&streams[index]);
}

thread_local int current_device = 0;
thread_local int current_stream_index = 1;
thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_detail;
thread_local Schedule schedule = Schedule::kForward;
thread_local uint64_t schedule_seed = 0;

std::mutex state_mutex;  // guards the kernel attributes and the counters
std::map<std::pair<const void*, int>, int> max_dynamic_smem;  // (kernel, device) -> bytes
std::map<std::string, int64_t> counters;

void count(const char* name, int64_t n = 1) {
  std::lock_guard<std::mutex> lock(state_mutex);
  counters[name] += n;
}

cudaError_t fail(cudaError_t err, const std::string& detail) {
  last_error = err;
  last_detail = detail;
  return err;
}

// ---------------------------------------------------------------------------
// Fibers. One OS thread runs all the fibers of a block, one at a time; a fiber
// gives control back at a barrier or when its CUDA thread returns.

constexpr size_t kStackBytes = 256 * 1024;

#if defined(__x86_64__)
// Saves the callee-saved registers and the FP control words on the current
// stack, stores its pointer in *from, and resumes the stack `to`.
extern "C" void cuda_emu_switch_stack(void** from, void* to);
asm(R"(
  .text
  .globl cuda_emu_switch_stack
  .type cuda_emu_switch_stack, @function
cuda_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch_stack, .-cuda_emu_switch_stack
)");
#endif

enum class FiberState { kReady, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  FiberState state = FiberState::kReady;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  char* stack = nullptr;  // kStackBytes, above a guard page
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

struct Block;
thread_local Block* running_block = nullptr;

// One thread's cp.async copies: the open batch and the committed ones, oldest first.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t size, zfill;
};
struct Pipeline {
  std::vector<AsyncCopy> open;
  std::vector<std::vector<AsyncCopy>> committed;
};

// The lanes of one warp on their way through a warp_collective.
struct Warp {
  int arrived = 0;
  const char* file = nullptr;
  int line = 0;
  void* lanes[32] = {};
  uint64_t generation = 0;  // thread backend: completed collectives
};

struct Block {
  void (*run_thread)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;
  int current = -1;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  unsigned char* smem = nullptr;
  // Thread backend: a barrier of OS threads.
  std::mutex mutex;
  std::condition_variable cv;
  int nthreads = 0, waiting = 0, exited = 0;
  int warp_waiting = 0;  // thread backend: lanes blocked in warp collectives
  uint64_t generation = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::vector<Warp> warps;
  std::condition_variable warp_cv;
  std::vector<Pipeline> pipelines;  // per thread
  size_t smem_bytes = 0;
};

// Fiber stacks, kept for the life of the OS thread: mapping them per launch
// would cost more than most launches.
thread_local std::vector<char*> stack_pool;

void switch_to_scheduler(Block* b) {
  Fiber& f = b->fibers[b->current];
#if defined(__x86_64__)
  cuda_emu_switch_stack(&f.sp, b->scheduler_sp);
#else
  swapcontext(&f.context, &b->scheduler);
#endif
}

void fiber_main() {
  Block* b = running_block;
  b->run_thread(b->ctx);
  b->fibers[b->current].state = FiberState::kDone;
  switch_to_scheduler(b);
  fatal("a finished fiber was resumed");
}

#if defined(__x86_64__)
extern "C" void cuda_emu_fiber_entry() { fiber_main(); }
#endif

char* new_stack() {
  const size_t page = getpagesize();
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fatal("cannot allocate a fiber stack");
  mprotect(p, page, PROT_NONE);  // an overflow faults instead of corrupting a neighbour
  return static_cast<char*>(p) + page;
}

void start_fiber(Fiber& f) {
  f.state = FiberState::kReady;
#if defined(__x86_64__)
  // The frame cuda_emu_switch_stack pops: FP control words, six registers, then
  // the return address, 16-byte aligned as at a call.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // keeps the entry's stack aligned like a called function's
  *--sp = reinterpret_cast<void*>(&cuda_emu_fiber_entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  --sp;
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
#endif
}

void resume(Block* b, int i) {
  b->current = i;
  thread_idx = uint3{static_cast<unsigned>(i) % block_dim.x, static_cast<unsigned>(i) / block_dim.x % block_dim.y,
                     static_cast<unsigned>(i) / (block_dim.x * block_dim.y)};
  Fiber& f = b->fibers[i];
#if defined(__x86_64__)
  cuda_emu_switch_stack(&b->scheduler_sp, f.sp);
#else
  swapcontext(&b->scheduler, &f.context);
#endif
}

std::string site(const char* file, int line) {
  std::ostringstream s;
  s << (file ? file : "?") << ":" << line;
  return s.str();
}

void order_threads(std::vector<int>& order, std::mt19937_64& rng) {
  std::iota(order.begin(), order.end(), 0);
  if (schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  if (schedule == Schedule::kShuffled) std::shuffle(order.begin(), order.end(), rng);
}

void run_block_fibers(Block* b, std::mt19937_64& rng) {
  const int n = b->nthreads;
  b->warps.assign((n + 31) / 32, Warp{});
  b->pipelines.assign(n, Pipeline{});
  while (static_cast<int>(stack_pool.size()) < n) stack_pool.push_back(new_stack());
  b->fibers.assign(n, Fiber{});
  for (int i = 0; i < n; ++i) {
    b->fibers[i].stack = stack_pool[i];
    start_fiber(b->fibers[i]);
  }
  std::vector<int> order(n);
  for (;;) {
    // Run until every thread waits at a block barrier or has returned; the
    // last lane into a warp collective makes its warp ready again.
    for (bool any_ready = true; any_ready;) {
      order_threads(order, rng);
      for (int i : order)
        if (b->fibers[i].state == FiberState::kReady) resume(b, i);
      any_ready = false;
      for (const Fiber& f : b->fibers) any_ready = any_ready || f.state == FiberState::kReady;
    }
    for (int i = 0; i < n; ++i) {
      const Fiber& f = b->fibers[i];
      if (f.state == FiberState::kAtWarp) {
        fatal("divergent warp: lane " + std::to_string(i % 32) + " of warp " + std::to_string(i / 32) +
              " waits in a warp collective at " + site(f.barrier_file, f.barrier_line) +
              " that some lanes of its warp never reach");
      }
    }
    int at_barrier = 0, done = 0, first = -1;
    for (int i = 0; i < n; ++i) {
      if (b->fibers[i].state == FiberState::kDone) {
        ++done;
      } else {
        ++at_barrier;
        if (first < 0) first = i;
      }
    }
    if (at_barrier == 0) return;
    const Fiber& f0 = b->fibers[first];
    if (done > 0) {
      fatal("divergent barrier: thread " + std::to_string(first) + " waits at " + site(f0.barrier_file, f0.barrier_line) +
            " but " + std::to_string(done) + " thread(s) of the block have returned");
    }
    for (int i = 0; i < n; ++i) {
      const Fiber& f = b->fibers[i];
      if (f.barrier_line != f0.barrier_line || std::strcmp(f.barrier_file, f0.barrier_file) != 0) {
        fatal("divergent barrier: thread " + std::to_string(first) + " waits at " + site(f0.barrier_file, f0.barrier_line) +
              ", thread " + std::to_string(i) + " at " + site(f.barrier_file, f.barrier_line));
      }
    }
    for (Fiber& f : b->fibers) f.state = FiberState::kReady;
  }
}

// Thread backend: every thread has returned or waits, and some wait in a warp
// collective, which then can never complete: the other lanes of their warp
// returned or wait at a barrier. Called with the block's mutex held.
void check_warps_can_finish(const Block* b) {
  if (b->warp_waiting > 0 && b->waiting + b->warp_waiting + b->exited == b->nthreads) {
    fatal("divergent warp: " + std::to_string(b->warp_waiting) + " lane(s) wait in a warp collective that "
          "other lanes of their warp never reach (they returned, or wait at a barrier)");
  }
}

// Thread backend: what TSan can see. Order between barriers is the OS's.
void run_block_threads(Block* b) {
  const int n = b->nthreads;
  b->waiting = b->exited = b->warp_waiting = 0;
  b->warps.assign((n + 31) / 32, Warp{});
  b->pipelines.assign(n, Pipeline{});
  const uint3 bidx = block_idx;
  const dim3 bdim = block_dim, gdim = grid_dim;
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([b, i, bidx, bdim, gdim] {
      running_block = b;
      block_idx = bidx;
      block_dim = bdim;
      grid_dim = gdim;
      thread_idx = uint3{static_cast<unsigned>(i) % bdim.x, static_cast<unsigned>(i) / bdim.x % bdim.y,
                         static_cast<unsigned>(i) / (bdim.x * bdim.y)};
      b->run_thread(b->ctx);
      std::lock_guard<std::mutex> lock(b->mutex);
      ++b->exited;
      if (b->waiting > 0 && b->waiting + b->exited == b->nthreads) {
        fatal("divergent barrier: threads wait at " + site(b->barrier_file, b->barrier_line) + " but " +
              std::to_string(b->exited) + " thread(s) of the block have returned");
      }
      check_warps_can_finish(b);
    });
  }
  for (std::thread& t : threads) t.join();
}

void barrier_threads(Block* b, const char* file, int line) {
  std::unique_lock<std::mutex> lock(b->mutex);
  if (b->waiting == 0) {
    b->barrier_file = file;
    b->barrier_line = line;
  } else if (b->barrier_line != line || std::strcmp(b->barrier_file, file) != 0) {
    fatal("divergent barrier: threads wait at " + site(b->barrier_file, b->barrier_line) + " and at " +
          site(file, line));
  }
  if (b->exited > 0) {
    fatal("divergent barrier: a thread waits at " + site(file, line) + " but " + std::to_string(b->exited) +
          " thread(s) of the block have returned");
  }
  const uint64_t gen = b->generation;
  if (++b->waiting == b->nthreads) {
    b->waiting = 0;
    ++b->generation;
    b->cv.notify_all();
    return;
  }
  check_warps_can_finish(b);
  b->cv.wait(lock, [&] { return b->generation != gen; });
}

bool use_threads() {
#if defined(CUDA_EMU_SANITIZED)
  return true;
#else
  static const bool threads = [] {
    const char* v = std::getenv("TORCHJAC_EMU_THREADS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return threads;
#endif
}

int attribute_of(const void* kernel, int device) {
  std::lock_guard<std::mutex> lock(state_mutex);
  auto it = max_dynamic_smem.find({kernel, device});
  return it == max_dynamic_smem.end() ? kDevices[device].smem_per_block : it->second;
}

}  // namespace

// ---------------------------------------------------------------------------
// The device language.

void syncthreads(const char* file, int line) {
  Block* b = running_block;
  if (b == nullptr) fatal("__syncthreads outside a kernel at " + site(file, line));
  if (use_threads()) {
    barrier_threads(b, file, line);
    return;
  }
  Fiber& f = b->fibers[b->current];
  f.state = FiberState::kAtBarrier;
  f.barrier_file = file;
  f.barrier_line = line;
  const int me = b->current;
  switch_to_scheduler(b);
  b->current = me;
}

namespace {
// The calling CUDA thread's index in its block, x fastest (the order warps are cut in).
int linear_thread_index() {
  return static_cast<int>(thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z));
}
}  // namespace

int lane_id() { return linear_thread_index() % 32; }

void warp_collective(const char* file, int line, void* lane_data, void (*run)(void* const* lanes)) {
  Block* b = running_block;
  if (b == nullptr) fatal("a warp collective outside a kernel at " + site(file, line));
  if (b->nthreads % 32 != 0) fatal("a warp collective at " + site(file, line) + " in a block of " +
                                   std::to_string(b->nthreads) + " threads, not whole warps");
  const int me = linear_thread_index();
  Warp& w = b->warps[me / 32];
  std::unique_lock<std::mutex> lock(b->mutex, std::defer_lock);
  if (use_threads()) lock.lock();
  if (w.arrived == 0) {
    w.file = file;
    w.line = line;
  } else if (w.line != line || std::strcmp(w.file, file) != 0) {
    fatal("divergent warp: lanes of warp " + std::to_string(me / 32) + " wait in warp collectives at " +
          site(w.file, w.line) + " and at " + site(file, line));
  }
  w.lanes[me % 32] = lane_data;
  if (++w.arrived == 32) {
    count("warp_collectives");
    run(w.lanes);
    w.arrived = 0;
    if (use_threads()) {
      ++w.generation;
      b->warp_waiting -= 31;  // the other lanes, released here
      b->warp_cv.notify_all();
    } else {
      for (int l = 0; l < 32; ++l) {
        Fiber& f = b->fibers[me / 32 * 32 + l];
        if (f.state == FiberState::kAtWarp) f.state = FiberState::kReady;
      }
    }
    return;
  }
  if (use_threads()) {
    const uint64_t gen = w.generation;
    ++b->warp_waiting;
    check_warps_can_finish(b);
    b->warp_cv.wait(lock, [&] { return w.generation != gen; });
    return;
  }
  Fiber& f = b->fibers[b->current];
  f.state = FiberState::kAtWarp;
  f.barrier_file = file;
  f.barrier_line = line;
  switch_to_scheduler(b);
  b->current = me;
}

void device_fatal(const std::string& what) { fatal(what); }

namespace {
Pipeline& my_pipeline(const char* what) {
  Block* b = running_block;
  if (b == nullptr) fatal(std::string(what) + " outside a kernel");
  const int me = linear_thread_index();
  return b->pipelines[me];
}
}  // namespace

void pipeline_copy(void* dst, const void* src, size_t size, size_t zfill) {
  Pipeline& p = my_pipeline("__pipeline_memcpy_async");
  const Block* b = running_block;
  if (size != 4 && size != 8 && size != 16) fatal("__pipeline_memcpy_async of " + std::to_string(size) + " bytes");
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0) {
    fatal("__pipeline_memcpy_async: a pointer is not aligned to the copy's " + std::to_string(size) + " bytes");
  }
  if (zfill > size) fatal("__pipeline_memcpy_async: zfill exceeds the size");
  const unsigned char* d = static_cast<const unsigned char*>(dst);
  if (d < b->smem || d + size > b->smem + b->smem_bytes) {
    fatal("__pipeline_memcpy_async: the destination is not in the block's dynamic shared memory");
  }
  std::memset(dst, 0xff, size);  // undefined until the wait: NaN
  p.open.push_back(AsyncCopy{dst, src, size, zfill});
}

void pipeline_commit() {
  Pipeline& p = my_pipeline("__pipeline_commit");
  p.committed.push_back(std::move(p.open));
  p.open.clear();
}

void pipeline_wait_prior(size_t prior) {
  Pipeline& p = my_pipeline("__pipeline_wait_prior");
  const size_t done = p.committed.size() > prior ? p.committed.size() - prior : 0;
  for (size_t i = 0; i < done; ++i) {
    for (const AsyncCopy& c : p.committed[i]) {
      std::memcpy(c.dst, c.src, c.size - c.zfill);
      std::memset(static_cast<unsigned char*>(c.dst) + (c.size - c.zfill), 0, c.zfill);
    }
  }
  p.committed.erase(p.committed.begin(), p.committed.begin() + static_cast<std::ptrdiff_t>(done));
}

unsigned char* dynamic_shared_memory() {
  if (running_block == nullptr) fatal("dynamic shared memory outside a kernel");
  return running_block->smem;
}

// ---------------------------------------------------------------------------
// The runtime API.

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  count("func_set_attribute");
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue, "unknown attribute");
  const DeviceModel& d = kDevices[current_device];
  if (value < 0 || value > d.smem_per_block_optin) {
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                                           ") exceeds the " + d.name + " opt-in limit of " +
                                           std::to_string(d.smem_per_block_optin) + " bytes");
  }
  std::lock_guard<std::mutex> lock(state_mutex);
  auto key = std::make_pair(kernel, current_device);
  auto it = max_dynamic_smem.find(key);
  if (it != max_dynamic_smem.end() && value < it->second) ++counters["attribute_lowered"];
  max_dynamic_smem[key] = value;
  return cudaSuccess;
}

cudaError_t occupancy_max_active_blocks(int* blocks, const void* kernel, int threads, size_t smem_bytes) {
  count("occupancy_queries");
  const DeviceModel& d = kDevices[current_device];
  if (threads < 1 || threads > 1024) return fail(cudaErrorInvalidValue, "occupancy query with a bad block size");
  // Registers are not modelled: only threads and shared memory limit residency.
  int n = std::min(d.max_blocks_per_sm, d.max_threads_per_sm / threads);
  if (smem_bytes > static_cast<size_t>(attribute_of(kernel, current_device))) {
    n = 0;  // the launch would fail
  } else if (smem_bytes > 0) {
    n = std::min<int>(n, d.smem_per_sm / static_cast<int>(smem_bytes + kReservedSmemPerBlock));
  }
  *blocks = n;
  return cudaSuccess;
}

cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  if (stream != current_stream()) {
    return fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync on a stream that is not the current stream");
  }
  if (bytes > 0 && ptr == nullptr) return fail(cudaErrorInvalidValue, "cudaMemsetAsync on a null pointer");
  if (bytes > 0) std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaStream_t current_stream() { return stream_handle(current_stream_index); }

cudaError_t get_device(int* device) {
  *device = current_device;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  count("device_attribute_queries");
  if (device < 0 || device >= kNumDevices) return fail(cudaErrorInvalidDevice, "no such emulated device");
  const DeviceModel& d = kDevices[device];
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_per_block; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "device attribute not emulated");
}

cudaError_t take_last_error() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

cudaError_t peek_last_error() { return last_error; }

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}

std::string last_error_detail() { return last_detail; }

void launch_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, const char* file,
                 int line, void (*run_thread)(void*), void* ctx) {
  const std::string where = " (launch at " + site(file, line) + ")";
  const DeviceModel& d = kDevices[current_device];
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024) {
    fail(cudaErrorInvalidConfiguration, "block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                                            std::to_string(block.z) + ") is outside CUDA's limits" + where);
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                                            std::to_string(grid.z) + ") is outside CUDA's limits" + where);
    return;
  }
  const int limit = attribute_of(kernel, current_device);
  if (smem_bytes > static_cast<size_t>(limit)) {
    fail(cudaErrorInvalidValue, std::to_string(smem_bytes) + " bytes of dynamic shared memory exceed the kernel's " +
                                    "limit of " + std::to_string(limit) + " on the " + d.name +
                                    (limit == d.smem_per_block ? " (no cudaFuncSetAttribute)" : "") + where);
    return;
  }
  if (stream != current_stream()) {
    fail(cudaErrorInvalidResourceHandle, "launch on a stream that is not the current stream" + where);
    return;
  }
  count("launches");
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  count("blocks", static_cast<int64_t>(nblocks));

  Block* outer = running_block;
  if (outer != nullptr) fatal("a kernel launched from inside a kernel" + where);
  Block b;
  b.run_thread = run_thread;
  b.ctx = ctx;
  b.nthreads = static_cast<int>(threads);
  // Exactly the bytes asked for (rounded to 16), so that ASan sees overruns;
  // 128-byte aligned, as a device's dynamic shared memory is at least.
  struct AlignedFree {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(128)); }
  };
  std::unique_ptr<unsigned char[], AlignedFree> smem(
      smem_bytes > 0 ? static_cast<unsigned char*>(::operator new[]((smem_bytes + 15) / 16 * 16, std::align_val_t(128)))
                     : nullptr);
  b.smem = smem.get();
  b.smem_bytes = smem_bytes;
  std::mt19937_64 rng(schedule_seed);
  std::vector<uint64_t> block_order(nblocks);
  std::iota(block_order.begin(), block_order.end(), 0);
  if (schedule == Schedule::kReverse) std::reverse(block_order.begin(), block_order.end());
  if (schedule == Schedule::kShuffled) std::shuffle(block_order.begin(), block_order.end(), rng);

  grid_dim = grid;
  block_dim = block;
  running_block = &b;
  for (uint64_t id : block_order) {
    block_idx = uint3{static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                      static_cast<unsigned>(id / (uint64_t(grid.x) * grid.y))};
    // Shared memory starts as NaN (all bits set) in every block.
    if (smem_bytes > 0) std::memset(b.smem, 0xff, smem_bytes);
    if (use_threads()) {
      run_block_threads(&b);
    } else {
      run_block_fibers(&b, rng);
    }
  }
  running_block = nullptr;
}

// ---------------------------------------------------------------------------
// Controls (runtime.h).

void set_schedule(Schedule s, uint64_t seed) {
  schedule = s;
  schedule_seed = seed;
}

void set_device(int device) {
  if (device < 0 || device >= kNumDevices) fatal("no emulated device " + std::to_string(device));
  current_device = device;
}

void set_current_stream(int index) {
  if (index < 0 || index > 2) fatal("no emulated stream " + std::to_string(index));
  current_stream_index = index;
}

int64_t stat(const std::string& name) {
  std::lock_guard<std::mutex> lock(state_mutex);
  auto it = counters.find(name);
  return it == counters.end() ? 0 : it->second;
}

void reset_stats() {
  std::lock_guard<std::mutex> lock(state_mutex);
  counters.clear();
}

bool thread_backend() { return use_threads(); }

// ---------------------------------------------------------------------------
// Fragment element mappings (include/mma.h).

namespace {
std::mutex fragment_mutex;
std::atomic<uint64_t> fragment_gen{1};
// A function-local static: other files' static initializers read it.
uint64_t& current_fragment_seed() {
  static uint64_t seed = [] {
    const char* v = std::getenv("TORCHJAC_EMU_FRAGMENT_SEED");
    return v != nullptr ? std::strtoull(v, nullptr, 10) : (uint64_t(std::random_device{}()) << 32 | std::random_device{}());
  }();
  return seed;
}
// Tables are never freed: fragments cache pointers to them per thread.
std::map<std::pair<uint64_t, std::string>, std::unique_ptr<std::vector<int>>> fragment_tables;
}  // namespace

void set_fragment_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(fragment_mutex);
  if (seed != current_fragment_seed()) {
    current_fragment_seed() = seed;
    ++fragment_gen;
  }
}

uint64_t fragment_seed() {
  std::lock_guard<std::mutex> lock(fragment_mutex);
  return current_fragment_seed();
}

uint64_t fragment_generation() { return fragment_gen.load(std::memory_order_acquire); }

const int* fragment_map(const char* kind, int size) {
  std::lock_guard<std::mutex> lock(fragment_mutex);
  const uint64_t seed = current_fragment_seed();
  auto& table = fragment_tables[{seed, kind}];
  if (!table) {
    table = std::make_unique<std::vector<int>>(size);
    std::iota(table->begin(), table->end(), 0);
    const uint64_t h = std::hash<std::string>{}(kind);
    std::seed_seq seq{uint32_t(seed), uint32_t(seed >> 32), uint32_t(h), uint32_t(h >> 32)};
    std::mt19937_64 rng(seq);
    std::shuffle(table->begin(), table->end(), rng);
  }
  return table->data();
}

}  // namespace cuda_emu
