// The torch side of the CUDA emulation.
//
// The real glue (csrc/cuda/*_glue.cpp), compiled with TORCHJAC_CUDA_EMULATION,
// registers the emulated kernels as CPU kernels of torchjac_emu::<op>, whose
// schemas are csrc/ops.cpp's. torchjac_emu::redirect(True) then makes them the
// CPU kernels of torchjac::<op> as well, behind a wrapper that runs every call
// under several schedules and requires bitwise equal results. This file also
// holds the emulator's controls and the kernels of its own checks.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_pipeline.h>
#include <mma.h>

#include "activations.cuh"
#include "launch.cuh"
#include "runtime.h"

namespace {

const char* const kOps[] = {"mlp_jacobian",          "mlp_divergence",          "mlp_jvp",
                            "mlp_hutchinson",        "mlp_laplacian",           "mlp_laplacian_hutchinson",
                            "mlp_hessian",           "mlp_jacobian_backward",   "mlp_divergence_backward",
                            "mlp_jvp_backward",      "mlp_hutchinson_backward"};

int num_schedules = 2;

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.strides() != b.strides() || a.scalar_type() != b.scalar_type()) return false;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  return ac.nbytes() == 0 || std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) == 0;
}

std::vector<at::Tensor> tensors_of(const c10::IValue& v) {
  if (v.isTensor()) return {v.toTensor()};
  if (v.isTensorList()) return v.toTensorVector();
  TORCH_CHECK(false, "cuda emulation: unexpected output type ", v.tagKind());
}

// Each schedule also runs under its own fragment element mapping (include/mma.h).
const uint64_t base_fragment_seed = cuda_emu::fragment_seed();

void check_equal(const std::string& op, int schedule, const std::vector<c10::IValue>& first,
                 const std::vector<c10::IValue>& other) {
  TORCH_CHECK(first.size() == other.size(), "cuda emulation: ", op, " returned a different number of outputs");
  for (size_t i = 0; i < first.size(); ++i) {
    const auto a = tensors_of(first[i]), b = tensors_of(other[i]);
    TORCH_CHECK(a.size() == b.size(), "cuda emulation: ", op, " output ", i, " differs in length between schedules");
    for (size_t j = 0; j < a.size(); ++j) {
      TORCH_CHECK(bitwise_equal(a[j], b[j]), "cuda emulation: ", op, " output ", i, "[", j,
                  "] differs between schedule 0 (forward order, fragment seed ", base_fragment_seed,
                  ") and schedule ", schedule, " (fragment seed ", base_fragment_seed + schedule,
                  "): a race between threads or blocks, or code that assumes a WMMA fragment's element mapping");
    }
  }
}

// Deterministic mode makes at::empty fill new float tensors with NaN (integers
// with their maximum), so that any output element a kernel fails to write shows.
struct NanFilledOutputs {
  bool det, warn_only, fill;
  NanFilledOutputs() {
    auto& ctx = at::globalContext();
    det = ctx.deterministicAlgorithms();
    warn_only = ctx.deterministicAlgorithmsWarnOnly();
    fill = ctx.deterministicFillUninitializedMemory();
    ctx.setDeterministicAlgorithms(true, /*warn_only=*/true);
    ctx.setDeterministicFillUninitializedMemory(true);
  }
  ~NanFilledOutputs() {
    auto& ctx = at::globalContext();
    ctx.setDeterministicAlgorithms(det, warn_only);
    ctx.setDeterministicFillUninitializedMemory(fill);
    cuda_emu::set_schedule(cuda_emu::Schedule::kForward);
    cuda_emu::set_fragment_seed(base_fragment_seed);
  }
};

void run_under_schedules(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const std::string name = op.schema().name();
  const std::string emu_name = "torchjac_emu::" + name.substr(name.find("::") + 2);
  static std::mutex handles_mutex;
  c10::OperatorHandle emu = [&] {
    std::lock_guard<std::mutex> lock(handles_mutex);
    return c10::Dispatcher::singleton().findSchemaOrThrow(emu_name.c_str(), "");
  }();
  const size_t nargs = op.schema().arguments().size();
  const std::vector<c10::IValue> args(stack->end() - nargs, stack->end());
  torch::jit::drop(*stack, nargs);
  std::vector<c10::IValue> first;
  {
    NanFilledOutputs nan_filled;
    for (int s = 0; s < num_schedules; ++s) {
      torch::jit::Stack run(args.begin(), args.end());
      cuda_emu::set_schedule(static_cast<cuda_emu::Schedule>(s), /*seed=*/12345);
      cuda_emu::set_fragment_seed(base_fragment_seed + s);
      emu.callBoxed(&run);
      if (s == 0) {
        first = std::move(run);
      } else {
        check_equal(name, s, first, run);
      }
    }
  }
  for (c10::IValue& v : first) stack->push_back(std::move(v));
}

std::mutex redirect_mutex;
std::unique_ptr<torch::Library> redirect_library;

void redirect(bool on) {
  std::lock_guard<std::mutex> lock(redirect_mutex);
  if (on && !redirect_library) {
    redirect_library =
        std::make_unique<torch::Library>(torch::Library::IMPL, "torchjac", c10::DispatchKey::CPU, __FILE__, __LINE__);
    for (const char* op : kOps) redirect_library->impl(op, torch::CppFunction::makeFromBoxedFunction<&run_under_schedules>());
  } else if (!on) {
    redirect_library.reset();
  }
}

void set_schedules(int64_t n) {
  TORCH_CHECK(n >= 2 && n <= 3, "cuda emulation: schedules: expected 2 or 3, got ", n);
  num_schedules = static_cast<int>(n);
}

// Value, first and second derivative of activations.cuh on the host, element-wise.
std::tuple<at::Tensor, at::Tensor, at::Tensor> activation(int64_t code, double p0, double p1, const at::Tensor& z) {
  const at::Tensor zc = z.contiguous();
  at::Tensor value = at::empty_like(zc), d1 = at::empty_like(zc), d2 = at::empty_like(zc);
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "activation", [&] {
    const scalar_t* in = zc.data_ptr<scalar_t>();
    scalar_t *v = value.data_ptr<scalar_t>(), *g = d1.data_ptr<scalar_t>(), *h = d2.data_ptr<scalar_t>();
    for (int64_t i = 0; i < zc.numel(); ++i) {
      const auto d = torchjac::act::evaluate<scalar_t>(static_cast<int>(code), static_cast<scalar_t>(p0),
                                                        static_cast<scalar_t>(p1), in[i]);
      v[i] = d.value;
      g[i] = d.d1;
      h[i] = d.d2;
    }
  });
  return {value, d1, d2};
}

// ---------------------------------------------------------------------------
// Kernels of the emulator's own checks (tests/test_cuda_emulation.py).

__global__ void neighbour_kernel(float* out, int with_barrier) {
  TORCHJAC_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  const int i = threadIdx.x;
  s[i] = static_cast<float>(i);
  if (with_barrier) __syncthreads();
  out[i] = s[(i + 1) % blockDim.x];
}

__global__ void barrier_in_branch_kernel() {
  if (threadIdx.x < 16) __syncthreads();
}

__global__ void two_barriers_kernel() {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// One warp: D = A B (16 x 8 by 8 x 16, TF32) through WMMA fragments, as the kernels use them.
__global__ void wmma_product_kernel(const float* a, const float* b, float* d) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 8);
  wmma::load_matrix_sync(fb, b, 8);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// Wrong on purpose: takes lane l's x[0] to be element (l / 2, 8 * (l % 2)) of the accumulator.
__global__ void wmma_assumed_mapping_kernel(const float* c, float* out) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
  out[threadIdx.x] = acc.x[0];
}

// Each lane passes its own pointer: undefined on a device.
__global__ void wmma_lane_pointers_kernel(const float* a) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 8 * (threadIdx.x % 2), 8);
}

// Only half of the warp reaches the MMA.
__global__ void wmma_divergent_kernel(const float* a, const float* b, float* d) {
  if (threadIdx.x < 16) wmma_product_kernel(a, b, d);
}

