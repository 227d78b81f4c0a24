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
// reported by mlp_backward_unsupported_reason.
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

  // Device scratch of mlp_backward_workspace_bytes(args, device) bytes (may be null if 0).
  void* workspace = nullptr;
};

// Null when the fused kernels cover `args` on `device`, else a short reason (a
// string literal) for the fallback warning. Shapes must already be consistent.
const char* mlp_backward_unsupported_reason(const MlpBackwardArgs& args, int device);

inline bool mlp_backward_supported(const MlpBackwardArgs& args, int device) {
  return mlp_backward_unsupported_reason(args, device) == nullptr;
}

// Scratch the launch on `device` needs, independent of the number of points
// except for broadcast cond (see docs/cuda.md, "Backward kernels: memory"):
//   per resident block: the tile's pre-activations of every layer and a partial
//   sum of every weight and bias gradient; with broadcast cond, the per-point
//   cond gradients (num_points x cond_dim) before they are summed per cond row.
size_t mlp_backward_workspace_bytes(const MlpBackwardArgs& args, int device);

// Enqueues the backward on `stream` (no synchronisation); the current device
// must be the one the workspace was sized for. Returns cudaErrorNotSupported
// when mlp_backward_supported is false, otherwise the first launch error.
// num_points == 0 writes zero gradients.
cudaError_t mlp_backward_launch(const MlpBackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchjac
