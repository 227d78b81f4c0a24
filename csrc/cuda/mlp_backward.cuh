// Fused backward kernels of the point-wise MLP ops (the mlp_*_backward ops of csrc/ops.cpp).
//
// Torch-independent: raw device pointers, int64 sizes, a cudaStream_t. The torch
// glue is mlp_backward_glue.cpp. Design, memory and precision: docs/cuda.md,
// "Backward kernels". The math is torchjac/reference.py `backward`.
//
// Inputs: the forward's arguments (MlpForwardArgs: the MLP, x, cond, the jvp
// tangents or the Hutchinson noise) and the gradients of a scalar loss w.r.t.
// the forward's two outputs,
//   grad_y    (N, d_out)
//   grad_out  kJacobian (N, d_out, d_in); kDivergence and kHutchinson (N,); kJvp (N, k, d_out)
// Outputs, the gradients of <grad_y, y> + <grad_out, out>, all contiguous:
//   grad_x        (N, d_in)
//   grad_cond     (G, c): summed over the points that read each cond row
//   grad_weights  [l] (out_l, in_l), grad_biases [l] (out_l,): summed over the points
//   grad_tangents (N, k, d_in), kJvp only. The Hutchinson noise is not differentiated.
//
// Coverage: that of the forward kernels (mlp_forward_unsupported_reason), and
// the backward tile must fit the device's shared memory. Everything else is
// reported by mlp_backward_plan.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "mlp_forward.cuh"

namespace torchjac {
namespace cuda {

struct MlpBackwardArgs {
  // The forward's arguments. Its y, out and workspace are not used.
  MlpForwardArgs forward;

  const void* grad_y = nullptr;    // (num_points, d_out)
  const void* grad_out = nullptr;  // see above

  void* grad_x = nullptr;               // (num_points, d_in)
  void* grad_cond = nullptr;            // (num_cond_rows, cond_dim); null when cond_dim == 0
  void* const* grad_weights = nullptr;  // host array of num_layers device pointers, (out_l, in_l) each
  void* const* grad_biases = nullptr;   // host array of num_layers device pointers, (out_l,) each
  void* grad_tangents = nullptr;        // kJvp: (num_points, num_tangents, d_in); otherwise unused

  // Device scratch of the plan's workspace_bytes() (may be null if 0).
  void* workspace = nullptr;
};

// The points of one broadcast cond row: cond row g is fixed by the kept dims
// of x's leading dims, and its points range over the broadcast dims.
struct CondGroups {
  int num_kept = 0;
  int64_t kept_sizes[kMaxCondDims] = {};
  int64_t kept_row_strides[kMaxCondDims] = {};
  int64_t kept_point_strides[kMaxCondDims] = {};
  int num_broadcast = 0;
  int64_t broadcast_sizes[kMaxCondDims] = {};
  int64_t broadcast_point_strides[kMaxCondDims] = {};
  int64_t points_per_row = 1;
};

// Everything about a launch that follows from the arguments and the device.
// mlp_backward_plan computes it once per call; it only reads the arguments and
// the device's properties, and asks how many blocks fit on an SM. (The first
// plan on a device also raises the kernels' shared memory limit there, once.)
struct MlpBackwardPlan {
  // Null when the fused kernels cover the call, else a short reason (a string
  // literal) for the fallback warning.
  const char* unsupported_reason = nullptr;
  int width = 0;                  // template width
  int hidden = 0;                 // H, 0 for a single layer
  int x_col = 0;
  int lda = 0;
  int rows = 0;
  int gemm_mode = 0;  // mainloop::GemmMode
  bool skip[kMaxLayers] = {};
  size_t elem = 0;
  size_t smem_bytes = 0;
  int64_t total_tangents = 0;  // d_in basis vectors, the jvp tangents or the noise samples
  int64_t per_pass = 0;        // tangents carried per pass
  int grid = 0;                // blocks of the main kernel, the same for every pass
  int sms = 0;
  int64_t state_stride = 0;    // elements of a block's state scratch
  int64_t partial_stride = 0;  // elements of a block's partial sums: every weight and bias
  bool cond_broadcast = false;  // some cond row is read by several points
  CondGroups cond_groups;
  int64_t cond_chunk = 0, cond_chunks = 0;
  size_t states_bytes = 0, partials_bytes = 0, cond_points_bytes = 0, cond_partials_bytes = 0;

  // Scratch the launch needs, independent of the number of points except for
  // broadcast cond (docs/cuda.md, "Backward kernels: memory"): per resident block
  // the tile's pre-activations of every layer and a partial sum of every weight
  // and bias gradient; with broadcast cond, the per-point cond gradients.
  size_t workspace_bytes() const { return states_bytes + partials_bytes + cond_points_bytes + cond_partials_bytes; }
};

// Shapes must already be consistent (the glue checks them).
MlpBackwardPlan mlp_backward_plan(const MlpBackwardArgs& args, int device);

// Enqueues the backward on `stream` (no synchronisation), with `plan` from
// mlp_backward_plan(args, current device). Returns cudaErrorNotSupported when
// the plan has an unsupported_reason, otherwise the first launch error.
// num_points == 0 writes zero gradients.
cudaError_t mlp_backward_launch(const MlpBackwardArgs& args, const MlpBackwardPlan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchjac
