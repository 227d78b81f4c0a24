// Fused forward kernels: one thread block owns a tile of points and keeps the
// rows [h; t_1 .. t_k; s_1 .. s_m] of every point in shared memory through all
// layers (m second-order rows, 0 for the first-order modes).
// Weights are staged in shared memory in chunks of kChunk input columns.
// Design notes and coverage: docs/cuda.md; the host API: mlp_forward.cuh.
#include "mlp_forward.cuh"

#include <algorithm>
#include <climits>
#include <array>

#include "activations.cuh"
#include "launch.cuh"
#include "non_finite.cuh"
#include "device_setup.cuh"
#include "mainloop.cuh"

#if defined(__USE_FAST_MATH__)
#error "csrc/cuda/mlp_forward.cu must be built without --use_fast_math: fast expf/sinf and approximate division break float32 accuracy"
#endif

namespace torchjac {
namespace cuda {
namespace {

using mainloop::kThreads;
// Cond projections are precomputed when each cond row serves this many points.
constexpr int64_t kCondShareFactor = 8;
constexpr int kTemplateWidths[] = {16, 32, 64, 128, 256};

// Thread layout of a tile for template width WIDTH. Layer outputs are a
// (kRows x WIDTH) register tile: thread (tr, to) owns rows tr + i*kRowThreads
// and outputs to + j*kColThreads, strided so that a warp reads distinct banks.
template <int WIDTH>
struct Tiling {
  static constexpr int kOutPerThread = 8;
  static constexpr int kColThreads = WIDTH / kOutPerThread;
  static constexpr int kRowThreads = kThreads / kColThreads;
  static constexpr int kRowsPerThread = WIDTH == 16 ? 2 : 4;
  static constexpr int kRows = kRowThreads * kRowsPerThread;
  // The last layer (d_out <= 16 outputs) is computed as (row, output) pairs.
  static constexpr int kPairsPerThread = kRows * kMaxInOut / kThreads;
  static_assert(WIDTH % kOutPerThread == 0 && kThreads % kColThreads == 0, "bad width");
  static_assert(kRows >= kMaxTangentsPerPass + 1, "a tile must hold one point with all its tangents");
};

template <typename T>
struct LayerParams {
  const T* weight;     // (out, ldw) row-major
  const T* bias;       // (out,)
  const T* cond_proj;  // (cond rows, out): W_c * cond, or null
  int64_t ldw;
  int col0;     // first column of the tile this layer reads
  int in_cols;  // columns read: h, x and the cond columns held in the tile
  int out;
  int act;
  T p0, p1;
};

template <typename T>
struct KernelParams {
  LayerParams<T> layers[kMaxLayers];
  int num_layers;
  int mode;
  int64_t num_points;
  int d_in, d_out, cond_dim;
  int cond_in_kernel;  // cond columns held in the tile (0 when projected)
  int x_col;           // tile column where [x | cond] starts
  int lda;             // tile row stride
  int gemm_mode;       // mainloop::GemmMode of the hidden-layer products
  const T* x;
  const T* cond;
  CondRowMap cond_rows;
  const T* tangents;
  int64_t tangents_total;
  int64_t tangent_offset;  // first tangent of this pass
  int k;                   // tangents in this pass
  int m;                   // second-order rows (second_order_rows(mode, k))
  int write_y;
  int accumulate;  // Hutchinson passes after the first add to out
  T num_samples;
  T* y;
  T* out;
};
// Kernel parameters are passed by value; 4 KB is the limit on every supported toolkit and driver.
static_assert(sizeof(KernelParams<double>) <= 4096, "kernel parameters too large");

// Tile rows are point-major: point pt owns rows pt*rp (h), pt*rp + s (tangent s-1, s <= k) and
// pt*rp + k + 1 + r (second-order row r), rp = 1 + k + m rows in all.
// Fills columns [x_col, x_col + d_in + cond_in_kernel) of every tile row.
template <typename T, int WIDTH>
__device__ void load_inputs(const KernelParams<T>& p, T* tile, const int64_t* cond_row, int64_t first,
                            int npts, int rp) {
  const int ncols = p.d_in + p.cond_in_kernel;
  const bool basis = is_basis_mode(static_cast<MlpMode>(p.mode));
  for (int e = threadIdx.x; e < Tiling<WIDTH>::kRows * ncols; e += kThreads) {
    const int r = e / ncols;
    const int j = e - r * ncols;
    const int pt = r / rp;
    const int s = r - pt * rp;
    T v = T(0);
    if (pt < npts) {
      const int64_t point = first + pt;
      if (j < p.d_in) {
        if (s == 0) {
          v = p.x[point * p.d_in + j];
        } else if (s > p.k) {
          v = T(0);  // x's second derivatives
        } else if (basis) {
          v = (j == s - 1) ? T(1) : T(0);
        } else {
          v = p.tangents[(point * p.tangents_total + p.tangent_offset + s - 1) * p.d_in + j];
        }
      } else if (s == 0) {
        v = p.cond[cond_row[pt] * p.cond_dim + (j - p.d_in)];  // tangents have no cond part
      }
    }
    tile[r * p.lda + p.x_col + j] = v;
  }
}

// h <- act(z + b [+ W_c cond]); t <- act'(z) * t; s <- act'(z) * s + act''(z) * q(t), for the tile's
// valid points (k tangents, m second-order rows, see mlp_forward.cuh).
// For the first layer (first != null) the slope carries the non-finite rule:
// the point's x and cond are in its h row's input columns, or cond in global memory when projected.
template <typename T>
__device__ void activate(const LayerParams<T>& L, T* tile, const int64_t* cond_row, int lda, int npts,
                         int k, int m, const KernelParams<T>* first) {
  const int rp = 1 + k + m;
  for (int e = threadIdx.x; e < npts * L.out; e += kThreads) {
    const int pt = e / L.out;
    const int o = e - pt * L.out;
    T* h = tile + pt * rp * lda + o;
    T z = *h + __ldg(L.bias + o);
    if (L.cond_proj != nullptr) z += __ldg(L.cond_proj + cond_row[pt] * L.out + o);
    const act::Derivatives<T> d = act::evaluate(L.act, L.p0, L.p1, z);
    T slope = d.d1;
    if (first != nullptr) {
      slope += non_finite_sum(h - o + first->x_col, first->d_in + first->cond_in_kernel);
      if (first->cond_in_kernel == 0 && first->cond_dim > 0) {
        slope += non_finite_sum(first->cond + cond_row[pt] * first->cond_dim, first->cond_dim);
      }
    }
    *h = d.value;
    // The second-order rows read the tangents before they are scaled.
    T* t = h + lda;
    T* second = t + k * lda;
    if (m == 1) {
      T q = T(0);
      for (int a = 0; a < k; ++a) q += t[a * lda] * t[a * lda];
      second[0] = slope * second[0] + d.d2 * q;
    } else if (m > 1) {
      for (int a = 0; a < k; ++a) {
        for (int b = a; b < k; ++b) {
          T& row = second[hessian_pair_row(a, b, k) * lda];
          row = slope * row + d.d2 * (t[a * lda] * t[b * lda]);
        }
      }
    }
    for (int s = 0; s < k; ++s) t[s * lda] *= slope;
  }
}

template <typename T>
__device__ void store_outputs(const KernelParams<T>& p, const T* tile, int64_t first, int npts, int kp1) {
  // kp1: rows per point (1 + k + m); the tangents start at row 1, the second-order rows at row 1 + k.
  const int lda = p.lda, d_in = p.d_in, d_out = p.d_out, k = p.k;
  if (p.write_y) {
    T* y = p.y + first * d_out;
    for (int e = threadIdx.x; e < npts * d_out; e += kThreads) {
      const int pt = e / d_out;
      y[e] = tile[pt * kp1 * lda + (e - pt * d_out)];
    }
  }
  switch (static_cast<MlpMode>(p.mode)) {
    case MlpMode::kJacobian: {
      const int per_point = d_out * d_in;
      T* out = p.out + first * per_point;
      for (int e = threadIdx.x; e < npts * per_point; e += kThreads) {
        const int pt = e / per_point;
        const int r = e - pt * per_point;
        const int i = r / d_in;
        const int j = r - i * d_in;
        out[e] = tile[(pt * kp1 + 1 + j) * lda + i];
      }
      break;
    }
    case MlpMode::kDivergence: {
      for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
        T sum = T(0);
        for (int j = 0; j < d_in; ++j) sum += tile[(pt * kp1 + 1 + j) * lda + j];
        p.out[first + pt] = sum;
      }
      break;
    }
    case MlpMode::kJvp: {
      const int per_point = k * d_out;
      for (int e = threadIdx.x; e < npts * per_point; e += kThreads) {
        const int pt = e / per_point;
        const int r = e - pt * per_point;
        const int s = r / d_out;
        const int i = r - s * d_out;
        p.out[((first + pt) * p.tangents_total + p.tangent_offset + s) * d_out + i] =
            tile[(pt * kp1 + 1 + s) * lda + i];
      }
      break;
    }
    case MlpMode::kHutchinson: {
      // The noise e_s is still in the tangent rows' x columns: layers never write there.
      for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
        T sum = T(0);
        for (int s = 1; s <= k; ++s) {
          const T* row = tile + (pt * kp1 + s) * lda;
          for (int i = 0; i < d_out; ++i) sum += row[p.x_col + i] * row[i];
        }
        const T part = sum / p.num_samples;
        T* dst = p.out + first + pt;
        *dst = p.accumulate ? *dst + part : part;
      }
      break;
    }
    case MlpMode::kLaplacian:
    case MlpMode::kLaplacianHutchinson: {  // the collapsed row; Hutchinson passes add their part
      const bool mean = p.mode == static_cast<int>(MlpMode::kLaplacianHutchinson);
      for (int e = threadIdx.x; e < npts * d_out; e += kThreads) {
        const int pt = e / d_out;
        const T v = tile[(pt * kp1 + 1 + k) * lda + (e - pt * d_out)];
        const T part = mean ? v / p.num_samples : v;
        T* dst = p.out + first * d_out + e;
        *dst = p.accumulate ? *dst + part : part;
      }
      break;
    }
    case MlpMode::kHessian: {  // out (N, d_out, d_in, d_in) from the pair rows, both halves
      const int per_point = d_out * d_in * d_in;
      T* out = p.out + first * per_point;
      for (int e = threadIdx.x; e < npts * per_point; e += kThreads) {
        const int pt = e / per_point;
        int r = e - pt * per_point;
        const int i = r / (d_in * d_in);
        r -= i * d_in * d_in;
        const int a = r / d_in;
        const int b = r - a * d_in;
        const int pair = a <= b ? hessian_pair_row(a, b, d_in) : hessian_pair_row(b, a, d_in);
        out[e] = tile[(pt * kp1 + 1 + k + pair) * lda + i];
      }
      break;
    }
  }
}

// float asks for two resident blocks per SM (<= 128 registers, no spills
// measured with ptxas -v); double keeps the full register budget.
template <typename T, int WIDTH>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 1) mlp_forward_kernel(const __grid_constant__ KernelParams<T> p) {
  using Tl = Tiling<WIDTH>;
  TORCHJAC_DYNAMIC_SMEM(smem);
  int64_t* cond_row = reinterpret_cast<int64_t*>(smem);
  T* tile = reinterpret_cast<T*>(cond_row + Tl::kRows);
  T* ws = tile + Tl::kRows * p.lda;

  const int kp1 = p.k + 1 + p.m;  // rows per point
  const int per_tile = Tl::kRows / kp1;
  const int64_t num_tiles = (p.num_points + per_tile - 1) / per_tile;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t first = t * per_tile;
    const int npts = static_cast<int>(min(static_cast<int64_t>(per_tile), p.num_points - first));
    if (p.cond_dim > 0) {
      for (int pt = threadIdx.x; pt < npts; pt += kThreads) cond_row[pt] = cond_row_of(p.cond_rows, first + pt);
      __syncthreads();
    }
    load_inputs<T, WIDTH>(p, tile, cond_row, first, npts, kp1);
    __syncthreads();
    for (int l = 0; l < p.num_layers; ++l) {
      const LayerParams<T>& L = p.layers[l];
      // z = W * row over the layer's input columns, into columns [0, L.out) of the same rows.
      if (l + 1 < p.num_layers) {
        mainloop::wide_gemm<T, Tl, true>(tile, p.lda, L.col0, L.in_cols, L.weight, L.ldw, L.out, ws, Tl::kRows, tile,
                                         static_cast<mainloop::GemmMode>(p.gemm_mode));
      } else {  // the last layer has few outputs: (row, output) pairs
        mainloop::pair_gemm<T, Tl, true>(tile, p.lda, L.col0, L.in_cols, L.weight, L.ldw, L.out, ws, npts * kp1,
                                     mainloop::StoreRows<T>{tile, p.lda});
      }
      __syncthreads();
      activate(L, tile, cond_row, p.lda, npts, p.k, p.m, l == 0 ? &p : nullptr);
      __syncthreads();
    }
    store_outputs(p, tile, first, npts, kp1);
    __syncthreads();  // the next tile overwrites what was just stored
  }
}

