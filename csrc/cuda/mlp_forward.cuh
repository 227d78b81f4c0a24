// Fused forward kernels of a point-wise MLP with forward-mode tangents.
//
// Torch-independent: raw device pointers, int64 sizes, a cudaStream_t. The
// torch glue is mlp_forward_glue.cpp. See docs/cuda.md for the design.
//
// The MLP (as in csrc/ops.cpp), on N points:
//   x     (N, d_in)   contiguous
//   cond  (G, c)      contiguous; point p reads cond row cond_rows(p), see CondRowMap
//   W_l   (out_l, in_l) and b_l (out_l,), contiguous
//   layer 0 reads [x, cond]; a skip layer reads [h, x, cond]; others read h.
// Each point also carries k tangents, pushed through the layers by
//   t <- act'(z) * (W_h t + W_x v)   (v: the tangent's input direction).
// Modes and what they write besides y (N, d_out):
//   kJacobian    tangents = basis of x        -> out (N, d_out, d_in)
//   kDivergence  tangents = basis of x        -> out (N,), trace only
//   kJvp         tangents (N, k, d_in)        -> out (N, k, d_out)
//   kHutchinson  noise    (N, S, d_in)        -> out (N,), mean_s e_s^T J e_s
// Second order: after its k tangents each point carries m second-order rows,
//   s <- act'(z) * W_h s + act''(z) * q(tz)   (x's second derivatives are 0),
// with q the sum of the squared tangents (one collapsed row) or tz_a * tz_b
// (one row per pair a <= b); torchjac/reference.py is the reference math:
//   kLaplacian            basis of x, m = 1          -> out (N, d_out), sum_j d2 y / dx_j^2
//   kLaplacianHutchinson  noise (N, S, d_in), m = 1  -> out (N, d_out), mean_s e_s^T H e_s
//   kHessian              basis of x, m = d_in (d_in + 1) / 2 -> out (N, d_out, d_in, d_in)
// The second-order modes have no fused backward: their backward ops run the
// pure-PyTorch path.
//
// Coverage: float32 and float64; d_in, d_out <= 16; hidden layers all of one
// width H <= 256 (run by the smallest template width in {16,32,64,128,256}
// that holds H); up to kMaxLayers layers; the tile must fit the device's
// shared memory. Anything else is reported by mlp_forward_plan.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace torchjac {
namespace cuda {

enum class MlpMode : int {
  kJacobian = 0,
  kDivergence = 1,
  kJvp = 2,
  kHutchinson = 3,
  kLaplacian = 4,
  kLaplacianHutchinson = 5,
  kHessian = 6,
};

// Tangents that are the basis of x, the same at every point.
__host__ __device__ inline bool is_basis_mode(MlpMode mode) {
  return mode == MlpMode::kJacobian || mode == MlpMode::kDivergence || mode == MlpMode::kLaplacian ||
         mode == MlpMode::kHessian;
}

// Second-order rows a point carries after its k tangents.
__host__ __device__ inline int second_order_rows(MlpMode mode, int k) {
  if (mode == MlpMode::kLaplacian || mode == MlpMode::kLaplacianHutchinson) return 1;
  if (mode == MlpMode::kHessian) return k * (k + 1) / 2;
  return 0;
}

// The row, among a point's Hessian rows, of the pair (a, b), a <= b < k: the
// pairs are listed row by row, (0, 0), (0, 1), ..., (1, 1), ..., as
// torch.triu_indices does.
__host__ __device__ inline int hessian_pair_row(int a, int b, int k) { return a * k - a * (a - 1) / 2 + (b - a); }
enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1 };

// PyTorch's float32 matmul precision (torch.set_float32_matmul_precision), which
// picks how float32 hidden layers multiply (docs/cuda.md, "Precision"):
// 3xTF32 (FP32-accurate), TF32 or BF16 tensor cores. float64 ignores it.
enum class MatmulPrecision : int { kHighest = 0, kHigh = 1, kMedium = 2 };

constexpr int kMaxInOut = 16;           // d_in, d_out
constexpr int kMaxHiddenWidth = 256;
constexpr int kMaxLayers = 32;
constexpr int kMaxCondDims = 8;
constexpr int kMaxTangentsPerPass = 16;  // more tangents run as several passes

