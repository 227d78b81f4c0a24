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
// checks in torchjac/ops.py (check_mlp_args) and of mlp_forward_glue.cpp.
// The MLP checks mirror check_inputs in mlp_forward_glue.cpp; both would move
// to one shared header once the forward glue can be changed.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "activations.cuh"
#include "mlp_backward.cuh"

namespace {

using torchjac::cuda::MlpBackwardArgs;
using torchjac::cuda::MlpMode;
using Grads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;
using JvpGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

const char* mode_name(MlpMode mode) {
  switch (mode) {
    case MlpMode::kJacobian: return "jacobian";
    case MlpMode::kDivergence: return "divergence";
    case MlpMode::kJvp: return "jvp";
    case MlpMode::kHutchinson: return "hutchinson";
  }
  return "?";
}

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
  const at::Tensor& x;
  const at::Tensor& cond;
  at::TensorList weights;
  at::TensorList biases;
  at::IntArrayRef activations;
  at::ArrayRef<double> activation_params;
  at::IntArrayRef skip_layers;
  const at::Tensor* tangents;  // tangents (jvp), noise (hutchinson), else null
};

using ReferenceSignature = JvpGrads(c10::string_view, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
                                    at::ArrayRef<double>, at::IntArrayRef, const std::optional<at::Tensor>&);

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
  std::optional<at::Tensor> tangents;
  if (in.tangents != nullptr) tangents = *in.tangents;
  return op.call(mode_name(mode), in.grad_y, in.grad_out, in.x, in.cond, in.weights, in.biases, in.activations,
                 in.activation_params, in.skip_layers, tangents);
}

// How Python prints a dtype, so messages match torchjac/ops.py.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// Checks every shape, device and dtype; returns d_out.
int64_t check_inputs(MlpMode mode, const BackwardInputs& in) {
  const std::string op = std::string("torchjac.mlp_") + mode_name(mode) + "_backward: ";
  const at::Tensor& x = in.x;
  const at::Tensor& cond = in.cond;
  TORCH_CHECK_VALUE(x.dim() >= 1, op, "x: expected shape (..., d_in), got a 0-dim tensor");
  const int64_t d_in = x.size(-1);
  TORCH_CHECK_VALUE(cond.dim() == x.dim(), op, "cond: expected ", x.dim(),
                    " dims like x (leading dims equal to x's or 1), got shape ", shape_str(cond.sizes()));
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    TORCH_CHECK_VALUE(cond.size(d) == x.size(d) || cond.size(d) == 1, op, "cond: dim ", d, " is ", cond.size(d),
                      ", expected ", x.size(d), " (x's) or 1; x shape ", shape_str(x.sizes()), ", cond shape ",
                      shape_str(cond.sizes()));
  }
  const int64_t c = cond.size(-1);

  const int64_t L = static_cast<int64_t>(in.weights.size());
  TORCH_CHECK_VALUE(L >= 1, op, "weights: expected at least one layer, got none");
  TORCH_CHECK_VALUE(static_cast<int64_t>(in.biases.size()) == L && static_cast<int64_t>(in.activations.size()) == L &&
                        static_cast<int64_t>(in.activation_params.size()) == 2 * L,
                    op, "expected one bias, one activation and two activation_params per layer for ", L,
                    " layers, got ", in.biases.size(), " biases, ", in.activations.size(), " activations, ",
                    in.activation_params.size(), " activation_params");
  std::vector<bool> skip(L, false);
  for (int64_t l : in.skip_layers) {
    TORCH_CHECK_VALUE(l > 0 && l < L, op, "skip_layers: expected indices in [1, ", L - 1, "], got ",
                      in.skip_layers);
    skip[l] = true;
  }
  int64_t width = 0;  // outputs of the previous layer
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = in.weights[l];
    const at::Tensor& b = in.biases[l];
    const std::string wname = "weights[" + std::to_string(l) + "]";
    TORCH_CHECK_VALUE(w.dim() == 2, op, wname, ": expected a 2-dim (out, in) tensor, got shape ",
                      shape_str(w.sizes()));
    const int64_t expected_in = (l == 0 ? 0 : width) + ((l == 0 || skip[l]) ? d_in + c : 0);
    TORCH_CHECK_VALUE(w.size(1) == expected_in, op, wname, ": expected ", expected_in,
                      " input features, got shape ", shape_str(w.sizes()));
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), op, "biases[", l, "]: expected shape (", w.size(0),
                      ",), got ", shape_str(b.sizes()));
    const int64_t code = in.activations[l];
    TORCH_CHECK_VALUE(code >= 0 && code < torchjac::act::kNumCodes, op, "activations[", l,
                      "]: expected a code in [0, ", torchjac::act::kNumCodes - 1, "], got ", code);
    width = w.size(0);
  }
  const char* tname = mode == MlpMode::kHutchinson ? "noise" : "tangents";
  const char* gname = grad_out_name(mode);
  std::vector<std::pair<std::string, const at::Tensor*>> like_x = {{"grad_y", &in.grad_y}, {gname, &in.grad_out},
                                                                   {"cond", &cond}};
  for (int64_t l = 0; l < L; ++l) like_x.push_back({"weights[" + std::to_string(l) + "]", &in.weights[l]});
  for (int64_t l = 0; l < L; ++l) like_x.push_back({"biases[" + std::to_string(l) + "]", &in.biases[l]});
  if (in.tangents != nullptr) like_x.push_back({tname, in.tangents});
  for (const auto& [name, t] : like_x) {
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), op, name, ": expected dtype ",
                      dtype_name(x.scalar_type()), " like x, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == x.device(), op, name, ": expected device ", x.device(), " like x, got ",
                      t->device());
  }
  // Every tensor is on x's device, and one of them is on CUDA, or this kernel would not run.
  TORCH_CHECK(x.is_cuda(), op, "x: expected a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   "the fused CUDA kernels support float32 and float64, got x of dtype ",
                   dtype_name(x.scalar_type()));

  const int64_t d_out = width;
  if (mode == MlpMode::kDivergence || mode == MlpMode::kHutchinson) {
    TORCH_CHECK_VALUE(d_out == d_in, op, "divergence needs d_out == d_in, got d_in=", d_in, ", d_out=", d_out);
  }
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  if (in.tangents != nullptr) {
    const at::Tensor& t = *in.tangents;
    bool ok = t.dim() == x.dim() + 1 && t.size(-1) == d_in;
    for (int64_t d = 0; ok && d + 1 < x.dim(); ++d) ok = t.size(d) == x.size(d);
    std::string expected = "(";
    for (int64_t d : lead) expected += std::to_string(d) + ", ";
    TORCH_CHECK_VALUE(ok, op, tname, ": expected shape ", expected, "'k', ", d_in, "), got ", shape_str(t.sizes()));
    if (mode == MlpMode::kHutchinson) {
      TORCH_CHECK_VALUE(t.size(-2) >= 1, op, "noise: expected at least one sample, got shape ", shape_str(t.sizes()));
    }
  }
  // The gradients have the shapes of the forward's outputs.
  std::vector<int64_t> y_shape(lead.begin(), lead.end());
  y_shape.push_back(d_out);
  TORCH_CHECK_VALUE(in.grad_y.sizes() == at::IntArrayRef(y_shape), op, "grad_y: expected shape ", shape_str(y_shape),
                    " like y, got ", shape_str(in.grad_y.sizes()));
  std::vector<int64_t> out_shape(lead.begin(), lead.end());
  if (mode == MlpMode::kJacobian) out_shape.insert(out_shape.end(), {d_out, d_in});
  if (mode == MlpMode::kJvp) out_shape.insert(out_shape.end(), {in.tangents->size(-2), d_out});
  TORCH_CHECK_VALUE(in.grad_out.sizes() == at::IntArrayRef(out_shape), op, gname, ": expected shape ",
                    shape_str(out_shape), " like the forward's second output, got ", shape_str(in.grad_out.sizes()));
  return d_out;
}

// Row of cond (viewed as (G, c)) read by point p, as collapsed (size, stride)
// dims over x's leading dims; broadcast dims get stride 0. Same as in
// mlp_forward_glue.cpp.
bool make_cond_row_map(at::IntArrayRef lead, at::IntArrayRef cond_lead, torchjac::cuda::CondRowMap* map) {
  std::vector<int64_t> row_stride(lead.size());
  int64_t stride = 1;
  for (int64_t d = static_cast<int64_t>(lead.size()) - 1; d >= 0; --d) {
    row_stride[d] = stride;
    stride *= cond_lead[d];
  }
  std::vector<int64_t> sizes, strides;
  for (size_t d = 0; d < lead.size(); ++d) {
    if (lead[d] == 1) continue;
    const int64_t s = cond_lead[d] == 1 ? 0 : row_stride[d];
    if (!sizes.empty() && strides.back() == s * lead[d]) {
      sizes.back() *= lead[d];
      strides.back() = s;
    } else {
      sizes.push_back(lead[d]);
      strides.push_back(s);
    }
  }
  if (sizes.size() > static_cast<size_t>(torchjac::cuda::kMaxCondDims)) return false;
  map->ndim = static_cast<int>(sizes.size());
  for (size_t d = 0; d < sizes.size(); ++d) {
    map->sizes[d] = sizes[d];
    map->strides[d] = strides[d];
  }
  return true;
}

JvpGrads zero_grads(const BackwardInputs& in) {
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
  const at::Tensor& x = in.x;
  const int64_t d_in = x.size(-1);
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  const int64_t num_points = c10::multiply_integers(lead);
  if (num_points == 0) return zero_grads(in);

  const c10::cuda::CUDAGuard guard(x.device());

  MlpBackwardArgs args;
  torchjac::cuda::MlpForwardArgs& fwd = args.forward;
  fwd.mode = mode;
  fwd.dtype = x.scalar_type() == at::kDouble ? torchjac::cuda::ScalarKind::kFloat64
                                             : torchjac::cuda::ScalarKind::kFloat32;
  fwd.num_points = num_points;
  fwd.d_in = d_in;
  fwd.d_out = d_out;
  fwd.cond_dim = in.cond.size(-1);
  const at::IntArrayRef cond_lead = in.cond.sizes().slice(0, in.cond.dim() - 1);
  fwd.num_cond_rows = c10::multiply_integers(cond_lead);
  if (!make_cond_row_map(lead, cond_lead, &fwd.cond_rows)) {
    return reference_backward(mode, in, "cond broadcasts over too many separate dims");
  }

  const int64_t L = static_cast<int64_t>(in.weights.size());
  std::vector<int64_t> in_features(L), out_features(L);
  for (int64_t l = 0; l < L; ++l) {
    out_features[l] = in.weights[l].size(0);
    in_features[l] = in.weights[l].size(1);
  }
  fwd.num_layers = L;
  fwd.in_features = in_features.data();
  fwd.out_features = out_features.data();
  fwd.activations = in.activations.data();
  fwd.activation_params = in.activation_params.data();
  fwd.skip_layers = in.skip_layers.data();
  fwd.num_skip_layers = static_cast<int64_t>(in.skip_layers.size());
  fwd.num_tangents = in.tangents != nullptr ? in.tangents->size(-2) : 0;

  // Decide on shapes alone first, so a fallback makes no copies.
  const int device = x.get_device();
  if (const char* reason = torchjac::cuda::mlp_backward_unsupported_reason(args, device)) {
    return reference_backward(mode, in, reason);
  }

  // Expanded gradients (from a .sum(), say) become real tensors here.
  const at::Tensor x_c = x.contiguous();
  const at::Tensor cond_c = in.cond.contiguous();
  const at::Tensor grad_y_c = in.grad_y.contiguous();
  const at::Tensor grad_out_c = in.grad_out.contiguous();
  std::vector<at::Tensor> weights_c, biases_c, grad_weights, grad_biases;
  std::vector<const void*> weight_ptrs, bias_ptrs;
  std::vector<void*> grad_weight_ptrs, grad_bias_ptrs;
  for (int64_t l = 0; l < L; ++l) {
    weights_c.push_back(in.weights[l].contiguous());
    biases_c.push_back(in.biases[l].contiguous());
    weight_ptrs.push_back(weights_c.back().data_ptr());
    bias_ptrs.push_back(biases_c.back().data_ptr());
    grad_weights.push_back(at::empty(in.weights[l].sizes(), x.options()));
    grad_biases.push_back(at::empty(in.biases[l].sizes(), x.options()));
    grad_weight_ptrs.push_back(grad_weights.back().data_ptr());
    grad_bias_ptrs.push_back(grad_biases.back().data_ptr());
  }
  at::Tensor tangents_c;
  if (in.tangents != nullptr) tangents_c = in.tangents->contiguous();

  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_cond = at::empty(in.cond.sizes(), x.options());
  at::Tensor grad_tangents = mode == MlpMode::kJvp ? at::empty(in.tangents->sizes(), x.options())
                                                   : at::empty({0}, x.options());
  fwd.x = x_c.data_ptr();
  fwd.cond = fwd.cond_dim > 0 ? cond_c.data_ptr() : nullptr;
  fwd.weights = weight_ptrs.data();
  fwd.biases = bias_ptrs.data();
  fwd.tangents = tangents_c.defined() ? tangents_c.data_ptr() : nullptr;
  args.grad_y = grad_y_c.data_ptr();
  args.grad_out = grad_out_c.data_ptr();
  args.grad_x = grad_x.data_ptr();
  args.grad_cond = fwd.cond_dim > 0 ? grad_cond.data_ptr() : nullptr;
  args.grad_weights = grad_weight_ptrs.data();
  args.grad_biases = grad_bias_ptrs.data();
  args.grad_tangents = mode == MlpMode::kJvp ? grad_tangents.data_ptr() : nullptr;
  at::Tensor workspace;
  if (const size_t bytes = torchjac::cuda::mlp_backward_workspace_bytes(args, device)) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    args.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(torchjac::cuda::mlp_backward_launch(args, c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_cond, grad_weights, grad_biases, grad_tangents};
}

Grads without_tangents(JvpGrads grads) {
  return {std::move(std::get<0>(grads)), std::move(std::get<1>(grads)), std::move(std::get<2>(grads)),
          std::move(std::get<3>(grads))};
}

Grads mlp_jacobian_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_jac, const at::Tensor& x,
                                 const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                                 at::IntArrayRef skip_layers) {
  return without_tangents(backward(MlpMode::kJacobian, {grad_y, grad_jac, x, cond, weights, biases, activations,
                                                        activation_params, skip_layers, nullptr}));
}

