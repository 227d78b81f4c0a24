// CUDA kernels of the forward ops mlp_jacobian, mlp_divergence, mlp_jvp and
// mlp_hutchinson: argument checks, then the fused kernels of mlp_forward.cu.
//
// Dependency: MLPs the fused kernels do not cover (see mlp_forward.cuh) run
// torchjac::mlp_reference_forward instead, after a one-time warning. Its schema
// is in csrc/ops.cpp; its kernel, the pure-PyTorch path, is registered under
// CompositeExplicitAutograd by torchjac/ops.py when the package is imported.
//
// Argument errors raise ValueError/TypeError with the messages of the Python
// checks in torchjac/ops.py (check_mlp_args), so both paths read alike.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "activations.cuh"
#include "mlp_forward.cuh"

namespace {

using torchjac::cuda::MlpForwardArgs;
using torchjac::cuda::MlpMode;
using Outputs = std::tuple<at::Tensor, at::Tensor>;

const char* mode_name(MlpMode mode) {
  switch (mode) {
    case MlpMode::kJacobian: return "jacobian";
    case MlpMode::kDivergence: return "divergence";
    case MlpMode::kJvp: return "jvp";
    case MlpMode::kHutchinson: return "hutchinson";
  }
  return "?";
}

// The op arguments, as the schema passes them.
struct MlpInputs {
  const at::Tensor& x;
  const at::Tensor& cond;
  at::TensorList weights;
  at::TensorList biases;
  at::IntArrayRef activations;
  at::ArrayRef<double> activation_params;
  at::IntArrayRef skip_layers;
  const at::Tensor* tangents;  // tangents (jvp), noise (hutchinson), else null
};

using ReferenceSignature = Outputs(c10::string_view, const at::Tensor&, const at::Tensor&, at::TensorList,
                                   at::TensorList, at::IntArrayRef, at::ArrayRef<double>, at::IntArrayRef,
                                   const std::optional<at::Tensor>&);

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
  return op.call(mode_name(mode), in.x, in.cond, in.weights, in.biases, in.activations, in.activation_params,
                 in.skip_layers, tangents);
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
int64_t check_inputs(MlpMode mode, const MlpInputs& in) {
  const std::string op = std::string("torchjac.mlp_") + mode_name(mode) + ": ";
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
  std::vector<std::pair<std::string, const at::Tensor*>> like_x = {{"cond", &cond}};
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
  if (in.tangents != nullptr) {
    const at::Tensor& t = *in.tangents;
    bool ok = t.dim() == x.dim() + 1 && t.size(-1) == d_in;
    for (int64_t d = 0; ok && d + 1 < x.dim(); ++d) ok = t.size(d) == x.size(d);
    std::string expected = "(";
    for (int64_t d = 0; d + 1 < x.dim(); ++d) expected += std::to_string(x.size(d)) + ", ";
    TORCH_CHECK_VALUE(ok, op, tname, ": expected shape ", expected, "'k', ", d_in, "), got ", shape_str(t.sizes()));
    if (mode == MlpMode::kHutchinson) {
      TORCH_CHECK_VALUE(t.size(-2) >= 1, op, "noise: expected at least one sample, got shape ", shape_str(t.sizes()));
    }
  }
  return d_out;
}

// Row of cond (viewed as (G, c)) read by point p, as collapsed (size, stride)
// dims over x's leading dims; broadcast dims get stride 0.
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

Outputs forward(MlpMode mode, const MlpInputs& in) {
  const int64_t d_out = check_inputs(mode, in);
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
  if (num_points == 0) return {at::empty(y_shape, x.options()), at::empty(out_shape, x.options())};

  const c10::cuda::CUDAGuard guard(x.device());

  MlpForwardArgs args;
  args.mode = mode;
  args.dtype = x.scalar_type() == at::kDouble ? torchjac::cuda::ScalarKind::kFloat64
                                              : torchjac::cuda::ScalarKind::kFloat32;
  args.num_points = num_points;
  args.d_in = d_in;
  args.d_out = d_out;
  args.cond_dim = in.cond.size(-1);
  const at::IntArrayRef cond_lead = in.cond.sizes().slice(0, in.cond.dim() - 1);
  args.num_cond_rows = c10::multiply_integers(cond_lead);
  if (!make_cond_row_map(lead, cond_lead, &args.cond_rows)) {
    return reference_forward(mode, in, "cond broadcasts over too many separate dims");
  }

  const int64_t L = static_cast<int64_t>(in.weights.size());
  std::vector<int64_t> in_features(L), out_features(L);
  for (int64_t l = 0; l < L; ++l) {
    out_features[l] = in.weights[l].size(0);
    in_features[l] = in.weights[l].size(1);
  }
  args.num_layers = L;
  args.in_features = in_features.data();
  args.out_features = out_features.data();
  args.activations = in.activations.data();
  args.activation_params = in.activation_params.data();
  args.skip_layers = in.skip_layers.data();
  args.num_skip_layers = static_cast<int64_t>(in.skip_layers.size());
  args.num_tangents = in.tangents != nullptr ? k : 0;

  // Decide on shapes alone first, so a fallback makes no copies.
  if (const char* reason = torchjac::cuda::mlp_forward_unsupported_reason(args, x.get_device())) {
    return reference_forward(mode, in, reason);
  }

  const at::Tensor x_c = x.contiguous();
  const at::Tensor cond_c = in.cond.contiguous();
  std::vector<at::Tensor> weights_c, biases_c;
  std::vector<const void*> weight_ptrs, bias_ptrs;
  for (int64_t l = 0; l < L; ++l) {
    weights_c.push_back(in.weights[l].contiguous());
    biases_c.push_back(in.biases[l].contiguous());
    weight_ptrs.push_back(weights_c.back().data_ptr());
    bias_ptrs.push_back(biases_c.back().data_ptr());
  }
  at::Tensor tangents_c;
  if (in.tangents != nullptr) tangents_c = in.tangents->contiguous();

  at::Tensor y = at::empty(y_shape, x.options());
  at::Tensor out = at::empty(out_shape, x.options());
  args.x = x_c.data_ptr();
  args.cond = args.cond_dim > 0 ? cond_c.data_ptr() : nullptr;
  args.weights = weight_ptrs.data();
  args.biases = bias_ptrs.data();
  args.tangents = tangents_c.defined() ? tangents_c.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.out = out.data_ptr();
  at::Tensor workspace;
  if (const size_t bytes = torchjac::cuda::mlp_forward_workspace_bytes(args)) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    args.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(torchjac::cuda::mlp_forward_launch(args, c10::cuda::getCurrentCUDAStream()));
  return {y, out};
}

Outputs mlp_jacobian_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                          at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                          at::IntArrayRef skip_layers) {
  return forward(MlpMode::kJacobian,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, nullptr});
}

