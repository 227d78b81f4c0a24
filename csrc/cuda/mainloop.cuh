// The layer products of the forward and backward kernels (the mainloop of a
// fused MLP layer): a tile of rows in shared memory times a weight matrix that
// is staged through shared memory in chunks of kChunk, by the 256 threads of a
// block. The tiling (rows per thread, outputs per thread) is a template
// parameter Tl with kRowsPerThread, kOutPerThread, kRowThreads, kColThreads and
// kPairsPerThread; each kernel has its own.
#pragma once

#include <cstdint>

#include "mlp_forward.cuh"

namespace torchjac {
namespace cuda {
namespace mainloop {

constexpr int kThreads = 256;
constexpr int kChunk = 32;        // weight rows or columns staged per step
constexpr int kLdw = kChunk + 1;  // odd row stride: conflict-free smem reads

// ws[n * kLdw + c] = B(k0 + c, n) for n < staged, zero where n >= n_count or c >= len;
// B(k, n) = w[n * ldw + k] (kTransposedW) or w[k * ldw + n]. Global reads are coalesced either way.
template <typename T, bool kTransposedW>
__device__ void stage_weights(const T* w, int64_t ldw, int n_count, int k0, int len, int staged, T* ws) {
  if (kTransposedW) {
    for (int e = threadIdx.x; e < staged * kChunk; e += kThreads) {
      const int n = e / kChunk;
      const int c = e - n * kChunk;
      ws[n * kLdw + c] = (n < n_count && c < len) ? __ldg(w + n * ldw + k0 + c) : T(0);
    }
  } else {
    for (int e = threadIdx.x; e < staged * kChunk; e += kThreads) {
      const int c = e / staged;
      const int n = e - c * staged;
      ws[n * kLdw + c] = (n < n_count && c < len) ? __ldg(w + (k0 + c) * ldw + n) : T(0);
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

// kMaxInOut < ncols <= WIDTH (hidden layers): a register tile. Thread (tr, to)
// owns rows tr + i * kRowThreads and outputs to + j * kColThreads, strided so that
// a warp reads distinct banks.
template <typename T, typename Tl, bool kTransposedW>
__device__ void wide_gemm(const T* A, int lda, int a_col0, int kdim, const T* w, int64_t ldw, int ncols, T* ws,
                          int active_rows, T* out) {
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
                               int active_rows, T* out) {
  if (ncols <= kMaxInOut) {
    pair_gemm<T, Tl, kTransposedW>(A, lda, a_col0, kdim, w, ldw, ncols, ws, active_rows, StoreRows<T>{out, lda});
  } else {
    wide_gemm<T, Tl, kTransposedW>(A, lda, a_col0, kdim, w, ldw, ncols, ws, active_rows, out);
  }
}

}  // namespace mainloop
}  // namespace cuda
}  // namespace torchjac