// cp.async of 4 floats into shared memory: out[0..3] read before the wait, out[4..7] after it.
__global__ void cp_async_kernel(const float* src, float* out, int to_global) {
  TORCHJAC_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  __pipeline_memcpy_async(to_global ? out + 8 : s, src, 16);
  __pipeline_commit();
  for (int i = 0; i < 4; ++i) out[i] = s[i];
  __pipeline_wait_prior(0);
  for (int i = 0; i < 4; ++i) out[4 + i] = s[i];
}

__global__ void empty_kernel() {}
__global__ void big_smem_kernel() {}

// The message of a failed call, which is then cleared as cudaGetLastError would.
std::string error_detail(cudaError_t err) {
  cudaGetLastError();
  return err == cudaSuccess ? std::string() : cuda_emu::last_error_detail();
}

// The result of one check, as text: the emulator's error message, "" for none,
// or "equal"/"differ" for the schedule comparisons.
std::string selftest(const std::string& name) {
  cudaGetLastError();
  const cudaStream_t stream = cuda_emu::current_stream();
  if (name == "race_with_barrier" || name == "race_without_barrier") {
    const int with_barrier = name == "race_with_barrier";
    std::vector<float> forward(64), reverse(64);
    cuda_emu::set_schedule(cuda_emu::Schedule::kForward);
    TORCHJAC_LAUNCH(1, 64, 64 * sizeof(float), stream, neighbour_kernel)(forward.data(), with_barrier);
    cuda_emu::set_schedule(cuda_emu::Schedule::kReverse);
    TORCHJAC_LAUNCH(1, 64, 64 * sizeof(float), stream, neighbour_kernel)(reverse.data(), with_barrier);
    cuda_emu::set_schedule(cuda_emu::Schedule::kForward);
    TORCH_CHECK(cudaGetLastError() == cudaSuccess, cuda_emu::last_error_detail());
    return std::memcmp(forward.data(), reverse.data(), 64 * sizeof(float)) == 0 ? "equal" : "differ";
  }
  if (name == "wmma_product" || name == "wmma_assumed_mapping" || name == "wmma_divergent" ||
      name == "wmma_misaligned" || name == "wmma_lane_pointers") {
    // Small integers: every product and sum is exact in TF32 and FP32.
    alignas(32) float a[16 * 8], b[8 * 16], d[16 * 16 + 8], c[16 * 16], out[2][32];
    for (int i = 0; i < 16 * 8; ++i) a[i] = static_cast<float>(i % 7) - 3.0f;
    for (int i = 0; i < 8 * 16; ++i) b[i] = static_cast<float>(i % 5) - 2.0f;
    for (int i = 0; i < 16 * 16; ++i) c[i] = static_cast<float>(i);
    const uint64_t seed = cuda_emu::fragment_seed();
    std::string result;
    if (name == "wmma_product") {  // under two fragment mappings
      bool exact = true;
      for (int s = 0; s < 2; ++s) {
        cuda_emu::set_fragment_seed(seed + 1000 + s);
        TORCHJAC_LAUNCH(1, 32, 0, stream, wmma_product_kernel)(a, b, d);
        for (int r = 0; r < 16; ++r)
          for (int n = 0; n < 16; ++n) {
            float want = 0.0f;  // b is column-major: B(k, n) = b[n * 8 + k]
            for (int k = 0; k < 8; ++k) want += a[r * 8 + k] * b[n * 8 + k];
            exact = exact && d[r * 16 + n] == want;
          }
      }
      result = exact ? "exact" : "wrong";
    } else if (name == "wmma_assumed_mapping") {
      for (int s = 0; s < 2; ++s) {
        cuda_emu::set_fragment_seed(seed + 1000 + s);
        TORCHJAC_LAUNCH(1, 32, 0, stream, wmma_assumed_mapping_kernel)(c, out[s]);
      }
      result = std::memcmp(out[0], out[1], sizeof(out[0])) == 0 ? "equal" : "differ";
    } else if (name == "wmma_divergent") {
      TORCHJAC_LAUNCH(1, 32, 0, stream, wmma_divergent_kernel)(a, b, d);
      result = "not reached";
    } else if (name == "wmma_lane_pointers") {
      TORCHJAC_LAUNCH(1, 32, 0, stream, wmma_lane_pointers_kernel)(a);
      result = "not reached";
    } else {
      TORCHJAC_LAUNCH(1, 32, 0, stream, wmma_product_kernel)(a, b, d + 1);
      result = "not reached";
    }
    cuda_emu::set_fragment_seed(seed);
    TORCH_CHECK(cudaGetLastError() == cudaSuccess, cuda_emu::last_error_detail());
    return result;
  }
  if (name == "cp_async" || name == "cp_async_to_global") {
    alignas(16) float src[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    alignas(16) float out[12] = {};
    TORCHJAC_LAUNCH(1, 1, 16, stream, cp_async_kernel)(src, out, name == "cp_async_to_global");
    TORCH_CHECK(cudaGetLastError() == cudaSuccess, cuda_emu::last_error_detail());
    bool before_is_nan = true, after_is_copy = true;
    for (int i = 0; i < 4; ++i) {
      before_is_nan = before_is_nan && std::isnan(out[i]);
      after_is_copy = after_is_copy && out[4 + i] == src[i];
    }
    return std::string(before_is_nan ? "undefined before the wait" : "defined before the wait") +
           (after_is_copy ? ", copied after it" : ", wrong after it");
  }
  if (name == "barrier_in_branch") {
    TORCHJAC_LAUNCH(1, 64, 0, stream, barrier_in_branch_kernel)();
    return "not reached";
  }
  if (name == "two_barriers") {
    TORCHJAC_LAUNCH(1, 64, 0, stream, two_barriers_kernel)();
    return "not reached";
  }
  if (name == "block_limit") {
    TORCHJAC_LAUNCH(1, 1025, 0, stream, empty_kernel)();
    return error_detail(cudaGetLastError());
  }
  if (name == "grid_limit") {
    TORCHJAC_LAUNCH(dim3(1, 65536), 32, 0, stream, empty_kernel)();
    return error_detail(cudaGetLastError());
  }
  if (name == "smem_without_attribute") {
    TORCHJAC_LAUNCH(1, 32, 64 * 1024, stream, empty_kernel)();
    return error_detail(cudaGetLastError());
  }
  if (name == "smem_with_attribute") {  // raises big_smem_kernel's limit on the current device to 100 KiB
    cudaError_t err = cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
    if (err != cudaSuccess) return error_detail(err);
    TORCHJAC_LAUNCH(1, 32, 100 * 1024, stream, big_smem_kernel)();
    return error_detail(cudaGetLastError());
  }
  if (name == "smem_above_attribute") {
    TORCHJAC_LAUNCH(1, 32, 100 * 1024 + 1, stream, big_smem_kernel)();
    return error_detail(cudaGetLastError());
  }
  if (name == "attribute_200k") {  // within an H100's opt-in limit, not an A100's
    return error_detail(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  }
  if (name == "wrong_stream") {
    TORCHJAC_LAUNCH(1, 32, 0, nullptr, empty_kernel)();
    return error_detail(cudaGetLastError());
  }
  if (name == "memset_wrong_stream") {
    char byte = 0;
    return error_detail(cudaMemsetAsync(&byte, 0, 1, nullptr));
  }
  TORCH_CHECK(false, "cuda emulation: no self-test named ", name);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchjac_emu, m) {
  m.def("redirect(bool on) -> ()", &redirect);
  m.def("set_schedules(int n) -> ()", &set_schedules);
  m.def("set_device(int device) -> ()", [](int64_t d) { cuda_emu::set_device(static_cast<int>(d)); });
  m.def("set_current_stream(int index) -> ()", [](int64_t s) { cuda_emu::set_current_stream(static_cast<int>(s)); });
  m.def("stat(str name) -> int", [](std::string name) { return cuda_emu::stat(name); });
  m.def("reset_stats() -> ()", &cuda_emu::reset_stats);
  m.def("thread_backend() -> bool", &cuda_emu::thread_backend);
  m.def("fragment_seed() -> int", [] { return static_cast<int64_t>(cuda_emu::fragment_seed()); });
  m.def("activation(int code, float p0, float p1, Tensor z) -> (Tensor value, Tensor d1, Tensor d2)", &activation);
  m.def("selftest(str name) -> str", [](std::string name) { return selftest(name); });
}
