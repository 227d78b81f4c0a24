// Fused backward kernels. As in the forward (mlp_forward.cu), one thread block
// owns a tile of points, the rows [h; t_1 .. t_k] of each point. For every tile
// the block
//   1. recomputes the forward, keeping each layer's pre-activation rows [z; tz]
//      in the block's own slice of a global scratch (sized by the grid, not by
//      the number of points, so it stays in L2);
//   2. walks back through the layers with the gradient rows [g_h; g_t] in shared
//      memory: through the activation (act'' carries the tangents' dependence on
//      z), into the layer's weight and bias gradients, which it adds to the
//      block's partial sums, and through W into the previous layer's gradient
//      rows and into the x, cond and jvp-tangent gradients.
// A second kernel adds up the blocks' partial sums, and with broadcast cond a
// third adds up the cond gradients of the points that share a cond row, each
// in a fixed order: no atomics, so results are bitwise reproducible on a device.
// The math is torchjac/reference.py `backward`; the design: docs/cuda.md,
// "Backward kernels"; the host API: mlp_backward.cuh.
#include "mlp_backward.cuh"

#include <algorithm>
#include <climits>
#include <cmath>
#include <array>

#include "activations.cuh"
#include "launch.cuh"
#include "non_finite.cuh"
#include "device_setup.cuh"
#include "mainloop.cuh"

#if defined(__USE_FAST_MATH__)
#error "csrc/cuda/mlp_backward.cu must be built without --use_fast_math: fast expf/sinf and approximate division break float32 accuracy"
#endif

namespace torchjac {
namespace cuda {
namespace {

using mainloop::kThreads;
constexpr int kWarp = 32;
constexpr int kReduceThreads = 256;
constexpr int kReduceBlocksPerSm = 8;
// The blocks' partial sums of the weight gradients are kept under this size by
// launching fewer blocks (only very wide or deep MLPs reach it).
constexpr int64_t kMaxPartialBytes = int64_t(1) << 30;
constexpr int kTemplateWidths[] = {16, 32, 64, 128, 256};

// Thread layouts of a tile for template width WIDTH.
template <typename T, int WIDTH>
struct BackwardTiling {
  // Products with up to WIDTH outputs per row (the recomputed forward, the
  // gradient through W): a register tile as in the forward kernel. Thread
  // (tr, to) owns rows tr + i * kRowThreads and outputs to + j * kColThreads.
  static constexpr int kOutPerThread = 8;
  static constexpr int kColThreads = WIDTH / kOutPerThread;
  static constexpr int kRowThreads = kThreads / kColThreads;
  // Two row buffers live in shared memory, so tiles have at most 128 rows, and
  // double tiles half the forward's rows where that still leaves 32.
  static constexpr int kRowsPerThread =
      WIDTH == 16 ? 1 : WIDTH == 32 ? 2 : (sizeof(T) == 8 && WIDTH >= 64 && WIDTH <= 128) ? 2 : 4;
  static constexpr int kRows = kRowThreads * kRowsPerThread;
  // Products with at most kMaxInOut outputs per row: (row, output) pairs.
  static constexpr int kPairsPerThread = kRows * kMaxInOut / kThreads;
  // Weight gradient, out x in entries summed over the rows: lane tj owns the
  // input columns tj + jj * kGradColThreads (consecutive across a warp), and
  // thread row to the outputs to + i * kGradRowThreads.
  static constexpr int kGradColThreads = WIDTH < kWarp ? WIDTH : kWarp;
  static constexpr int kGradColsPerThread = WIDTH / kGradColThreads;
  static constexpr int kGradRowThreads = kThreads / kGradColThreads;
  static constexpr int kGradRowsPerThreadMax = kWarp / kGradColsPerThread;
  static constexpr int kGradRowsPerThread =
      WIDTH / kGradRowThreads < kGradRowsPerThreadMax ? WIDTH / kGradRowThreads : kGradRowsPerThreadMax;
  static_assert(WIDTH % kOutPerThread == 0 && kThreads % kColThreads == 0, "bad width");
  static_assert(kRows >= kMaxTangentsPerPass + 1, "a tile must hold one point with all its tangents");
  static_assert(kRows * kMaxInOut % kThreads == 0, "pairs must divide among the threads");
  static_assert(kGradRowsPerThread >= 1, "bad gradient tiling");
};

template <typename T>
struct BackwardLayer {
  const T* weight;         // (out, ldw) row-major
  const T* bias;           // (out,)
  int64_t ldw;             // in_features
  int64_t state_offset;    // of this layer's [z; tz] rows (tile rows x out) in a block's state scratch
  int64_t partial_offset;  // of its (out x in) weight gradient, then (out) bias gradient, in a block's partial sums
  int col0;                // first tile column the layer reads
  int in_cols;             // columns it reads: h, then x and cond for layer 0 and skip layers
  int hidden_in;           // of those, the h columns (0 for layer 0)
  int out;
  int act;
  T p0, p1;
};

template <typename T>
struct BackwardParams {
  BackwardLayer<T> layers[kMaxLayers];
  int num_layers;
  int mode;
  int64_t num_points;
  int d_in, d_out, cond_dim;
  int x_col;  // tile column where [x | cond] starts; columns [0, x_col) hold h or gradients
  int lda;    // tile row stride
  int gemm_mode;  // mainloop::GemmMode of the wide products
  const T* x;
  const T* cond;
  CondRowMap cond_rows;
  const T* tangents;  // jvp tangents or Hutchinson noise (num_points, tangents_total, d_in)
  int64_t tangents_total;
  int64_t tangent_offset;  // first tangent of this pass
  int k;                   // tangents in this pass
  int first_pass;          // only the first pass adds grad_y's share
  const T* grad_y;
  const T* grad_out;
  // Accumulated into (zeroed by the launcher): several layers and passes contribute.
  T* grad_x;
  T* grad_cond_points;  // (num_points, c): grad_cond itself when cond is per point, else scratch
  T* grad_tangents;     // jvp only
  T* states;            // gridDim.x slices of state_stride elements
  int64_t state_stride;
  T* partials;  // gridDim.x slices of partial_stride elements
  int64_t partial_stride;
};
// Kernel parameters are passed by value; 4 KB is the limit on every supported toolkit and driver.
static_assert(sizeof(BackwardParams<double>) <= 4096, "kernel parameters too large");

__device__ __forceinline__ bool is_basis(int mode) { return is_basis_mode(static_cast<MlpMode>(mode)); }

// Tile rows are point-major: point pt owns row pt*kp1 (h) and rows pt*kp1 + s
// (tangent s-1). Rows at or past npts*kp1 hold garbage: every sum over rows
// stops there, and products of rows never mix rows.

// Columns [x_col, x_col + d_in + c) of every row of both buffers: x and cond in
// the h row, the tangent's direction v and zeros in a tangent row. Layers never
// write there, so the columns stay valid for the whole tile.
template <typename T, int WIDTH>
__device__ void load_inputs(const BackwardParams<T>& p, T* buf0, T* buf1, const int64_t* cond_row, int64_t first,
                            int npts, int kp1) {
  const int ncols = p.d_in + p.cond_dim;
  const bool basis = is_basis(p.mode);
  for (int e = threadIdx.x; e < BackwardTiling<T, WIDTH>::kRows * ncols; e += kThreads) {
    const int r = e / ncols;
    const int j = e - r * ncols;
    const int pt = r / kp1;
    const int s = r - pt * kp1;
    T v = T(0);
    if (pt < npts) {
      const int64_t point = first + pt;
      if (j < p.d_in) {
        if (s == 0) {
          v = p.x[point * p.d_in + j];
        } else if (basis) {
          v = (j == p.tangent_offset + s - 1) ? T(1) : T(0);
        } else {
          v = p.tangents[(point * p.tangents_total + p.tangent_offset + s - 1) * p.d_in + j];
        }
      } else if (s == 0) {
        v = p.cond[cond_row[pt] * p.cond_dim + (j - p.d_in)];
      }
    }
    buf0[r * p.lda + p.x_col + j] = v;
    buf1[r * p.lda + p.x_col + j] = v;
  }
}

// Adds a product, the gradient w.r.t. a group of a layer's [x | cond] columns
// starting at column col0 of [x | cond], to grad_x and grad_cond (h rows) and,
// for jvp, to grad_tangents (tangent rows).
template <typename T>
struct StoreInputGrads {
  const BackwardParams<T>* p;
  int64_t first;
  int kp1;
  int col0;
  __device__ void operator()(int r, int n, T v) const {
    const int pt = r / kp1;
    const int s = r - pt * kp1;
    const int64_t point = first + pt;
    const int j = col0 + n;
    if (s == 0) {
      if (j < p->d_in) {
        p->grad_x[point * p->d_in + j] += v;
      } else {
        p->grad_cond_points[point * p->cond_dim + (j - p->d_in)] += v;
      }
    } else if (p->mode == static_cast<int>(MlpMode::kJvp) && j < p->d_in) {
      p->grad_tangents[(point * p->tangents_total + p->tangent_offset + s - 1) * p->d_in + j] += v;
    }
  }
};

// One out-of-line copy per dtype: the activation switch is large, and three
// steps of every kernel evaluate it.
template <typename T>
__device__ __noinline__ act::Derivatives<T> activation(int code, T p0, T p1, T z) {
  return act::evaluate(code, p0, p1, z);
}

// act'(z) of a point's h row `row`; for the first layer (first != null) with the
// non-finite rule, from the x and cond the row holds in its input columns.
template <typename T>
__device__ T slope_of(const act::Derivatives<T>& d, const BackwardParams<T>* first, const T* row) {
  return first == nullptr ? d.d1 : d.d1 + non_finite_sum(row + first->x_col, first->d_in + first->cond_dim);
}

// After a layer's product: z = product + b goes to the state scratch with the
// tangent rows tz; unless it is the last layer, the tile becomes h = act(z),
// t = act'(z) tz. Only the tile's points.
template <typename T>
__device__ void save_and_activate(const BackwardLayer<T>& L, T* tile, T* state, int lda, int npts, int kp1,
                                  bool activate, const BackwardParams<T>* first) {
  for (int e = threadIdx.x; e < npts * L.out; e += kThreads) {
    const int pt = e / L.out;
    const int o = e - pt * L.out;
    T* h = tile + pt * kp1 * lda + o;
    T* st = state + pt * kp1 * L.out + o;
    const T z = *h + __ldg(L.bias + o);
    st[0] = z;
    for (int s = 1; s < kp1; ++s) st[s * L.out] = h[s * lda];
    if (activate) {
      const act::Derivatives<T> d = activation(L.act, L.p0, L.p1, z);
      const T slope = slope_of(d, first, h - o);
      *h = d.value;
      for (int s = 1; s < kp1; ++s) h[s * lda] *= slope;
    }
  }
}

// The output gradient rows of the last layer, columns [0, d_out): g_h = grad_y
// (first pass only) and g_t, the adjoint of the mode's reduction of t.
template <typename T>
__device__ void load_output_grads(const BackwardParams<T>& p, T* g, int64_t first, int npts, int kp1) {
  const int d_out = p.d_out, d_in = p.d_in, lda = p.lda;
  for (int e = threadIdx.x; e < npts * d_out; e += kThreads) {
    const int pt = e / d_out;
    const int i = e - pt * d_out;
    const int64_t point = first + pt;
    T* row = g + pt * kp1 * lda + i;
    row[0] = p.first_pass ? p.grad_y[point * d_out + i] : T(0);
    for (int s = 1; s < kp1; ++s) {
      const int64_t tangent = p.tangent_offset + s - 1;
      T v;
      switch (static_cast<MlpMode>(p.mode)) {
        case MlpMode::kJacobian:  // out (N, d_out, d_in), t_s = column s of J
          v = p.grad_out[(point * d_out + i) * d_in + tangent];
          break;
        case MlpMode::kDivergence:  // out = sum_s t_s[s]
          v = tangent == i ? p.grad_out[point] : T(0);
          break;
        case MlpMode::kJvp:  // out (N, k, d_out)
          v = p.grad_out[(point * p.tangents_total + tangent) * d_out + i];
          break;
        default:  // kHutchinson: out = sum_s e_s . t_s / S
          v = p.grad_out[point] * p.tangents[(point * p.tangents_total + tangent) * d_in + i] /
              static_cast<T>(p.tangents_total);
          break;
      }
      row[s * lda] = v;
    }
  }
}

// Through layer L's activation, in place: g_z = g_h act'(z) + (sum_s g_t_s tz_s) act''(z),
// g_tz = act'(z) g_t.
template <typename T>
__device__ void activation_backward(const BackwardLayer<T>& L, T* g, const T* state, int lda, int npts, int kp1,
                                    const BackwardParams<T>* first) {
  if (L.act == act::kIdentity && first == nullptr) return;  // g_z = g_h, g_tz = g_t
  for (int e = threadIdx.x; e < npts * L.out; e += kThreads) {
    const int pt = e / L.out;
    const int o = e - pt * L.out;
    T* row = g + pt * kp1 * lda + o;
    const T* st = state + pt * kp1 * L.out + o;
    const act::Derivatives<T> d = activation(L.act, L.p0, L.p1, st[0]);
    const T slope = slope_of(d, first, row - o);
    T tangent_sum = T(0);
    for (int s = 1; s < kp1; ++s) tangent_sum += row[s * lda] * st[s * L.out];
    row[0] = row[0] * slope + tangent_sum * d.d2;
    for (int s = 1; s < kp1; ++s) row[s * lda] *= slope;
  }
}

// The h columns [0, prev.out) of the input rows of the layer after `prev`,
// rebuilt from prev's saved [z; tz]: h = act(z), t = act'(z) tz.
template <typename T>
__device__ void rebuild_inputs(const BackwardLayer<T>& prev, T* in, const T* state, int lda, int npts, int kp1,
                               const BackwardParams<T>* first) {
  for (int e = threadIdx.x; e < npts * prev.out; e += kThreads) {
    const int pt = e / prev.out;
    const int j = e - pt * prev.out;
    T* row = in + pt * kp1 * lda + j;
    const T* st = state + pt * kp1 * prev.out + j;
    const act::Derivatives<T> d = activation(prev.act, prev.p0, prev.p1, st[0]);
    const T slope = slope_of(d, first, row - j);
    row[0] = d.value;
    for (int s = 1; s < kp1; ++s) row[s * lda] = slope * st[s * prev.out];
  }
}

// partial[o * in + j] += sum_r g[r, o] * in[r, col0 + j] over the tile's rows
// (value and tangent rows alike), and partial[out * in + o] += sum of g_z over
// the points. Every entry has one owning thread, so there are no races.
template <typename T, int WIDTH>
__device__ void accumulate_weight_grads(const BackwardLayer<T>& L, const T* g, const T* in, int lda, int npts,
                                        int kp1, T* partial) {
  using Tl = BackwardTiling<T, WIDTH>;
  constexpr int TJ = Tl::kGradColThreads, RJ = Tl::kGradColsPerThread;
  constexpr int TO = Tl::kGradRowThreads, RO = Tl::kGradRowsPerThread;
  const int tj = threadIdx.x % TJ;
  const int to = threadIdx.x / TJ;
  const int out = L.out, n_in = L.in_cols, rows = npts * kp1;
  for (int o0 = 0; o0 < out; o0 += TO * RO) {
    for (int j0 = 0; j0 < n_in; j0 += TJ * RJ) {
      int o_col[RO], j_col[RJ];  // clamped: out-of-range entries compute a duplicate and are not stored
#pragma unroll
      for (int i = 0; i < RO; ++i) o_col[i] = min(o0 + to + i * TO, out - 1);
#pragma unroll
      for (int jj = 0; jj < RJ; ++jj) j_col[jj] = L.col0 + min(j0 + tj + jj * TJ, n_in - 1);
      T acc[RO][RJ];
#pragma unroll
      for (int i = 0; i < RO; ++i)
#pragma unroll
        for (int jj = 0; jj < RJ; ++jj) acc[i][jj] = T(0);
      for (int r = 0; r < rows; ++r) {
        const T* g_row = g + r * lda;
        const T* in_row = in + r * lda;
        T gv[RO], av[RJ];
#pragma unroll
        for (int i = 0; i < RO; ++i) gv[i] = g_row[o_col[i]];
#pragma unroll
        for (int jj = 0; jj < RJ; ++jj) av[jj] = in_row[j_col[jj]];
#pragma unroll
        for (int i = 0; i < RO; ++i)
#pragma unroll
          for (int jj = 0; jj < RJ; ++jj) acc[i][jj] += gv[i] * av[jj];
      }
#pragma unroll
      for (int i = 0; i < RO; ++i)
#pragma unroll
        for (int jj = 0; jj < RJ; ++jj) {
          const int o = o0 + to + i * TO;
          const int j = j0 + tj + jj * TJ;
          if (o < out && j < n_in) partial[o * n_in + j] += acc[i][jj];
        }
    }
  }
  T* bias_partial = partial + static_cast<int64_t>(out) * n_in;
  for (int o = threadIdx.x; o < out; o += kThreads) {
    T sum = T(0);
    for (int pt = 0; pt < npts; ++pt) sum += g[pt * kp1 * lda + o];
    bias_partial[o] += sum;
  }
}

// float asks for two resident blocks per SM (<= 128 registers); double keeps the full register budget.
template <typename T, int WIDTH>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 1)
    mlp_backward_kernel(const __grid_constant__ BackwardParams<T> p) {
  using Tl = BackwardTiling<T, WIDTH>;
  TORCHJAC_DYNAMIC_SMEM(smem);
  int64_t* cond_row = reinterpret_cast<int64_t*>(smem);
  T* buf0 = reinterpret_cast<T*>(cond_row + Tl::kRows);
  T* buf1 = buf0 + Tl::kRows * p.lda;
  T* ws = buf1 + Tl::kRows * p.lda;
  T* states = p.states + blockIdx.x * p.state_stride;
  T* partials = p.partials + blockIdx.x * p.partial_stride;

  const int lda = p.lda;
  const mainloop::GemmMode mode = static_cast<mainloop::GemmMode>(p.gemm_mode);
  const int kp1 = p.k + 1;
  const int per_tile = Tl::kRows / kp1;
  const int64_t num_tiles = (p.num_points + per_tile - 1) / per_tile;
  const int last = p.num_layers - 1;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t first = t * per_tile;
    const int npts = static_cast<int>(min(static_cast<int64_t>(per_tile), p.num_points - first));
    const int rows = npts * kp1;
    if (p.cond_dim > 0) {
      for (int pt = threadIdx.x; pt < npts; pt += kThreads) cond_row[pt] = cond_row_of(p.cond_rows, first + pt);
      __syncthreads();
    }
    load_inputs<T, WIDTH>(p, buf0, buf1, cond_row, first, npts, kp1);
    __syncthreads();

    // 1. The forward, in buf0, saving every layer's [z; tz].
    for (int l = 0; l <= last; ++l) {
      const BackwardLayer<T>& L = p.layers[l];
      mainloop::gemm_into_rows<T, Tl, true>(buf0, lda, L.col0, L.in_cols, L.weight, L.ldw, L.out, ws, rows, buf0, mode);
      __syncthreads();
      save_and_activate(L, buf0, states + L.state_offset, lda, npts, kp1, l < last, l == 0 ? &p : nullptr);
      __syncthreads();
    }

    // 2. Back through the layers: g holds the gradient rows of layer l's output,
    // `in` gets layer l's input rows.
    load_output_grads(p, buf0, first, npts, kp1);
    __syncthreads();
    T* g = buf0;
    T* in = buf1;
    for (int l = last; l >= 0; --l) {
      const BackwardLayer<T>& L = p.layers[l];
      activation_backward(L, g, states + L.state_offset, lda, npts, kp1, l == 0 ? &p : nullptr);
      if (l > 0) {
        rebuild_inputs(p.layers[l - 1], in, states + p.layers[l - 1].state_offset, lda, npts, kp1,
                       l == 1 ? &p : nullptr);
      }
      __syncthreads();
      accumulate_weight_grads<T, WIDTH>(L, g, in, lda, npts, kp1, partials + L.partial_offset);
      // The gradient rows of layer l's input: h columns into `in` (a product
      // stores only after a barrier, once every thread is done reading `in`),
      // x and cond columns, in groups of kMaxInOut, into the global gradients.
      if (L.hidden_in > 0) {
        mainloop::gemm_into_rows<T, Tl, false>(g, lda, 0, L.out, L.weight, L.ldw, L.hidden_in, ws, rows, in, mode);
      }
      for (int n0 = L.hidden_in; n0 < L.in_cols; n0 += kMaxInOut) {
        mainloop::pair_gemm<T, Tl, false>(g, lda, 0, L.out, L.weight + n0, L.ldw, min(kMaxInOut, L.in_cols - n0), ws,
                                     rows, StoreInputGrads<T>{&p, first, kp1, n0 - L.hidden_in});
      }
      __syncthreads();
      T* swap = g;
      g = in;
      in = swap;
    }
  }
}

// grad_weights[l] and grad_biases[l] from the blocks' partial sums, added in block order.
template <typename T>
struct ReduceParams {
  T* grad_weights[kMaxLayers];
  T* grad_biases[kMaxLayers];
  int64_t offset[kMaxLayers + 1];  // of layer l in a block's partial sums; offset[num_layers] = total
  int64_t weight_size[kMaxLayers];  // out_l * in_l; the out_l bias entries follow
  int num_layers;
  const T* partials;
  int64_t stride;
  int blocks;
};
static_assert(sizeof(ReduceParams<double>) <= 4096, "kernel parameters too large");

template <typename T>
__global__ void reduce_partials_kernel(const __grid_constant__ ReduceParams<T> p) {
  const int64_t total = p.offset[p.num_layers];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int l = 0;
    while (e >= p.offset[l + 1]) ++l;
    T sum = T(0);
    for (int b = 0; b < p.blocks; ++b) sum += p.partials[b * p.stride + e];
    const int64_t local = e - p.offset[l];
    if (local < p.weight_size[l]) {
      p.grad_weights[l][local] = sum;
    } else {
      p.grad_biases[l][local - p.weight_size[l]] = sum;
    }
  }
}

