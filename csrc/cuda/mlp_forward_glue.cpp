// CUDA kernels of the forward ops mlp_jacobian, mlp_divergence, mlp_jvp,
// mlp_hutchinson and the second-order mlp_laplacian, mlp_laplacian_hutchinson
// and mlp_hessian: argument checks, then the fused kernels of mlp_forward.cu.
//
// Dependency: MLPs the fused kernels do not cover (see mlp_forward.cuh) run
// torchjac::mlp_reference_forward instead, after a one-time warning. Its schema
// is in csrc/ops.cpp; its kernel, the pure-PyTorch path, is registered under
// CompositeExplicitAutograd by torchjac/ops.py when the package is imported.
//
// The fused kernels keep no states for the backward, which recomputes on chip:
// the states output is always empty here, whatever keep_states asks.
//
// Argument errors raise ValueError/TypeError with the messages of the Python
// checks in torchjac/ops.py (check_mlp_args), so both paths read alike
// (glue_common.h, shared with the backward glue).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "glue_common.h"
#include "mlp_forward.cuh"

namespace {

using torchjac::cuda::MlpMode;
using torchjac::glue::MlpInputs;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // y, out, states

using ReferenceSignature = Outputs(c10::string_view, const at::Tensor&, const at::Tensor&, at::TensorList,
                                   at::TensorList, at::IntArrayRef, at::ArrayRef<double>, at::IntArrayRef,
                                   const std::optional<at::Tensor>&, bool);

Outputs reference_forward(MlpMode mode, const MlpInputs& in, const char* reason) {
  TORCH_WARN_ONCE("torchjac: the fused CUDA forward kernels do not cover this call (", reason,
                  "); running the PyTorch reference path instead, which is slower and uses more memory. "
                  "This warning is shown once per process.");
  static const auto op = [] {
    auto handle = c10::Dispatcher::singleton().findSchema({"torchjac::mlp_reference_forward", ""});
    TORCH_CHECK(handle.has_value(),
                "torchjac: the fallback op torchjac::mlp_reference_forward has no schema; "
                "it is defined in csrc/ops.cpp and implemented by `import torchjac`");
    return handle->typed<ReferenceSignature>();
  }();
  std::optional<at::Tensor> tangents;
  if (in.tangents != nullptr) tangents = *in.tangents;
  return op.call(torchjac::glue::mode_name(mode), in.x, in.cond, in.weights, in.biases, in.activations,
                 in.activation_params, in.skip_layers, tangents, /*keep_states=*/false);
}

at::Tensor no_states(const at::Tensor& x) { return at::empty({0}, x.options()); }

Outputs forward(MlpMode mode, const MlpInputs& in) {
  const std::string op_prefix = std::string("torchjac.mlp_") + torchjac::glue::mode_name(mode) + ": ";
  const int64_t d_out = torchjac::glue::check_mlp_inputs(op_prefix, mode, in);
  const at::Tensor& x = in.x;
  const int64_t d_in = x.size(-1);
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  const int64_t num_points = c10::multiply_integers(lead);
  const int64_t k = in.tangents != nullptr ? in.tangents->size(-2) : d_in;

  std::vector<int64_t> y_shape(lead.begin(), lead.end());
  y_shape.push_back(d_out);
  std::vector<int64_t> out_shape(lead.begin(), lead.end());
  if (mode == MlpMode::kJacobian) out_shape.insert(out_shape.end(), {d_out, d_in});
  if (mode == MlpMode::kJvp) out_shape.insert(out_shape.end(), {k, d_out});
  if (mode == MlpMode::kLaplacian || mode == MlpMode::kLaplacianHutchinson) out_shape.push_back(d_out);
  if (mode == MlpMode::kHessian) out_shape.insert(out_shape.end(), {d_out, d_in, d_in});
  if (num_points == 0) return {at::empty(y_shape, x.options()), at::empty(out_shape, x.options()), no_states(x)};

  const c10::cuda::CUDAGuard guard(x.device());
  torchjac::glue::MlpShapes shapes;
  torchjac::glue::describe_mlp(mode, in, d_out, &shapes);
  torchjac::cuda::MlpForwardArgs& args = shapes.args;
  if (!shapes.cond_map_ok) return reference_forward(mode, in, "cond broadcasts over too many separate dims");

  // Decide on shapes alone first, so a fallback makes no copies.
  const int device = torchjac::glue::kernel_device_index(x);
  const torchjac::cuda::MlpForwardPlan plan = torchjac::cuda::mlp_forward_plan(args, device);
  if (plan.unsupported_reason != nullptr) return reference_forward(mode, in, plan.unsupported_reason);

  const torchjac::glue::ContiguousMlp contiguous(in, &args);
  at::Tensor y = at::empty(y_shape, x.options());
  at::Tensor out = at::empty(out_shape, x.options());
  args.y = y.data_ptr();
  args.out = out.data_ptr();
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
    args.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(torchjac::cuda::mlp_forward_launch(args, plan, c10::cuda::getCurrentCUDAStream()));
  return {y, out, no_states(x)};
}

Outputs mlp_jacobian_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                          at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                          at::IntArrayRef skip_layers, bool /*keep_states*/) {
  return forward(MlpMode::kJacobian,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, nullptr});
}

Outputs mlp_divergence_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights,
                            at::TensorList biases, at::IntArrayRef activations,
                            at::ArrayRef<double> activation_params, at::IntArrayRef skip_layers,
                            bool /*keep_states*/) {
  return forward(MlpMode::kDivergence,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, nullptr});
}

Outputs mlp_jvp_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                     at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                     at::IntArrayRef skip_layers, const at::Tensor& tangents, bool /*keep_states*/) {
  return forward(MlpMode::kJvp, {x, cond, weights, biases, activations, activation_params, skip_layers, &tangents});
}

Outputs mlp_hutchinson_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights,
                            at::TensorList biases, at::IntArrayRef activations,
                            at::ArrayRef<double> activation_params, at::IntArrayRef skip_layers,
                            const at::Tensor& noise, bool /*keep_states*/) {
  return forward(MlpMode::kHutchinson,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, &noise});
}

Outputs mlp_laplacian_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights,
                           at::TensorList biases, at::IntArrayRef activations,
                           at::ArrayRef<double> activation_params, at::IntArrayRef skip_layers,
                           bool /*keep_states*/) {
  return forward(MlpMode::kLaplacian,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, nullptr});
}

Outputs mlp_laplacian_hutchinson_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights,
                                      at::TensorList biases, at::IntArrayRef activations,
                                      at::ArrayRef<double> activation_params, at::IntArrayRef skip_layers,
                                      const at::Tensor& noise, bool /*keep_states*/) {
  return forward(MlpMode::kLaplacianHutchinson,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, &noise});
}

Outputs mlp_hessian_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                         at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                         at::IntArrayRef skip_layers, bool /*keep_states*/) {
  return forward(MlpMode::kHessian, {x, cond, weights, biases, activations, activation_params, skip_layers, nullptr});
}

}  // namespace

TORCHJAC_KERNELS_LIBRARY_IMPL(m) {
  m.impl("mlp_jacobian", &mlp_jacobian_cuda);
  m.impl("mlp_divergence", &mlp_divergence_cuda);
  m.impl("mlp_jvp", &mlp_jvp_cuda);
  m.impl("mlp_hutchinson", &mlp_hutchinson_cuda);
  m.impl("mlp_laplacian", &mlp_laplacian_cuda);
  m.impl("mlp_laplacian_hutchinson", &mlp_laplacian_hutchinson_cuda);
  m.impl("mlp_hessian", &mlp_hessian_cuda);
}