// proj[g, o] = sum_j W[o, col0 + j] * cond[g, j]: the cond term of one layer, once per cond row.
template <typename T>
__global__ void cond_projection_kernel(const T* __restrict__ cond, int64_t rows, int c,
                                       const T* __restrict__ weight, int64_t ldw, int64_t col0, int out,
                                       T* __restrict__ proj) {
  const int64_t total = rows * out;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = e / out;
    const int o = static_cast<int>(e - g * out);
    const T* w = weight + o * ldw + col0;
    const T* cg = cond + g * c;
    T sum = T(0);
    for (int j = 0; j < c; ++j) sum += w[j] * cg[j];
    proj[e] = sum;
  }
}

// ---------------------------------------------------------------------------
// Host side.

int tile_rows(int width) {
  switch (width) {
    case 16: return Tiling<16>::kRows;
    case 32: return Tiling<32>::kRows;
    case 64: return Tiling<64>::kRows;
    case 128: return Tiling<128>::kRows;
    case 256: return Tiling<256>::kRows;
    default: return 0;
  }
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The kernels whose shared memory limit device_setup raises.
struct ForwardKernels {
  template <typename T, int WIDTH>
  static const void* k() {
    return reinterpret_cast<const void*>(&mlp_forward_kernel<T, WIDTH>);
  }
  static std::array<const void*, 10> list() {
    return {k<float, 16>(), k<float, 32>(), k<float, 64>(), k<float, 128>(), k<float, 256>(),
            k<double, 16>(), k<double, 32>(), k<double, 64>(), k<double, 128>(), k<double, 256>()};
  }
};

using Plan = MlpForwardPlan;

bool reads_input(const Plan& plan, int64_t layer) { return layer == 0 || plan.skip[layer]; }

// cc_major: the device's compute capability (0: no tensor cores).
Plan make_plan(const MlpForwardArgs& a, int cc_major) {
  Plan plan;
  auto fail = [&](const char* why) {
    plan.unsupported_reason = why;
    return plan;
  };
  if (a.dtype != ScalarKind::kFloat32 && a.dtype != ScalarKind::kFloat64) return fail("the dtype is not float32 or float64");
  plan.elem = a.dtype == ScalarKind::kFloat64 ? sizeof(double) : sizeof(float);
  const int64_t L = a.num_layers;
  if (L < 1) return fail("the MLP has no layers");
  if (L > kMaxLayers) return fail("the MLP has more than 32 layers");
  if (a.d_in < 1 || a.d_in > kMaxInOut) return fail("d_in is not in [1, 16]");
  if (a.d_out < 1 || a.d_out > kMaxInOut) return fail("d_out is not in [1, 16]");
  if (a.cond_dim < 0 || a.num_points < 0) return fail("negative sizes");
  if (a.cond_rows.ndim < 0 || a.cond_rows.ndim > kMaxCondDims) return fail("cond broadcasts in too many separate dims");
  bool any_skip = false;
  for (int64_t i = 0; i < a.num_skip_layers; ++i) {
    const int64_t l = a.skip_layers[i];
    if (l < 1 || l >= L) return fail("a skip layer index is not in [1, num_layers - 1]");
    plan.skip[l] = true;
    any_skip = true;
  }
  const int64_t c = a.cond_dim;
  const int64_t H = L > 1 ? a.out_features[0] : 0;
  if (L > 1 && (H < 1 || H > kMaxHiddenWidth)) return fail("the hidden width is not in [1, 256]");
  for (int64_t l = 0; l < L; ++l) {
    const int64_t in = l == 0 ? a.d_in + c : H + (plan.skip[l] ? a.d_in + c : 0);
    const int64_t out = l == L - 1 ? a.d_out : H;
    if (a.in_features[l] != in || a.out_features[l] != out) return fail("the hidden layers do not all have one width");
    if (a.activations[l] < 0 || a.activations[l] >= act::kNumCodes) return fail("unknown activation code");
  }
  // Skip layers read [h, x, cond] as one contiguous block of tile columns.
  if (any_skip && a.d_out > H) return fail("skip layers with d_out larger than the hidden width");
  const bool divergence = a.mode == MlpMode::kDivergence || a.mode == MlpMode::kHutchinson;
  if (divergence && a.d_out != a.d_in) return fail("a divergence needs d_out == d_in");
  const bool noise = a.mode == MlpMode::kHutchinson || a.mode == MlpMode::kLaplacianHutchinson;
  if (noise && a.num_tangents < 1) return fail("Hutchinson needs at least one noise sample");
  if (a.mode == MlpMode::kJvp && a.num_tangents < 0) return fail("negative number of tangents");

  plan.hidden = static_cast<int>(H);
  plan.width = 0;
  for (int w : kTemplateWidths) {
    if (std::max<int64_t>(H, 1) <= w) {
      plan.width = w;
      break;
    }
  }
  plan.x_col = static_cast<int>(std::max<int64_t>(H, a.d_out));
  plan.project_cond = c > 0 && a.num_cond_rows * kCondShareFactor <= a.num_points;
  const int64_t cond_cols = (c > 0 && !plan.project_cond) ? c : 0;
  const mainloop::GemmMode gemm_mode = mainloop::plan_gemm_mode(a.precision, a.dtype, H, cc_major);
  plan.gemm_mode = static_cast<int>(gemm_mode);
  const int64_t lda = mainloop::tile_row_stride(plan.x_col + a.d_in + cond_cols, gemm_mode);
  if (lda > 4096) return fail("too many cond columns");
  plan.cond_in_kernel = static_cast<int>(cond_cols);
  plan.lda = static_cast<int>(lda);
  plan.rows = tile_rows(plan.width);
  // Rows of one point in a pass: the value, its tangents and its second-order rows.
  const int k_pass = is_basis_mode(a.mode) ? static_cast<int>(a.d_in) : kMaxTangentsPerPass;
  if (1 + k_pass + second_order_rows(a.mode, k_pass) > plan.rows) {
    return fail("a point's rows (the Hessian's: 1 + d_in + d_in (d_in + 1) / 2) do not fit in one tile at this width");
  }
  plan.smem_bytes = plan.rows * sizeof(int64_t) + static_cast<size_t>(plan.rows) * plan.lda * plan.elem +
                    mainloop::staging_bytes(gemm_mode, plan.rows, plan.width, plan.elem);
  if (plan.project_cond) {
    for (int64_t l = 0; l < L; ++l)
      if (reads_input(plan, l)) plan.workspace_bytes += align_up(a.num_cond_rows * a.out_features[l] * plan.elem);
  }
  return plan;
}

template <typename T, int WIDTH>
cudaError_t launch_width(const KernelParams<T>& kp, const Plan& plan, cudaStream_t stream) {
  auto kernel = mlp_forward_kernel<T, WIDTH>;  // its shared memory limit is raised by device_setup
  const int per_tile = plan.rows / (kp.k + 1 + kp.m);
  const int64_t tiles = (kp.num_points + per_tile - 1) / per_tile;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, INT_MAX));
  TORCHJAC_LAUNCH(grid, kThreads, plan.smem_bytes, stream, kernel)(kp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pass(const KernelParams<T>& kp, const Plan& plan, cudaStream_t stream) {
  switch (plan.width) {
    case 16: return launch_width<T, 16>(kp, plan, stream);
    case 32: return launch_width<T, 32>(kp, plan, stream);
    case 64: return launch_width<T, 64>(kp, plan, stream);
    case 128: return launch_width<T, 128>(kp, plan, stream);
    case 256: return launch_width<T, 256>(kp, plan, stream);
    default: return cudaErrorNotSupported;
  }
}

template <typename T>
cudaError_t launch_typed(const MlpForwardArgs& a, const Plan& plan, cudaStream_t stream) {
  KernelParams<T> kp{};
  kp.num_layers = static_cast<int>(a.num_layers);
  kp.mode = static_cast<int>(a.mode);
  kp.num_points = a.num_points;
  kp.d_in = static_cast<int>(a.d_in);
  kp.d_out = static_cast<int>(a.d_out);
  kp.cond_dim = static_cast<int>(a.cond_dim);
  kp.cond_in_kernel = plan.cond_in_kernel;
  kp.x_col = plan.x_col;
  kp.lda = plan.lda;
  kp.gemm_mode = plan.gemm_mode;
  kp.x = static_cast<const T*>(a.x);
  kp.cond = static_cast<const T*>(a.cond);
  kp.cond_rows = a.cond_rows;
  kp.tangents = static_cast<const T*>(a.tangents);
  kp.tangents_total = a.num_tangents;
  kp.num_samples = static_cast<T>(a.num_tangents);
  kp.y = static_cast<T*>(a.y);
  kp.out = static_cast<T*>(a.out);

  char* workspace = static_cast<char*>(a.workspace);
  for (int64_t l = 0; l < a.num_layers; ++l) {
    LayerParams<T>& lp = kp.layers[l];
    const int64_t hidden_cols = l == 0 ? 0 : plan.hidden;
    lp.weight = static_cast<const T*>(a.weights[l]);
    lp.bias = static_cast<const T*>(a.biases[l]);
    lp.cond_proj = nullptr;
    lp.ldw = a.in_features[l];
    lp.col0 = l == 0 ? plan.x_col : 0;
    lp.in_cols = static_cast<int>(hidden_cols + (reads_input(plan, l) ? a.d_in + plan.cond_in_kernel : 0));
    lp.out = static_cast<int>(a.out_features[l]);
    lp.act = static_cast<int>(a.activations[l]);
    lp.p0 = static_cast<T>(a.activation_params[2 * l]);
    lp.p1 = static_cast<T>(a.activation_params[2 * l + 1]);
    if (plan.project_cond && reads_input(plan, l)) {
      T* proj = reinterpret_cast<T*>(workspace);
      workspace += align_up(a.num_cond_rows * lp.out * plan.elem);
      const int64_t total = a.num_cond_rows * lp.out;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
      TORCHJAC_LAUNCH(blocks, 256, 0, stream, cond_projection_kernel<T>)(kp.cond, a.num_cond_rows, kp.cond_dim, lp.weight,
                                                             lp.ldw, hidden_cols + a.d_in, lp.out, proj);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      lp.cond_proj = proj;
    }
  }

  // Jacobian, divergence, Laplacian and Hessian push the d_in basis vectors
  // (d_in <= 16: one pass); jvp and the Hutchinson modes run their tangents
  // kMaxTangentsPerPass at a time.
  const bool basis = is_basis_mode(a.mode);
  const int64_t total = basis ? a.d_in : a.num_tangents;
  const int64_t per_pass = basis ? a.d_in : kMaxTangentsPerPass;
  int64_t offset = 0;
  do {
    kp.k = static_cast<int>(std::min(per_pass, total - offset));
    kp.m = second_order_rows(a.mode, kp.k);
    kp.tangent_offset = offset;
    kp.write_y = offset == 0;
    kp.accumulate = offset > 0;
    cudaError_t err = launch_pass(kp, plan, stream);
    if (err != cudaSuccess) return err;
    offset += kp.k;
  } while (offset < total);
  return cudaSuccess;
}

}  // namespace

MlpForwardPlan mlp_forward_plan(const MlpForwardArgs& args, int device) {
  const DeviceSetup& setup = device_setup<ForwardKernels>(device);
  MlpForwardPlan plan = make_plan(args, setup.error == cudaSuccess ? setup.cc_major : 0);
  if (plan.unsupported_reason != nullptr) return plan;
  const size_t limit = static_cast<size_t>(setup.max_smem_optin);
  if (setup.error == cudaSuccess && plan.gemm_mode != 0 && plan.smem_bytes > limit) {
    plan = make_plan(args, 0);  // the tensor-core layout (stride, staging) does not fit: SIMT
  }
  if (setup.error != cudaSuccess) {
    plan.unsupported_reason = "the device's shared memory size could not be queried or set";
  } else if (plan.smem_bytes > limit) {
    plan.unsupported_reason = "the tile does not fit in shared memory (too many cond columns)";
  }
  return plan;
}

cudaError_t mlp_forward_launch(const MlpForwardArgs& args, const MlpForwardPlan& plan, cudaStream_t stream) {
  if (plan.unsupported_reason != nullptr) return cudaErrorNotSupported;
  if (args.num_points == 0) return cudaSuccess;
  if (args.workspace == nullptr && plan.workspace_bytes > 0) return cudaErrorInvalidValue;
  return args.dtype == ScalarKind::kFloat64 ? launch_typed<double>(args, plan, stream)
                                            : launch_typed<float>(args, plan, stream);
}

}  // namespace cuda
}  // namespace torchjac