CondGroups make_cond_groups(const CondRowMap& m) {
  CondGroups g;
  int64_t point_stride = 1;
  for (int d = m.ndim - 1; d >= 0; --d) {
    if (m.strides[d] == 0) {
      g.broadcast_sizes[g.num_broadcast] = m.sizes[d];
      g.broadcast_point_strides[g.num_broadcast] = point_stride;
      g.points_per_row *= m.sizes[d];
      ++g.num_broadcast;
    } else {
      g.kept_sizes[g.num_kept] = m.sizes[d];
      g.kept_row_strides[g.num_kept] = m.strides[d];
      g.kept_point_strides[g.num_kept] = point_stride;
      ++g.num_kept;
    }
    point_stride *= m.sizes[d];
  }
  return g;
}

// out[(g * chunks + ch) * c + j] = sum of point_grads[p, j] over the points p of
// cond row g numbered [ch * chunk, (ch + 1) * chunk), in order.
template <typename T>
__global__ void cond_partial_kernel(const T* __restrict__ point_grads, int64_t cond_rows, int c, CondGroups groups,
                                    int64_t chunk, int64_t chunks, T* __restrict__ out) {
  const int64_t total = cond_rows * chunks * c;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(e % c);
    const int64_t rest = e / c;
    const int64_t ch = rest % chunks;
    const int64_t g = rest / chunks;
    int64_t base = 0;
    for (int d = 0; d < groups.num_kept; ++d)
      base += (g / groups.kept_row_strides[d]) % groups.kept_sizes[d] * groups.kept_point_strides[d];
    const int64_t end = min(groups.points_per_row, (ch + 1) * chunk);
    T sum = T(0);
    for (int64_t m = ch * chunk; m < end; ++m) {
      int64_t point = base, rem = m;
      for (int d = 0; d < groups.num_broadcast; ++d) {  // innermost broadcast dim first
        point += rem % groups.broadcast_sizes[d] * groups.broadcast_point_strides[d];
        rem /= groups.broadcast_sizes[d];
      }
      sum += point_grads[point * c + j];
    }
    out[e] = sum;
  }
}

template <typename T>
__global__ void cond_sum_chunks_kernel(const T* __restrict__ partial, int64_t cond_rows, int c, int64_t chunks,
                                       T* __restrict__ grad_cond) {
  const int64_t total = cond_rows * c;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = e / c;
    const int j = static_cast<int>(e - g * c);
    T sum = T(0);
    for (int64_t ch = 0; ch < chunks; ++ch) sum += partial[(g * chunks + ch) * c + j];
    grad_cond[e] = sum;
  }
}

// ---------------------------------------------------------------------------
// Host side.

template <typename T>
int tile_rows(int width) {
  switch (width) {
    case 16: return BackwardTiling<T, 16>::kRows;
    case 32: return BackwardTiling<T, 32>::kRows;
    case 64: return BackwardTiling<T, 64>::kRows;
    case 128: return BackwardTiling<T, 128>::kRows;
    case 256: return BackwardTiling<T, 256>::kRows;
    default: return 0;
  }
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// How many blocks of the kernel fit on an SM: a query, once device_setup has
// raised the kernel's shared memory limit.
template <typename T, int WIDTH>
cudaError_t occupancy(size_t smem_bytes, int* blocks_per_sm) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, mlp_backward_kernel<T, WIDTH>, kThreads,
                                                       smem_bytes);
}

template <typename T>
cudaError_t occupancy_of_width(int width, size_t smem_bytes, int* blocks_per_sm) {
  switch (width) {
    case 16: return occupancy<T, 16>(smem_bytes, blocks_per_sm);
    case 32: return occupancy<T, 32>(smem_bytes, blocks_per_sm);
    case 64: return occupancy<T, 64>(smem_bytes, blocks_per_sm);
    case 128: return occupancy<T, 128>(smem_bytes, blocks_per_sm);
    case 256: return occupancy<T, 256>(smem_bytes, blocks_per_sm);
    default: return cudaErrorNotSupported;
  }
}

// The kernels whose shared memory limit device_setup raises.
struct BackwardKernels {
  template <typename T, int WIDTH>
  static const void* k() {
    return reinterpret_cast<const void*>(&mlp_backward_kernel<T, WIDTH>);
  }
  static std::array<const void*, 10> list() {
    return {k<float, 16>(), k<float, 32>(), k<float, 64>(), k<float, 128>(), k<float, 256>(),
            k<double, 16>(), k<double, 32>(), k<double, 64>(), k<double, 128>(), k<double, 256>()};
  }
};

using Plan = MlpBackwardPlan;

bool reads_input(const Plan& plan, int64_t layer) { return layer == 0 || plan.skip[layer]; }

Plan make_plan(const MlpBackwardArgs& args, int device) {
  Plan plan;
  auto fail = [&](const char* why) {
    plan.unsupported_reason = why;
    return plan;
  };
  const MlpForwardArgs& a = args.forward;
  if (second_order_rows(a.mode, 1) > 0) return fail("the second-order modes have no fused backward");
  // The backward covers what the forward covers (shapes, widths, dtypes, layers).
  if (const char* why = mlp_forward_unsupported_reason(a, device)) return fail(why);
  const bool is_double = a.dtype == ScalarKind::kFloat64;
  plan.elem = is_double ? sizeof(double) : sizeof(float);
  const int64_t L = a.num_layers;
  for (int64_t i = 0; i < a.num_skip_layers; ++i) plan.skip[a.skip_layers[i]] = true;
  const int64_t c = a.cond_dim;
  const int64_t H = L > 1 ? a.out_features[0] : 0;
  plan.hidden = static_cast<int>(H);
  for (int w : kTemplateWidths) {
    if (std::max<int64_t>(H, 1) <= w) {
      plan.width = w;
      break;
    }
  }
  plan.x_col = static_cast<int>(std::max<int64_t>(H, a.d_out));
  plan.rows = is_double ? tile_rows<double>(plan.width) : tile_rows<float>(plan.width);
  const DeviceSetup& setup = device_setup<BackwardKernels>(device);
  if (setup.error != cudaSuccess) return fail("the device's properties could not be queried or set");
  plan.sms = setup.sms;
  // The tile's stride and shared memory for a mode; the tensor-core layout falls back to SIMT where it does
  // not fit.
  auto lay_out = [&](mainloop::GemmMode mode) {
    plan.gemm_mode = static_cast<int>(mode);
    plan.lda = static_cast<int>(mainloop::tile_row_stride(plan.x_col + a.d_in + c, mode));
    plan.smem_bytes = plan.rows * sizeof(int64_t) + 2 * static_cast<size_t>(plan.rows) * plan.lda * plan.elem +
                      mainloop::staging_bytes(mode, plan.rows, plan.width, plan.elem);
  };
  lay_out(mainloop::plan_gemm_mode(a.precision, a.dtype, H, setup.cc_major));
  if (plan.gemm_mode != 0 && plan.smem_bytes > static_cast<size_t>(setup.max_smem_optin)) {
    lay_out(mainloop::GemmMode::kSimt);
  }
  if (plan.lda > 4096) return fail("too many cond columns for the backward tile");
  if (plan.smem_bytes > static_cast<size_t>(setup.max_smem_optin)) {
    return fail("the backward tile does not fit in the device's shared memory (wide cond, or float64 at width 256)");
  }

  const bool basis = is_basis_mode(a.mode);
  plan.total_tangents = basis ? a.d_in : a.num_tangents;
  plan.per_pass = basis ? a.d_in : kMaxTangentsPerPass;
  int64_t sum_out = 0;
  for (int64_t l = 0; l < L; ++l) {
    sum_out += a.out_features[l];
    plan.partial_stride += a.out_features[l] * (a.in_features[l] + 1);
  }
  plan.state_stride = plan.rows * sum_out;
  if (a.num_points == 0) return plan;

  int blocks_per_sm = 0;
  const cudaError_t err = is_double ? occupancy_of_width<double>(plan.width, plan.smem_bytes, &blocks_per_sm)
                                    : occupancy_of_width<float>(plan.width, plan.smem_bytes, &blocks_per_sm);
  if (err != cudaSuccess || blocks_per_sm < 1) {
    cudaGetLastError();
    return fail("the backward kernel cannot be resident on the device (shared memory or registers)");
  }
  // The first pass carries the most tangents, so it has the most tiles.
  const int64_t first_k = std::min(plan.per_pass, plan.total_tangents);
  const int64_t per_tile = plan.rows / (first_k + 1);
  const int64_t tiles = (a.num_points + per_tile - 1) / per_tile;
  int64_t grid = std::min<int64_t>(tiles, static_cast<int64_t>(plan.sms) * blocks_per_sm);
  grid = std::min<int64_t>(grid, std::max<int64_t>(1, kMaxPartialBytes / (plan.partial_stride * static_cast<int64_t>(plan.elem))));
  plan.grid = static_cast<int>(grid);
  plan.states_bytes = align_up(grid * plan.state_stride * plan.elem);
  plan.partials_bytes = align_up(grid * plan.partial_stride * plan.elem);

  plan.cond_broadcast = c > 0 && a.num_cond_rows != a.num_points;
  if (plan.cond_broadcast) {
    plan.cond_groups = make_cond_groups(a.cond_rows);
    const int64_t m = plan.cond_groups.points_per_row;
    // Two levels of about sqrt(m) terms each keep both kernels short.
    plan.cond_chunk = std::max<int64_t>(32, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(m)))));
    plan.cond_chunks = (m + plan.cond_chunk - 1) / plan.cond_chunk;
    plan.cond_points_bytes = align_up(a.num_points * c * plan.elem);
    if (plan.cond_chunks > 1) plan.cond_partials_bytes = align_up(a.num_cond_rows * plan.cond_chunks * c * plan.elem);
  }
  return plan;
}

cudaError_t zero(void* ptr, size_t bytes, cudaStream_t stream) {
  return bytes == 0 ? cudaSuccess : cudaMemsetAsync(ptr, 0, bytes, stream);
}

unsigned reduce_blocks(int64_t total, const Plan& plan) {
  const int64_t wanted = (total + kReduceThreads - 1) / kReduceThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(plan.sms) * kReduceBlocksPerSm)));
}

template <typename T, int WIDTH>
cudaError_t launch_main(const BackwardParams<T>& kp, const Plan& plan, cudaStream_t stream) {
  TORCHJAC_LAUNCH(plan.grid, kThreads, plan.smem_bytes, stream, mlp_backward_kernel<T, WIDTH>)(kp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pass(const BackwardParams<T>& kp, const Plan& plan, cudaStream_t stream) {
  switch (plan.width) {
    case 16: return launch_main<T, 16>(kp, plan, stream);
    case 32: return launch_main<T, 32>(kp, plan, stream);
    case 64: return launch_main<T, 64>(kp, plan, stream);
    case 128: return launch_main<T, 128>(kp, plan, stream);
    case 256: return launch_main<T, 256>(kp, plan, stream);
    default: return cudaErrorNotSupported;
  }
}

template <typename T>
cudaError_t launch_typed(const MlpBackwardArgs& args, const Plan& plan, cudaStream_t stream) {
  const MlpForwardArgs& a = args.forward;
  const int64_t n = a.num_points, c = a.cond_dim, L = a.num_layers;
  char* workspace = static_cast<char*>(args.workspace);
  T* states = reinterpret_cast<T*>(workspace);
  T* partials = reinterpret_cast<T*>(workspace + plan.states_bytes);
  T* cond_points = reinterpret_cast<T*>(workspace + plan.states_bytes + plan.partials_bytes);
  T* cond_partials = reinterpret_cast<T*>(workspace + plan.states_bytes + plan.partials_bytes + plan.cond_points_bytes);

  // Everything the kernel accumulates into starts at zero.
  T* grad_cond_points = plan.cond_broadcast ? cond_points : static_cast<T*>(args.grad_cond);
  const bool jvp = a.mode == MlpMode::kJvp;
  cudaError_t err;
  if ((err = zero(partials, plan.partials_bytes, stream)) != cudaSuccess) return err;
  if ((err = zero(args.grad_x, n * a.d_in * sizeof(T), stream)) != cudaSuccess) return err;
  if (c > 0 && (err = zero(grad_cond_points, n * c * sizeof(T), stream)) != cudaSuccess) return err;
  if (jvp && (err = zero(args.grad_tangents, n * a.num_tangents * a.d_in * sizeof(T), stream)) != cudaSuccess) {
    return err;
  }

  BackwardParams<T> kp{};
  kp.num_layers = static_cast<int>(L);
  kp.mode = static_cast<int>(a.mode);
  kp.num_points = n;
  kp.d_in = static_cast<int>(a.d_in);
  kp.d_out = static_cast<int>(a.d_out);
  kp.cond_dim = static_cast<int>(c);
  kp.x_col = plan.x_col;
  kp.lda = plan.lda;
  kp.gemm_mode = plan.gemm_mode;
  kp.x = static_cast<const T*>(a.x);
  kp.cond = static_cast<const T*>(a.cond);
  kp.cond_rows = a.cond_rows;
  kp.tangents = static_cast<const T*>(a.tangents);
  kp.tangents_total = plan.total_tangents;
  kp.grad_y = static_cast<const T*>(args.grad_y);
  kp.grad_out = static_cast<const T*>(args.grad_out);
  kp.grad_x = static_cast<T*>(args.grad_x);
  kp.grad_cond_points = grad_cond_points;
  kp.grad_tangents = static_cast<T*>(args.grad_tangents);
  kp.states = states;
  kp.state_stride = plan.state_stride;
  kp.partials = partials;
  kp.partial_stride = plan.partial_stride;

  ReduceParams<T> rp{};
  rp.num_layers = kp.num_layers;
  rp.partials = partials;
  rp.stride = plan.partial_stride;
  rp.blocks = plan.grid;
  int64_t state_offset = 0, partial_offset = 0;
  for (int64_t l = 0; l < L; ++l) {
    BackwardLayer<T>& lp = kp.layers[l];
    lp.weight = static_cast<const T*>(a.weights[l]);
    lp.bias = static_cast<const T*>(a.biases[l]);
    lp.ldw = a.in_features[l];
    lp.state_offset = state_offset;
    lp.partial_offset = partial_offset;
    lp.col0 = l == 0 ? plan.x_col : 0;
    lp.hidden_in = l == 0 ? 0 : plan.hidden;
    lp.in_cols = static_cast<int>(lp.hidden_in + (reads_input(plan, l) ? a.d_in + c : 0));
    lp.out = static_cast<int>(a.out_features[l]);
    lp.act = static_cast<int>(a.activations[l]);
    lp.p0 = static_cast<T>(a.activation_params[2 * l]);
    lp.p1 = static_cast<T>(a.activation_params[2 * l + 1]);
    rp.grad_weights[l] = static_cast<T*>(args.grad_weights[l]);
    rp.grad_biases[l] = static_cast<T*>(args.grad_biases[l]);
    rp.offset[l] = partial_offset;
    rp.weight_size[l] = a.out_features[l] * a.in_features[l];
    state_offset += plan.rows * a.out_features[l];
    partial_offset += a.out_features[l] * (a.in_features[l] + 1);
  }
  rp.offset[L] = partial_offset;

  // Tangents beyond kMaxTangentsPerPass run as further passes; the gradient is
  // linear in the per-tangent terms of the loss, so the passes add up.
  int64_t offset = 0;
  do {
    kp.k = static_cast<int>(std::min(plan.per_pass, plan.total_tangents - offset));
    kp.tangent_offset = offset;
    kp.first_pass = offset == 0;
    if ((err = launch_pass(kp, plan, stream)) != cudaSuccess) return err;
    offset += kp.k;
  } while (offset < plan.total_tangents);

  TORCHJAC_LAUNCH(reduce_blocks(partial_offset, plan), kReduceThreads, 0, stream, reduce_partials_kernel<T>)(rp);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  if (plan.cond_broadcast) {
    const int64_t rows = a.num_cond_rows;
    T* target = plan.cond_chunks > 1 ? cond_partials : static_cast<T*>(args.grad_cond);
    TORCHJAC_LAUNCH(reduce_blocks(rows * plan.cond_chunks * c, plan), kReduceThreads, 0, stream, cond_partial_kernel<T>)(
        cond_points, rows, static_cast<int>(c), plan.cond_groups, plan.cond_chunk, plan.cond_chunks, target);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (plan.cond_chunks > 1) {
      TORCHJAC_LAUNCH(reduce_blocks(rows * c, plan), kReduceThreads, 0, stream, cond_sum_chunks_kernel<T>)(
          cond_partials, rows, static_cast<int>(c), plan.cond_chunks, static_cast<T*>(args.grad_cond));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// num_points == 0: every gradient is zero (grad_x and grad_tangents are empty).
cudaError_t zero_gradients(const MlpBackwardArgs& args, const Plan& plan, cudaStream_t stream) {
  const MlpForwardArgs& a = args.forward;
  cudaError_t err = zero(args.grad_cond, a.num_cond_rows * a.cond_dim * plan.elem, stream);
  for (int64_t l = 0; err == cudaSuccess && l < a.num_layers; ++l) {
    err = zero(args.grad_weights[l], a.out_features[l] * a.in_features[l] * plan.elem, stream);
    if (err == cudaSuccess) err = zero(args.grad_biases[l], a.out_features[l] * plan.elem, stream);
  }
  return err;
}

}  // namespace

MlpBackwardPlan mlp_backward_plan(const MlpBackwardArgs& args, int device) { return make_plan(args, device); }

cudaError_t mlp_backward_launch(const MlpBackwardArgs& args, const MlpBackwardPlan& plan, cudaStream_t stream) {
  if (plan.unsupported_reason != nullptr) return cudaErrorNotSupported;
  if (args.forward.num_points == 0) return zero_gradients(args, plan, stream);
  if (args.workspace == nullptr && plan.workspace_bytes() > 0) return cudaErrorInvalidValue;
  return args.forward.dtype == ScalarKind::kFloat64 ? launch_typed<double>(args, plan, stream)
                                                    : launch_typed<float>(args, plan, stream);
}

}  // namespace cuda
}  // namespace torchjac
