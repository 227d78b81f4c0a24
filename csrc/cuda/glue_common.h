// What the forward and backward glue (mlp_forward_glue.cpp,
// mlp_backward_glue.cpp) share: the argument checks, with the messages of the
// Python checks in torchjac/ops.py (check_mlp_args), and the translation of
// the op arguments into the kernels' MlpForwardArgs.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "activations.cuh"
#include "mlp_forward.cuh"

// The host emulation (tests/cuda_emulation) runs these kernels on CPU tensors
// and registers them as torchjac_emu ops; the real build registers them for CUDA.
#if defined(TORCHJAC_CUDA_EMULATION)
#define TORCHJAC_KERNELS_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(torchjac_emu, CPU, m)
#else
#define TORCHJAC_KERNELS_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(torchjac, CUDA, m)
#endif

namespace torchjac {
namespace glue {

using cuda::MlpMode;

#if defined(TORCHJAC_CUDA_EMULATION)
constexpr c10::DeviceType kKernelDeviceType = c10::DeviceType::CPU;
// The emulated device, which the tests choose; CPU tensors carry no index.
inline int kernel_device_index(const at::Tensor&) {
  int device = 0;
  cudaGetDevice(&device);
  return device;
}
#else
constexpr c10::DeviceType kKernelDeviceType = c10::DeviceType::CUDA;
inline int kernel_device_index(const at::Tensor& x) { return x.get_device(); }
#endif

inline const char* mode_name(MlpMode mode) {
  switch (mode) {
    case MlpMode::kJacobian: return "jacobian";
    case MlpMode::kDivergence: return "divergence";
    case MlpMode::kJvp: return "jvp";
    case MlpMode::kHutchinson: return "hutchinson";
    case MlpMode::kLaplacian: return "laplacian";
    case MlpMode::kLaplacianHutchinson: return "laplacian_hutchinson";
    case MlpMode::kHessian: return "hessian";
  }
  return "?";
}

// How Python prints a dtype, so messages match torchjac/ops.py.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// The MLP arguments of an op, as the schema passes them.
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

// Checks every shape, device and dtype of the MLP arguments, and that
// `also_like_x` (named tensors checked first) have x's dtype and device.
// `op` prefixes every message. Returns d_out.
inline int64_t check_mlp_inputs(const std::string& op, MlpMode mode, const MlpInputs& in,
                                std::vector<std::pair<std::string, const at::Tensor*>> also_like_x = {}) {
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
    TORCH_CHECK_VALUE(code >= 0 && code < act::kNumCodes, op, "activations[", l, "]: expected a code in [0, ",
                      act::kNumCodes - 1, "], got ", code);
    width = w.size(0);
  }
  const bool noise = mode == MlpMode::kHutchinson || mode == MlpMode::kLaplacianHutchinson;
  const char* tname = noise ? "noise" : "tangents";
  std::vector<std::pair<std::string, const at::Tensor*>> like_x = std::move(also_like_x);
  like_x.push_back({"cond", &cond});
  for (int64_t l = 0; l < L; ++l) like_x.push_back({"weights[" + std::to_string(l) + "]", &in.weights[l]});
  for (int64_t l = 0; l < L; ++l) like_x.push_back({"biases[" + std::to_string(l) + "]", &in.biases[l]});
  if (in.tangents != nullptr) like_x.push_back({tname, in.tangents});
  for (const auto& [name, t] : like_x) {
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), op, name, ": expected dtype ",
                      dtype_name(x.scalar_type()), " like x, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == x.device(), op, name, ": expected device ", x.device(), " like x, got ",
                      t->device());
  }
  // Every tensor is on x's device, and one of them is on the kernels' device, or this kernel would not run.
  TORCH_CHECK(x.device().type() == kKernelDeviceType, op, "x: expected a CUDA tensor, got one on ", x.device());
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
    if (noise) {
      TORCH_CHECK_VALUE(t.size(-2) >= 1, op, "noise: expected at least one sample, got shape ", shape_str(t.sizes()));
    }
  }
  return d_out;
}

// Row of cond (viewed as (G, c)) read by point p, as collapsed (size, stride)
// dims over x's leading dims; broadcast dims get stride 0.
inline bool make_cond_row_map(at::IntArrayRef lead, at::IntArrayRef cond_lead, cuda::CondRowMap* map) {
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
  if (sizes.size() > static_cast<size_t>(cuda::kMaxCondDims)) return false;
  map->ndim = static_cast<int>(sizes.size());
  for (size_t d = 0; d < sizes.size(); ++d) {
    map->sizes[d] = sizes[d];
    map->strides[d] = strides[d];
  }
  return true;
}

