// Schemas of the torchjac ops. Each schema is defined here and nowhere else.
//
// All ops share one description of a point-wise MLP:
//   x        (..., d_in)       points; only x is differentiated by the forward ops
//   cond     (..., c)          per-point condition, same ndim as x, each leading
//                              dim equal to x's or 1 (broadcast); c may be 0
//   weights  [W_0 .. W_{L-1}]  W_i has shape (out_i, in_i)
//   biases   [b_0 .. b_{L-1}]  b_i has shape (out_i,)
//   activations[i], activation_params[2i:2i+2]
//                              the activation applied after layer i (codes in
//                              torchjac/activations.py and csrc/cuda/activations.cuh)
//   skip_layers                layers whose input is cat([h, x, cond]); layer 0
//                              always reads cat([x, cond])
//
// The forward ops return the MLP output y (..., d_out) together with one
// forward-mode quantity; every forward op has a *_backward op that returns the
// gradients w.r.t. x, cond, weights, biases (and tangents for jvp).
//
// keep_states asks the forward for `states`, what its backward may reuse instead
// of recomputing: the pure-PyTorch reverse mode keeps each layer's pre-activation
// z (torchjac/reference.py, kept_shapes); the other modes and the fused kernels
// return it empty and recompute. The backward op takes that tensor, or None or an empty one
// to recompute.
#include <torch/library.h>

#define TORCHJAC_MLP_ARGS                                                        \
  "Tensor x, Tensor cond, Tensor[] weights, Tensor[] biases, int[] activations, " \
  "float[] activation_params, int[] skip_layers"

#define TORCHJAC_GRADS "Tensor grad_x, Tensor grad_cond, Tensor[] grad_weights, Tensor[] grad_biases"
#define TORCHJAC_KEEP "bool keep_states=False"
#define TORCHJAC_STATES "Tensor? states=None"

// The host emulation of the CUDA kernels (tests/cuda_emulation) defines the
// same schemas in a namespace of its own.
#ifndef TORCHJAC_OPS_NAMESPACE
#define TORCHJAC_OPS_NAMESPACE torchjac
#endif

TORCH_LIBRARY(TORCHJAC_OPS_NAMESPACE, m) {
  // J[..., i, j] = d y_i / d x_j, shape (..., d_out, d_in).
  m.def("mlp_jacobian(" TORCHJAC_MLP_ARGS ", " TORCHJAC_KEEP ") -> (Tensor y, Tensor jac, Tensor states)");
  // Trace of J, shape (...). Needs d_out == d_in.
  m.def("mlp_divergence(" TORCHJAC_MLP_ARGS ", " TORCHJAC_KEEP ") -> (Tensor y, Tensor div, Tensor states)");
  // tangents (..., k, d_in) -> J v for each of the k tangents, shape (..., k, d_out).
  m.def("mlp_jvp(" TORCHJAC_MLP_ARGS ", Tensor tangents, " TORCHJAC_KEEP ") -> (Tensor y, Tensor jvp, Tensor states)");
  // noise (..., S, d_in) -> mean over s of e_s^T J e_s, shape (...). Noise is not differentiated.
  m.def("mlp_hutchinson(" TORCHJAC_MLP_ARGS ", Tensor noise, " TORCHJAC_KEEP
        ") -> (Tensor y, Tensor div, Tensor states)");

  // The same J from d_out cotangent rows carried back through the layers: cheaper when d_out < d_in.
  m.def("mlp_jacobian_reverse(" TORCHJAC_MLP_ARGS ", " TORCHJAC_KEEP ") -> (Tensor y, Tensor jac, Tensor states)");

  // Second order. L[..., i] = sum_j d^2 y_i / d x_j^2, shape (..., d_out).
  m.def("mlp_laplacian(" TORCHJAC_MLP_ARGS ", " TORCHJAC_KEEP ") -> (Tensor y, Tensor lap, Tensor states)");
  // noise (..., S, d_in) -> mean over s of e_s^T H_i e_s, shape (..., d_out). Noise is not differentiated.
  m.def("mlp_laplacian_hutchinson(" TORCHJAC_MLP_ARGS ", Tensor noise, " TORCHJAC_KEEP
        ") -> (Tensor y, Tensor lap, Tensor states)");
  // H[..., i, j, k] = d^2 y_i / d x_j d x_k, shape (..., d_out, d_in, d_in).
  m.def("mlp_hessian(" TORCHJAC_MLP_ARGS ", " TORCHJAC_KEEP ") -> (Tensor y, Tensor hess, Tensor states)");

  m.def("mlp_jacobian_backward(Tensor grad_y, Tensor grad_jac, " TORCHJAC_MLP_ARGS ", " TORCHJAC_STATES
        ") -> (" TORCHJAC_GRADS ")");
  m.def("mlp_divergence_backward(Tensor grad_y, Tensor grad_div, " TORCHJAC_MLP_ARGS ", " TORCHJAC_STATES
        ") -> (" TORCHJAC_GRADS ")");
  m.def("mlp_jacobian_reverse_backward(Tensor grad_y, Tensor grad_jac, " TORCHJAC_MLP_ARGS ", " TORCHJAC_STATES
        ") -> (" TORCHJAC_GRADS ")");
  m.def("mlp_jvp_backward(Tensor grad_y, Tensor grad_jvp, " TORCHJAC_MLP_ARGS ", Tensor tangents, " TORCHJAC_STATES
        ") -> (" TORCHJAC_GRADS ", Tensor grad_tangents)");
  m.def("mlp_hutchinson_backward(Tensor grad_y, Tensor grad_div, " TORCHJAC_MLP_ARGS ", Tensor noise, " TORCHJAC_STATES
        ") -> (" TORCHJAC_GRADS ")");
  m.def("mlp_laplacian_backward(Tensor grad_y, Tensor grad_lap, " TORCHJAC_MLP_ARGS ", " TORCHJAC_STATES
        ") -> (" TORCHJAC_GRADS ")");
  m.def("mlp_laplacian_hutchinson_backward(Tensor grad_y, Tensor grad_lap, " TORCHJAC_MLP_ARGS ", Tensor noise, "
        TORCHJAC_STATES ") -> (" TORCHJAC_GRADS ")");
  m.def("mlp_hessian_backward(Tensor grad_y, Tensor grad_hess, " TORCHJAC_MLP_ARGS ", " TORCHJAC_STATES
        ") -> (" TORCHJAC_GRADS ")");

  // The pure-PyTorch path of any forward op above (mode: "jacobian", "divergence", "jvp",
  // "hutchinson", "jacobian_reverse", "laplacian", "laplacian_hutchinson", "hessian"; tangents
  // holds the jvp tangents or the noise). Fused
  // kernels call it for shapes their templates do not cover.
  m.def("mlp_reference_forward(str mode, " TORCHJAC_MLP_ARGS ", Tensor? tangents, " TORCHJAC_KEEP
        ") -> (Tensor y, Tensor out, Tensor states)");
  // The pure-PyTorch path of any backward op above; grad_tangents is empty unless mode is "jvp".
  m.def("mlp_reference_backward(str mode, Tensor grad_y, Tensor grad_out, " TORCHJAC_MLP_ARGS
        ", Tensor? tangents, " TORCHJAC_STATES ") -> (" TORCHJAC_GRADS ", Tensor grad_tangents)");
}