// Maps a point index p (row-major over x's leading dims) to its cond row:
//   row(p) = sum_d idx_d(p) * strides[d]   over the collapsed dims `sizes`,
// with stride 0 on broadcast dims. ndim == 0 means every point reads row 0.
struct CondRowMap {
  int ndim = 0;
  int64_t sizes[kMaxCondDims] = {};
  int64_t strides[kMaxCondDims] = {};
};

// The cond row read by point `point` (shared by the forward and backward kernels).
__host__ __device__ inline int64_t cond_row_of(const CondRowMap& m, int64_t point) {
  int64_t row = 0;
  for (int d = m.ndim - 1; d >= 0; --d) {
    const int64_t size = m.sizes[d];
    row += (point % size) * m.strides[d];
    point /= size;
  }
  return row;
}

struct MlpForwardArgs {
  MlpMode mode = MlpMode::kJacobian;
  ScalarKind dtype = ScalarKind::kFloat32;
  MatmulPrecision precision = MatmulPrecision::kHighest;
  int64_t num_points = 0;
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t cond_dim = 0;  // c, may be 0

  const void* x = nullptr;     // (num_points, d_in)
  const void* cond = nullptr;  // (num_cond_rows, cond_dim); null when cond_dim == 0
  int64_t num_cond_rows = 0;
  CondRowMap cond_rows;

  // Host arrays of num_layers entries; weights/biases hold device pointers.
  int64_t num_layers = 0;
  const void* const* weights = nullptr;
  const void* const* biases = nullptr;
  const int64_t* in_features = nullptr;
  const int64_t* out_features = nullptr;
  const int64_t* activations = nullptr;        // codes, csrc/cuda/activations.cuh
  const double* activation_params = nullptr;  // 2 * num_layers
  const int64_t* skip_layers = nullptr;        // layer indices, num_skip_layers entries
  int64_t num_skip_layers = 0;

  // kJvp: (num_points, num_tangents, d_in); kHutchinson, kLaplacianHutchinson: the noise, same layout.
  const void* tangents = nullptr;
  int64_t num_tangents = 0;

  void* y = nullptr;    // (num_points, d_out)
  void* out = nullptr;  // see the modes above

  // Device scratch of the plan's workspace_bytes (may be null if 0).
  void* workspace = nullptr;
};

// Everything about a launch that follows from the arguments and the device.
// mlp_forward_plan computes it once per call; it only reads the arguments and
// the device's properties. (The first plan on a device also raises the kernels'
// shared memory limit there, once: see device_setup in mlp_forward.cu.)
struct MlpForwardPlan {
  // Null when the fused kernels cover the call, else a short reason (a string
  // literal) for the fallback warning.
  const char* unsupported_reason = nullptr;
  // Scratch the launch needs: the cond projections W_c * cond of every layer
  // that reads cond, when cond is shared by many points (computed once per cond
  // row instead of once per point).
  size_t workspace_bytes = 0;

  // Launch details.
  int width = 0;   // template width
  int hidden = 0;  // H, 0 for a single layer
  int x_col = 0;
  int cond_in_kernel = 0;
  bool project_cond = false;
  int lda = 0;
  int rows = 0;
  int gemm_mode = 0;  // mainloop::GemmMode
  bool skip[kMaxLayers] = {};
  size_t elem = 0;
  size_t smem_bytes = 0;
};

// Shapes must already be consistent (the glue checks them); inconsistent ones
// are reported as unsupported too.
MlpForwardPlan mlp_forward_plan(const MlpForwardArgs& args, int device);

inline const char* mlp_forward_unsupported_reason(const MlpForwardArgs& args, int device) {
  return mlp_forward_plan(args, device).unsupported_reason;
}

// Enqueues the forward on `stream` (no synchronisation), with `plan` from
// mlp_forward_plan(args, current device). Returns cudaErrorNotSupported when
// the plan has an unsupported_reason, otherwise the launch status.
// num_points == 0 enqueues nothing.
cudaError_t mlp_forward_launch(const MlpForwardArgs& args, const MlpForwardPlan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchjac
