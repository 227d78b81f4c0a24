// The layer products of the forward and backward kernels (the mainloop of a
// fused MLP layer): a tile of rows in shared memory times a weight matrix that
// is staged through shared memory in chunks of kChunk, by the 256 threads of a
// block. The tiling (rows per thread, outputs per thread) is a template
// parameter Tl with kRows, kRowsPerThread, kOutPerThread, kRowThreads,
// kColThreads and kPairsPerThread; each kernel has its own.
//
// Hidden-layer products run on tensor cores (WMMA) in float32 when the
// precision policy asks for it (GemmMode); everything else, and any product
// whose shape the tensor-core path does not take (tc_product), is SIMT.
#pragma once

#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mlp_forward.cuh"

namespace torchjac {
namespace cuda {
namespace mainloop {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;          // weight rows or columns staged per step
constexpr int kLdw = kChunk + 1;    // odd row stride: conflict-free smem reads (SIMT)
constexpr int kLdwTf32 = kChunk + 4;  // staged weights for TF32 fragments: 16-byte rows, skewed by 4 banks
constexpr int kLdBf16 = kChunk + 8;   // staged BF16 rows: 16-byte rows, skewed by 4 banks

// How the products multiply, from PyTorch's float32 matmul precision (docs/cuda.md, "Precision").
enum class GemmMode : int {
  kSimt = 0,    // FP32 or FP64 FMA: float64, and the products tc_product does not take
  kTf32x3 = 1,  // "highest": 3xTF32 split (hi*lo + lo*hi + hi*hi), FP32-accurate
  kTf32 = 2,    // "high": TF32 inputs, FP32 accumulation
  kBf16 = 3,    // "medium": BF16 inputs, FP32 accumulation
};

// The mode a call runs in. Tensor cores need sm_80 or later, and a hidden
// width that is a multiple of 16: otherwise no product could take them
// (tc_product), and the call keeps the SIMT layout (odd stride, less staging).
inline GemmMode plan_gemm_mode(MatmulPrecision precision, ScalarKind dtype, int64_t hidden, int cc_major) {
  if (dtype != ScalarKind::kFloat32 || cc_major < 8 || hidden == 0 || hidden % 16 != 0) return GemmMode::kSimt;
  switch (precision) {
    case MatmulPrecision::kHigh: return GemmMode::kTf32;
    case MatmulPrecision::kMedium: return GemmMode::kBf16;
    default: return GemmMode::kTf32x3;
  }
}

__host__ __device__ inline int tc_k_step(GemmMode mode) { return mode == GemmMode::kBf16 ? 16 : 8; }

// The tile's row stride for `cols` columns: odd for SIMT (conflict-free
// scalar reads); for WMMA a multiple of 4 floats that is 4 mod 32, so rows
// are 16-byte aligned and 8 consecutive rows start in different banks.
__host__ __device__ inline int64_t tile_row_stride(int64_t cols, GemmMode mode) {
  if (mode == GemmMode::kSimt) return cols | 1;
  return cols + ((4 - cols) % 32 + 32) % 32;
}

// Shared memory for staging weight chunks (and, for BF16, the tile's rows): the
// SIMT layout or the tensor-core one, whichever is larger, because one kernel
// runs both (layer 0 and the last layer stay SIMT). TF32 double-buffers.
__host__ __device__ inline size_t staging_bytes(GemmMode mode, int rows, int width, size_t elem) {
  const size_t simt = static_cast<size_t>(width) * kLdw * elem;
  size_t tc = 0;
  if (mode == GemmMode::kTf32 || mode == GemmMode::kTf32x3) tc = 2 * static_cast<size_t>(width) * kLdwTf32 * sizeof(float);
  if (mode == GemmMode::kBf16) tc = static_cast<size_t>(rows + width) * kLdBf16 * sizeof(__nv_bfloat16);
  return simt > tc ? simt : tc;
}

template <typename S, typename T>
__device__ inline S to_staged(T v) {
  if constexpr (std::is_same<S, __nv_bfloat16>::value) {
    return __float2bfloat16(static_cast<float>(v));
  } else {
    return static_cast<S>(v);
  }
}

// ws[n * ldws + c] = B(k0 + c, n) for n < staged, zero where n >= n_count or c >= len;
// B(k, n) = w[n * ldw + k] (kTransposedW) or w[k * ldw + n]. Global reads are coalesced either way.
template <typename T, bool kTransposedW, typename S = T>
__device__ void stage_weights(const T* w, int64_t ldw, int n_count, int k0, int len, int staged, S* ws,
                              int ldws = kLdw) {
  if (kTransposedW) {
    for (int e = threadIdx.x; e < staged * kChunk; e += kThreads) {
      const int n = e / kChunk;
      const int c = e - n * kChunk;
      ws[n * ldws + c] = to_staged<S>((n < n_count && c < len) ? __ldg(w + n * ldw + k0 + c) : T(0));
    }
  } else {
    for (int e = threadIdx.x; e < staged * kChunk; e += kThreads) {
      const int c = e / staged;
      const int n = e - c * staged;
      ws[n * ldws + c] = to_staged<S>((n < n_count && c < len) ? __ldg(w + (k0 + c) * ldw + n) : T(0));
    }
  }
}

// Stores a product into tile columns [0, ncols): the rows of the next layer.
template <typename T>
struct StoreRows {
  T* tile;
  int lda;
  __device__ void operator()(int r, int n, T v) const { tile[r * lda + n] = v; }
};

// The products below: C[r][n] = sum_{k < kdim} A[r * lda + a_col0 + k] * B(k, n)
// for n < ncols, with B as in stage_weights. After a __syncthreads they store
// C[r][n] for the rows r < active_rows, so a store may overwrite A.

// ncols <= kMaxInOut (the last layer, groups of input columns): each thread
// takes (row, output) pairs.
template <typename T, typename Tl, bool kTransposedW, typename Store>
__device__ void pair_gemm(const T* A, int lda, int a_col0, int kdim, const T* w, int64_t ldw, int ncols, T* ws,
                          int active_rows, const Store& store) {
  constexpr int NP = Tl::kPairsPerThread;
  int row[NP], col[NP];
  T acc[NP];
#pragma unroll
  for (int q = 0; q < NP; ++q) {
    const int e = threadIdx.x + q * kThreads;
    row[q] = e / ncols;
    col[q] = e - row[q] * ncols;
    acc[q] = T(0);
  }
  for (int k0 = 0; k0 < kdim; k0 += kChunk) {
    const int len = min(kChunk, kdim - k0);
    if (k0 > 0) __syncthreads();  // everyone is done with the previous chunk
    stage_weights<T, kTransposedW>(w, ldw, ncols, k0, len, ncols, ws);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < NP; ++q) {
      if (row[q] < active_rows) {
        const T* a = A + row[q] * lda + a_col0 + k0;
        const T* b = ws + col[q] * kLdw;
        for (int kk = 0; kk < len; ++kk) acc[q] += a[kk] * b[kk];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int q = 0; q < NP; ++q)
    if (row[q] < active_rows) store(row[q], col[q], acc[q]);
}

// The tensor-core code needs sm_80 (TF32 and BF16 fragments, cp.async); a device
// pass for an older architecture compiles the SIMT products only, and the host
// never picks a tensor-core mode there (plan_gemm_mode).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TORCHJAC_TENSOR_CORES 1
#else
#define TORCHJAC_TENSOR_CORES 0
#endif

#if TORCHJAC_TENSOR_CORES
// stage_weights into rows of kLdwTf32 floats with cp.async, committed as one
// batch: 16-byte copies where the weight rows allow (the transposed layout with
// 16-byte aligned rows), else 4-byte ones (the non-transposed layout is a
// transpose). Columns c >= len are zeroed by plain stores.
template <bool kTransposedW>
__device__ void stage_weights_async(const float* w, int64_t ldw, int ncols, int k0, int len, float* ws) {
  constexpr int kQuads = kChunk / 4;
  if (kTransposedW && ldw % 4 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0) {
    for (int e = threadIdx.x; e < ncols * kQuads; e += kThreads) {
      const int n = e / kQuads;
      const int c = (e - n * kQuads) * 4;
      float* dst = ws + n * kLdwTf32 + c;
      if (c < len) {  // len is a multiple of 8
        __pipeline_memcpy_async(dst, w + n * ldw + k0 + c, 16);
      } else {
        for (int i = 0; i < 4; ++i) dst[i] = 0.0f;
      }
    }
  } else {
    for (int e = threadIdx.x; e < ncols * kChunk; e += kThreads) {
      const int n = kTransposedW ? e / kChunk : e % ncols;
      const int c = kTransposedW ? e - n * kChunk : e / ncols;
      float* dst = ws + n * kLdwTf32 + c;
      if (c < len) {
        __pipeline_memcpy_async(dst, kTransposedW ? w + n * ldw + k0 + c : w + (k0 + c) * ldw + n, 4);
      } else {
        *dst = 0.0f;
      }
    }
  }
  __pipeline_commit();
}

// Rounds a TF32 fragment's elements to nearest in place; with the 3xTF32 split
// (kSplit), lo gets the rounded remainder, so that hi + lo carries 21 bits.
// Element-wise, so independent of the fragment's element mapping.
template <bool kSplit, class Frag>
__device__ inline void round_to_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    hi.x[i] = nvcuda::wmma::__float_to_tf32(v);
    if (kSplit) lo.x[i] = nvcuda::wmma::__float_to_tf32(v - hi.x[i]);
  }
}

// Whether the tensor-core path takes a product: whole 16-column output tiles,
// whole k steps, and 32-byte aligned fragment rows (the tile's stride is
// tile_row_stride's). Layer 0 and skip layers, which read d_in + c input
// columns, usually stay SIMT; the hidden H x H layers, the bulk of the work,
// qualify when H is a multiple of 16.
__device__ inline bool tc_product(GemmMode mode, int a_col0, int kdim, int ncols) {
  return mode != GemmMode::kSimt && ncols % 16 == 0 && kdim % tc_k_step(mode) == 0 && a_col0 % 8 == 0;
}

// The tensor-core product (float only): C = A[:, a_col0 : a_col0 + kdim] * B, the
// same contract as wide_gemm. The output is a grid of 16 x 16 tiles over the
// active rows' 16-row blocks; warp w owns a run of consecutive tiles (sharing
// their A fragments along a row block), accumulated in FP32 fragments. Rows of
// the last row block past active_rows are computed and stored too: callers
// never read them.
template <typename Tl, bool kTransposedW, GemmMode kMode>
__device__ void tc_gemm(const float* A, int lda, int a_col0, int kdim, const float* w, int64_t ldw, int ncols,
                        float* ws, int active_rows, float* out) {
  namespace wmma = nvcuda::wmma;
  constexpr bool kBf16 = kMode == GemmMode::kBf16;
  constexpr int kK = kBf16 ? 16 : 8;  // tc_k_step(kMode)
  constexpr int WIDTH = Tl::kColThreads * Tl::kOutPerThread;
  constexpr int kMaxTiles = (Tl::kRows / 16 * (WIDTH / 16) + kWarps - 1) / kWarps;
  static_assert(Tl::kRows % 16 == 0, "tensor-core tiles need whole 16-row blocks");
  using In = typename std::conditional<kBf16, __nv_bfloat16, wmma::precision::tf32>::type;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kK, In, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kK, In, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kK, float>;

  const int warp = threadIdx.x / 32;
  const int m_tiles = (active_rows + 15) / 16;
  const int n_tiles = ncols / 16;
  const int per_warp = (m_tiles * n_tiles + kWarps - 1) / kWarps;
  const int first_tile = warp * per_warp;
  const int my_tiles = min(per_warp, m_tiles * n_tiles - first_tile);  // warp-uniform, may be <= 0
  FragC acc[kMaxTiles];
#pragma unroll
  for (int j = 0; j < kMaxTiles; ++j) wmma::fill_fragment(acc[j], 0.0f);

  // BF16: each chunk of A's columns and of B is converted into shared memory (fragments load from memory).
  __nv_bfloat16* a_bf16 = reinterpret_cast<__nv_bfloat16*>(ws);
  __nv_bfloat16* b_bf16 = a_bf16 + Tl::kRows * kLdBf16;
  // TF32: weight chunk i is copied (cp.async) into buffer i % 2 while chunk i - 1 is multiplied.
  float* const w_buf[2] = {ws, ws + WIDTH * kLdwTf32};
  if constexpr (!kBf16) stage_weights_async<kTransposedW>(w, ldw, ncols, 0, min(kChunk, kdim), w_buf[0]);
  for (int k0 = 0, chunk = 0; k0 < kdim; k0 += kChunk, ++chunk) {
    const int len = min(kChunk, kdim - k0);
    if (k0 > 0) __syncthreads();  // everyone is done with the previous chunk (and with the buffer refilled next)
    if constexpr (kBf16) {
      for (int e = threadIdx.x; e < m_tiles * 16 * kChunk; e += kThreads) {
        const int r = e / kChunk;
        const int c = e - r * kChunk;
        a_bf16[r * kLdBf16 + c] = __float2bfloat16(c < len ? A[r * lda + a_col0 + k0 + c] : 0.0f);
      }
      stage_weights<float, kTransposedW, __nv_bfloat16>(w, ldw, ncols, k0, len, ncols, b_bf16, kLdBf16);
    } else if (k0 + kChunk < kdim) {
      stage_weights_async<kTransposedW>(w, ldw, ncols, k0 + kChunk, min(kChunk, kdim - k0 - kChunk),
                                        w_buf[(chunk + 1) & 1]);
      __pipeline_wait_prior(1);  // this chunk's copies are done, the next one's may still fly
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();  // every thread's part of the chunk is in place
    const float* w_chunk = w_buf[chunk & 1];
    for (int kk = 0; kk < len; kk += kK) {
      FragA a_hi, a_lo;
      int a_block = -1;
#pragma unroll
      for (int j = 0; j < kMaxTiles; ++j) {
        if (j >= my_tiles) break;
        const int mt = (first_tile + j) / n_tiles;
        const int nt = (first_tile + j) % n_tiles;
        FragB b_hi, b_lo;
        if constexpr (kBf16) {
          if (mt != a_block) wmma::load_matrix_sync(a_hi, a_bf16 + mt * 16 * kLdBf16 + kk, kLdBf16);
          wmma::load_matrix_sync(b_hi, b_bf16 + nt * 16 * kLdBf16 + kk, kLdBf16);
        } else {
          if (mt != a_block) {
            wmma::load_matrix_sync(a_hi, A + mt * 16 * lda + a_col0 + k0 + kk, lda);
            round_to_tf32<kMode == GemmMode::kTf32x3>(a_hi, a_lo);
          }
          wmma::load_matrix_sync(b_hi, w_chunk + nt * 16 * kLdwTf32 + kk, kLdwTf32);
          round_to_tf32<kMode == GemmMode::kTf32x3>(b_hi, b_lo);
        }
        a_block = mt;
        if (kMode == GemmMode::kTf32x3) {  // the small terms first
          wmma::mma_sync(acc[j], a_lo, b_hi, acc[j]);
          wmma::mma_sync(acc[j], a_hi, b_lo, acc[j]);
        }
        wmma::mma_sync(acc[j], a_hi, b_hi, acc[j]);
      }
    }
  }
  __syncthreads();  // outputs may overwrite columns other warps still read
#pragma unroll
  for (int j = 0; j < kMaxTiles; ++j) {
    if (j >= my_tiles) break;
    const int mt = (first_tile + j) / n_tiles;
    const int nt = (first_tile + j) % n_tiles;
    wmma::store_matrix_sync(out + mt * 16 * lda + nt * 16, acc[j], lda, wmma::mem_row_major);
  }
}

#endif  // TORCHJAC_TENSOR_CORES

// kMaxInOut < ncols <= WIDTH (hidden layers): a register tile. Thread (tr, to)
// owns rows tr + i * kRowThreads and outputs to + j * kColThreads, strided so that
// a warp reads distinct banks. In float32 with a tensor-core mode, tc_gemm
// instead, when tc_product takes the shape.
template <typename T, typename Tl, bool kTransposedW>
__device__ void wide_gemm(const T* A, int lda, int a_col0, int kdim, const T* w, int64_t ldw, int ncols, T* ws,
                          int active_rows, T* out, GemmMode mode) {
#if TORCHJAC_TENSOR_CORES
  if constexpr (std::is_same<T, float>::value) {
    if (tc_product(mode, a_col0, kdim, ncols)) {  // uniform across the block
      switch (mode) {
        case GemmMode::kTf32x3:
          return tc_gemm<Tl, kTransposedW, GemmMode::kTf32x3>(A, lda, a_col0, kdim, w, ldw, ncols, ws, active_rows, out);
        case GemmMode::kTf32:
          return tc_gemm<Tl, kTransposedW, GemmMode::kTf32>(A, lda, a_col0, kdim, w, ldw, ncols, ws, active_rows, out);
        default:
          return tc_gemm<Tl, kTransposedW, GemmMode::kBf16>(A, lda, a_col0, kdim, w, ldw, ncols, ws, active_rows, out);
      }
    }
  }
#endif
  constexpr int WIDTH = Tl::kColThreads * Tl::kOutPerThread;
  constexpr int RA = Tl::kRowsPerThread, OB = Tl::kOutPerThread;
  constexpr int TR = Tl::kRowThreads, TO = Tl::kColThreads;
  const int to = threadIdx.x % TO;
  const int tr = threadIdx.x / TO;
  const T* a_row = A + tr * lda + a_col0;
  const T* w_row = ws + to * kLdw;
  T acc[RA][OB];
#pragma unroll
  for (int i = 0; i < RA; ++i)
#pragma unroll
    for (int j = 0; j < OB; ++j) acc[i][j] = T(0);
  for (int k0 = 0; k0 < kdim; k0 += kChunk) {
    const int len = min(kChunk, kdim - k0);
    if (k0 > 0) __syncthreads();
    stage_weights<T, kTransposedW>(w, ldw, ncols, k0, len, WIDTH, ws);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < len; ++kk) {
      T a[RA], b[OB];
#pragma unroll
      for (int i = 0; i < RA; ++i) a[i] = a_row[i * TR * lda + k0 + kk];
#pragma unroll
      for (int j = 0; j < OB; ++j) b[j] = w_row[j * TO * kLdw + kk];
#pragma unroll
      for (int i = 0; i < RA; ++i)
#pragma unroll
        for (int j = 0; j < OB; ++j) acc[i][j] += a[i] * b[j];
    }
  }
  __syncthreads();  // outputs may overwrite columns other threads still read
#pragma unroll
  for (int i = 0; i < RA; ++i)
#pragma unroll
    for (int j = 0; j < OB; ++j) {
      const int r = tr + i * TR;
      const int n = to + j * TO;
      if (n < ncols && r < active_rows) out[r * lda + n] = acc[i][j];
    }
}

// A product with ncols <= WIDTH outputs into columns [0, ncols) of `out` (may be A).
template <typename T, typename Tl, bool kTransposedW>
__device__ void gemm_into_rows(const T* A, int lda, int a_col0, int kdim, const T* w, int64_t ldw, int ncols, T* ws,
                               int active_rows, T* out, GemmMode mode) {
  if (ncols <= kMaxInOut) {
    pair_gemm<T, Tl, kTransposedW>(A, lda, a_col0, kdim, w, ldw, ncols, ws, active_rows, StoreRows<T>{out, lda});
  } else {
    wide_gemm<T, Tl, kTransposedW>(A, lda, a_col0, kdim, w, ldw, ncols, ws, active_rows, out, mode);
  }
}

}  // namespace mainloop
}  // namespace cuda
}  // namespace torchjac