Grads mlp_divergence_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_div, const at::Tensor& x,
                                   const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                                   at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                                   at::IntArrayRef skip_layers) {
  return without_tangents(backward(MlpMode::kDivergence, {grad_y, grad_div, x, cond, weights, biases, activations,
                                                          activation_params, skip_layers, nullptr}));
}

JvpGrads mlp_jvp_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_jvp, const at::Tensor& x,
                               const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                               at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                               at::IntArrayRef skip_layers, const at::Tensor& tangents) {
  return backward(MlpMode::kJvp, {grad_y, grad_jvp, x, cond, weights, biases, activations, activation_params,
                                  skip_layers, &tangents});
}

Grads mlp_hutchinson_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_div, const at::Tensor& x,
                                   const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                                   at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                                   at::IntArrayRef skip_layers, const at::Tensor& noise) {
  return without_tangents(backward(MlpMode::kHutchinson, {grad_y, grad_div, x, cond, weights, biases, activations,
                                                          activation_params, skip_layers, &noise}));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchjac, CUDA, m) {
  m.impl("mlp_jacobian_backward", &mlp_jacobian_backward_cuda);
  m.impl("mlp_divergence_backward", &mlp_divergence_backward_cuda);
  m.impl("mlp_jvp_backward", &mlp_jvp_backward_cuda);
  m.impl("mlp_hutchinson_backward", &mlp_hutchinson_backward_cuda);
}