Outputs mlp_divergence_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights,
                            at::TensorList biases, at::IntArrayRef activations,
                            at::ArrayRef<double> activation_params, at::IntArrayRef skip_layers) {
  return forward(MlpMode::kDivergence,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, nullptr});
}

Outputs mlp_jvp_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights, at::TensorList biases,
                     at::IntArrayRef activations, at::ArrayRef<double> activation_params,
                     at::IntArrayRef skip_layers, const at::Tensor& tangents) {
  return forward(MlpMode::kJvp, {x, cond, weights, biases, activations, activation_params, skip_layers, &tangents});
}

Outputs mlp_hutchinson_cuda(const at::Tensor& x, const at::Tensor& cond, at::TensorList weights,
                            at::TensorList biases, at::IntArrayRef activations,
                            at::ArrayRef<double> activation_params, at::IntArrayRef skip_layers,
                            const at::Tensor& noise) {
  return forward(MlpMode::kHutchinson,
                 {x, cond, weights, biases, activations, activation_params, skip_layers, &noise});
}

}  // namespace

TORCH_LIBRARY_IMPL(torchjac, CUDA, m) {
  m.impl("mlp_jacobian", &mlp_jacobian_cuda);
  m.impl("mlp_divergence", &mlp_divergence_cuda);
  m.impl("mlp_jvp", &mlp_jvp_cuda);
  m.impl("mlp_hutchinson", &mlp_hutchinson_cuda);
}
