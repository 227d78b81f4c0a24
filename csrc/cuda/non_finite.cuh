// The non-finite point rule of torchjac/reference.py (non_finite_points), for
// the forward and backward kernels: a point whose x or cond entries are not all
// finite gets NaN derivatives. The term is 0 or NaN and is added to the first
// layer's activation slope, exactly as the reference adds it.
#pragma once

namespace torchjac {
namespace cuda {

// 0 when v[0 .. n) are all finite, NaN otherwise (inf - inf and NaN - NaN are NaN).
template <typename T>
__host__ __device__ inline T non_finite_sum(const T* v, int n) {
  T sum = T(0);
  for (int j = 0; j < n; ++j) sum += v[j] - v[j];
  return sum;
}

}  // namespace cuda
}  // namespace torchjac