// The shapes of the kernels' arguments (MlpForwardArgs without its pointers),
// and the arrays it points to.
struct MlpShapes {
  cuda::MlpForwardArgs args;
  std::vector<int64_t> in_features, out_features;
  bool cond_map_ok = true;  // false: cond broadcasts in too many separate dims
};

// Whether PyTorch's per-backend API (torch.backends.cuda.matmul.fp32_precision)
// allows TF32 for CUDA matmuls. Its getter takes strings in older releases and
// enums in newer ones; the member's own parameter types tell which.
template <class R, class A, class B>
bool cuda_matmul_allows_tf32(R (at::Context::*getter)(A, B) const) {
  const at::Context& ctx = at::globalContext();
  using Backend = typename std::decay<A>::type;
  using Op = typename std::decay<B>::type;
  if constexpr (std::is_enum<Backend>::value) {
    return (ctx.*getter)(Backend::CUDA, Op::MATMUL) == R::TF32;
  } else {
    return (ctx.*getter)("cuda", "matmul") == "tf32";
  }
}

// PyTorch's float32 matmul precision (docs/cuda.md, "Precision"). The legacy
// getter (torch.set_float32_matmul_precision) raises once the per-backend API
// has been used; that API has no BF16 setting for CUDA, so it gives "high" or
// "highest".
inline cuda::MatmulPrecision float32_matmul_precision() {
  try {
    switch (at::globalContext().float32MatmulPrecision()) {
      case at::Float32MatmulPrecision::HIGH: return cuda::MatmulPrecision::kHigh;
      case at::Float32MatmulPrecision::MEDIUM: return cuda::MatmulPrecision::kMedium;
      default: return cuda::MatmulPrecision::kHighest;
    }
  } catch (const c10::Error&) {
    return cuda_matmul_allows_tf32(&at::Context::float32Precision) ? cuda::MatmulPrecision::kHigh
                                                                   : cuda::MatmulPrecision::kHighest;
  }
}

inline void describe_mlp(MlpMode mode, const MlpInputs& in, int64_t d_out, MlpShapes* s) {
  const at::Tensor& x = in.x;
  cuda::MlpForwardArgs& a = s->args;
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  a.mode = mode;
  a.dtype = x.scalar_type() == at::kDouble ? cuda::ScalarKind::kFloat64 : cuda::ScalarKind::kFloat32;
  a.precision = float32_matmul_precision();
  a.num_points = c10::multiply_integers(lead);
  a.d_in = x.size(-1);
  a.d_out = d_out;
  a.cond_dim = in.cond.size(-1);
  const at::IntArrayRef cond_lead = in.cond.sizes().slice(0, in.cond.dim() - 1);
  a.num_cond_rows = c10::multiply_integers(cond_lead);
  s->cond_map_ok = make_cond_row_map(lead, cond_lead, &a.cond_rows);
  const int64_t L = static_cast<int64_t>(in.weights.size());
  s->in_features.resize(L);
  s->out_features.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    s->out_features[l] = in.weights[l].size(0);
    s->in_features[l] = in.weights[l].size(1);
  }
  a.num_layers = L;
  a.in_features = s->in_features.data();
  a.out_features = s->out_features.data();
  a.activations = in.activations.data();
  a.activation_params = in.activation_params.data();
  a.skip_layers = in.skip_layers.data();
  a.num_skip_layers = static_cast<int64_t>(in.skip_layers.size());
  a.num_tangents = in.tangents != nullptr ? in.tangents->size(-2) : 0;
}

// Contiguous copies (where needed) of the MLP's tensors, and their pointers in
// MlpForwardArgs; they must outlive the launch.
struct ContiguousMlp {
  at::Tensor x, cond, tangents;
  std::vector<at::Tensor> weights, biases;
  std::vector<const void*> weight_ptrs, bias_ptrs;

  ContiguousMlp(const MlpInputs& in, cuda::MlpForwardArgs* a) : x(in.x.contiguous()), cond(in.cond.contiguous()) {
    for (size_t l = 0; l < in.weights.size(); ++l) {
      weights.push_back(in.weights[l].contiguous());
      biases.push_back(in.biases[l].contiguous());
      weight_ptrs.push_back(weights.back().data_ptr());
      bias_ptrs.push_back(biases.back().data_ptr());
    }
    if (in.tangents != nullptr) tangents = in.tangents->contiguous();
    a->x = x.data_ptr();
    a->cond = a->cond_dim > 0 ? cond.data_ptr() : nullptr;
    a->weights = weight_ptrs.data();
    a->biases = bias_ptrs.data();
    a->tangents = tangents.defined() ? tangents.data_ptr() : nullptr;
  }
};

}  // namespace glue
}  // namespace torchjac
