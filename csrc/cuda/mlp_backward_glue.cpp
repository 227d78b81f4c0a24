// CUDA kernels of the backward ops mlp_jacobian_backward, mlp_divergence_backward,
// mlp_jvp_backward and mlp_hutchinson_backward: argument checks, then the fused
// kernels of mlp_backward.cu.
//
// Dependency: MLPs the fused kernels do not cover (see mlp_backward.cuh) run
// torchjac::mlp_reference_backward instead, after a one-time warning. Its schema
// is in csrc/ops.cpp; its kernel, the pure-PyTorch path, is registered under
// CompositeExplicitAutograd by torchjac/ops.py when the package is imported.
// Double backward never reaches this file: it is autograd through the
// reference reverse pass (torchjac/ops.py), on any device.
//
// Argument errors raise ValueError/TypeError with the messages of the Python
// checks in torchjac/ops.py (check_mlp_args); the MLP checks are the
// forward glue's (glue_common.h).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "glue_common.h"
#include "mlp_backward.cuh"

namespace {

using torchjac::cuda::MlpBackwardArgs;
using torchjac::cuda::MlpMode;
using torchjac::glue::MlpInputs;
using Grads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;
using JvpGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// The name of the op's grad_out argument in csrc/ops.cpp.
const char* grad_out_name(MlpMode mode) {
  switch (mode) {
    case MlpMode::kJacobian: return "grad_jac";
    case MlpMode::kJvp: return "grad_jvp";
    default: return "grad_div";
  }
}

// The op arguments, as the schema passes them.
struct BackwardInputs {
  const at::Tensor& grad_y;
  const at::Tensor& grad_out;
  MlpInputs mlp;
};

using ReferenceSignature = JvpGrads(c10::string_view, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
                                    at::ArrayRef<double>, at::IntArrayRef, const std::optional<at::Tensor>&,
                                    const std::optional<at::Tensor>&);

JvpGrads reference_backward(MlpMode mode, const BackwardInputs& in, const char* reason) {
  TORCH_WARN_ONCE("torchjac: the fused CUDA backward kernels do not cover this call (", reason,
                  "); running the PyTorch reference path instead, which is slower and uses more memory. "
                  "This warning is shown once per process.");
  static const auto op = [] {
    auto handle = c10::Dispatcher::singleton().findSchema({"torchjac::mlp_reference_backward", ""});
    TORCH_CHECK(handle.has_value(),
                "torchjac: the fallback op torchjac::mlp_reference_backward has no schema; "
                "it is defined in csrc/ops.cpp and implemented by `import torchjac`");
    return handle->typed<ReferenceSignature>();
  }();
  const MlpInputs& m = in.mlp;
  std::optional<at::Tensor> tangents;
  if (m.tangents != nullptr) tangents = *m.tangents;
  return op.call(torchjac::glue::mode_name(mode), in.grad_y, in.grad_out, m.x, m.cond, m.weights, m.biases,
                 m.activations, m.activation_params, m.skip_layers, tangents, /*states=*/std::nullopt);
}

// Checks every shape, device and dtype; returns d_out.
int64_t check_inputs(MlpMode mode, const BackwardInputs& in) {
  using torchjac::glue::shape_str;
  const std::string op = std::string("torchjac.mlp_") + torchjac::glue::mode_name(mode) + "_backward: ";
  const char* gname = grad_out_name(mode);
  const int64_t d_out =
      torchjac::glue::check_mlp_inputs(op, mode, in.mlp, {{"grad_y", &in.grad_y}, {gname, &in.grad_out}});
  // The gradients have the shapes of the forward's outputs.
  const at::Tensor& x = in.mlp.x;
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  std::vector<int64_t> y_shape(lead.begin(), lead.end());
  y_shape.push_back(d_out);
  TORCH_CHECK_VALUE(in.grad_y.sizes() == at::IntArrayRef(y_shape), op, "grad_y: expected shape ", shape_str(y_shape),
                    " like y, got ", shape_str(in.grad_y.sizes()));
  std::vector<int64_t> out_shape(lead.begin(), lead.end());
  if (mode == MlpMode::kJacobian) out_shape.insert(out_shape.end(), {d_out, x.size(-1)});
  if (mode == MlpMode::kJvp) out_shape.insert(out_shape.end(), {in.mlp.tangents->size(-2), d_out});
  TORCH_CHECK_VALUE(in.grad_out.sizes() == at::IntArrayRef(out_shape), op, gname, ": expected shape ",
                    shape_str(out_shape), " like the forward's second output, got ", shape_str(in.grad_out.sizes()));
  return d_out;
}

JvpGrads zero_grads(const MlpInputs& in) {
  std::vector<at::Tensor> grad_weights, grad_biases;
  for (const at::Tensor& w : in.weights) grad_weights.push_back(at::zeros(w.sizes(), w.options()));
  for (const at::Tensor& b : in.biases) grad_biases.push_back(at::zeros(b.sizes(), b.options()));
  at::Tensor grad_tangents = in.tangents != nullptr ? at::zeros(in.tangents->sizes(), in.x.options())
                                                    : at::empty({0}, in.x.options());
  return {at::zeros(in.x.sizes(), in.x.options()), at::zeros(in.cond.sizes(), in.cond.options()), grad_weights,
          grad_biases, grad_tangents};
}

JvpGrads backward(MlpMode mode, const BackwardInputs& in) {
  const int64_t d_out = check_inputs(mode, in);
  const MlpInputs& m = in.mlp;
  const at::Tensor& x = m.x;
  const int64_t num_points = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  if (num_points == 0) return zero_grads(m);

  const c10::cuda::CUDAGuard guard(x.device());
  torchjac::glue::MlpShapes shapes;
  torchjac::glue::describe_mlp(mode, m, d_out, &shapes);
  if (!shapes.cond_map_ok) return reference_backward(mode, in, "cond broadcasts over too many separate dims");
  MlpBackwardArgs args;
  args.forward = shapes.args;

  // Decide on shapes alone first, so a fallback makes no copies.
  const int device = torchjac::glue::kernel_device_index(x);
  const torchjac::cuda::MlpBackwardPlan plan = torchjac::cuda::mlp_backward_plan(args, device);
  if (plan.unsupported_reason != nullptr) return reference_backward(mode, in, plan.unsupported_reason);

  // Expanded gradients (from a .sum(), say) become real tensors here.
  const torchjac::glue::ContiguousMlp contiguous(m, &args.forward);
  const at::Tensor grad_y_c = in.grad_y.contiguous();
  const at::Tensor grad_out_c = in.grad_out.contiguous();
  const int64_t L = static_cast<int64_t>(m.weights.size());
  std::vector<at::Tensor> grad_weights, grad_biases;
  std::vector<void*> grad_weight_ptrs, grad_bias_ptrs;
  for (int64_t l = 0; l < L; ++l) {
    grad_weights.push_back(at::empty(m.weights[l].sizes(), x.options()));
    grad_biases.push_back(at::empty(m.biases[l].sizes(), x.options()));
    grad_weight_ptrs.push_back(grad_weights.back().data_ptr());
    grad_bias_ptrs.push_back(grad_biases.back().data_ptr());
  }
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_cond = at::empty(m.cond.sizes(), x.options());
  at::Tensor grad_tangents = mode == MlpMode::kJvp ? at::empty(m.tangents->sizes(), x.options())
                                                   : at::empty({0}, x.options());
  args.grad_y = grad_y_c.data_ptr();
  args.grad_out = grad_out_c.data_ptr();
  args.grad_x = grad_x.data_ptr();
  args.grad_cond = args.forward.cond_dim > 0 ? grad_cond.data_ptr() : nullptr;
  args.grad_weights = grad_weight_ptrs.data();
  args.grad_biases = grad_bias_ptrs.data();
  args.grad_tangents = mode == MlpMode::kJvp ? grad_tangents.data_ptr() : nullptr;
  at::Tensor workspace;
  if (const size_t bytes = plan.workspace_bytes()) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    args.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(torchjac::cuda::mlp_backward_launch(args, plan, c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_cond, grad_weights, grad_biases, grad_tangents};
}

Grads without_tangents(JvpGrads grads) {
  return {std::move(std::get<0>(grads)), std::move(std::get<1>(grads)), std::move(std::get<2>(grads)),
          std::move(std::get<3>(grads))};
}

Grads mlp_jacobian_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_jac, const at::Tensor& x,
                                 const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                                 at::IntArrayRef skip_layers, const std::optional<at::Tensor>& /*states*/) {
  return without_tangents(backward(MlpMode::kJacobian, {grad_y, grad_jac, {x, cond, weights, biases, activations,
                                                        activation_params, skip_layers, nullptr}}));
}

Grads mlp_divergence_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_div, const at::Tensor& x,
                                   const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                                   at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                                   at::IntArrayRef skip_layers, const std::optional<at::Tensor>& /*states*/) {
  return without_tangents(backward(MlpMode::kDivergence, {grad_y, grad_div, {x, cond, weights, biases, activations,
                                                          activation_params, skip_layers, nullptr}}));
}

JvpGrads mlp_jvp_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_jvp, const at::Tensor& x,
                               const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                               at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                               at::IntArrayRef skip_layers, const at::Tensor& tangents,
                               const std::optional<at::Tensor>& /*states*/) {
  return backward(MlpMode::kJvp, {grad_y, grad_jvp, {x, cond, weights, biases, activations, activation_params,
                                                    skip_layers, &tangents}});
}

Grads mlp_hutchinson_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_div, const at::Tensor& x,
                                   const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                                   at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                                   at::IntArrayRef skip_layers, const at::Tensor& noise,
                                   const std::optional<at::Tensor>& /*states*/) {
  return without_tangents(backward(MlpMode::kHutchinson, {grad_y, grad_div, {x, cond, weights, biases, activations,
                                                          activation_params, skip_layers, &noise}}));
}

}  // namespace

TORCHJAC_KERNELS_LIBRARY_IMPL(m) {
  m.impl("mlp_jacobian_backward", &mlp_jacobian_backward_cuda);
  m.impl("mlp_divergence_backward", &mlp_divergence_backward_cuda);
  m.impl("mlp_jvp_backward", &mlp_jvp_backward_cuda);
  m.impl("mlp_hutchinson_backward", &mlp_hutchinson_backward_cuda);
}
