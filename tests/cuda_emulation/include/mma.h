// Host emulation of the WMMA API (nvcuda::wmma) that csrc/cuda uses: TF32
// (m16n16k8) and BF16 (m16n16k16) fragments with FP32 accumulators.
//
// What is modelled:
// * A fragment holds num_elements values per thread, as on the device. Which
//   matrix element each (lane, i) holds is implementation-defined in CUDA; here
//   it is a random permutation per fragment kind, drawn from the run's fragment
//   seed (runtime.h), so a kernel that assumes a mapping gives different
//   results under two seeds. Element-wise operations on x[] are fine.
// * mma_sync is warp-collective: every lane of the warp must reach the same
//   call site; the last to arrive computes the warp's product from all lanes'
//   fragments, D = A B + C, each entry summed in k order in IEEE float.
//   TF32 inputs are truncated to their 10 mantissa bits, as the tensor cores
//   read them (round them first with __float_to_tf32).
// * load_matrix_sync/store_matrix_sync are warp-collective too, and check the
//   API's rules: the same pointer, ldm and layout in every lane, 256-bit aligned
//   pointers, ldm a multiple of 16 bytes.
// Not modelled: the hardware's accumulation order and rounding inside an MMA
// (docs/cuda.md states the error bounds with that margin).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace nvcuda {
namespace wmma {

struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
namespace precision {
struct tf32;
}
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <class Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
  static constexpr const char* name = "matrix_a";
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
  static constexpr const char* name = "matrix_b";
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
  static constexpr const char* name = "accumulator";
};

template <class T>
struct Element {
  using type = T;
  static float to_float(T v) { return static_cast<float>(v); }
};
template <>
struct Element<precision::tf32> {
  using type = float;
  // The tensor cores read the sign, the exponent and the top 10 mantissa bits.
  static float to_float(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0xffffe000u;
    std::memcpy(&v, &u, 4);
    return v;
  }
};
template <>
struct Element<__nv_bfloat16> {
  using type = __nv_bfloat16;
  static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <class T>
const char* type_name() {
  if (std::is_same<T, float>::value) return "float";
  if (std::is_same<T, precision::tf32>::value) return "tf32";
  if (std::is_same<T, __nv_bfloat16>::value) return "bf16";
  return "?";
}
template <class L>
const char* layout_name() {
  if (std::is_same<L, row_major>::value) return "row_major";
  if (std::is_same<L, col_major>::value) return "col_major";
  return "";
}

inline void check_pointer(const char* fn, const void* p, unsigned ldm, size_t elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    cuda_emu::device_fatal(std::string(fn) + ": the pointer is not 256-bit aligned");
  }
  if ((ldm * elem_bytes) % 16 != 0) {
    cuda_emu::device_fatal(std::string(fn) + ": ldm (" + std::to_string(ldm) + ") is not a multiple of 16 bytes");
  }
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
 public:
  using element_type = typename detail::Element<T>::type;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  element_type x[num_elements];

  // map()[lane * num_elements + i] = row * cols + col of the element (lane, i) holds, in this run's mapping.
  static const int* map() {
    static thread_local const int* table = nullptr;
    static thread_local uint64_t generation = ~uint64_t(0);
    const uint64_t g = cuda_emu::fragment_generation();
    if (g != generation) {
      static const std::string kind = std::string(detail::Shape<Use, M, N, K>::name) + "<" + std::to_string(M) + "," +
                                      std::to_string(N) + "," + std::to_string(K) + "," + detail::type_name<T>() +
                                      "," + detail::layout_name<Layout>() + ">";
      table = cuda_emu::fragment_map(kind.c_str(), rows * cols);
      generation = g;
    }
    return table;
  }
  static float value(element_type v) { return detail::Element<T>::to_float(v); }
};

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, typename fragment<Use, M, N, K, T, L>::element_type v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

namespace detail {

// One lane's part of a warp-wide load or store: its fragment and the arguments, which must agree across the warp.
template <class F, class P>
struct MoveLane {
  F* frag;
  P* ptr;
  unsigned ldm;
  bool row_major;
};

template <class F, class P, bool kLoad>
void warp_move(void* const* lanes) {
  const char* fn = kLoad ? "load_matrix_sync" : "store_matrix_sync";
  const auto* first = static_cast<const MoveLane<F, P>*>(lanes[0]);
  check_pointer(fn, first->ptr, first->ldm, sizeof(typename F::element_type));
  for (int lane = 0; lane < 32; ++lane) {
    const auto* l = static_cast<const MoveLane<F, P>*>(lanes[lane]);
    if (l->ptr != first->ptr || l->ldm != first->ldm || l->row_major != first->row_major) {
      cuda_emu::device_fatal(std::string(fn) + ": lanes of one warp pass different pointers, strides or layouts");
    }
    const int* m = F::map() + lane * F::num_elements;
    for (int i = 0; i < F::num_elements; ++i) {
      const int r = m[i] / F::cols, c = m[i] % F::cols;
      auto& element = first->row_major ? first->ptr[r * first->ldm + c] : first->ptr[c * first->ldm + r];
      if constexpr (kLoad) {
        l->frag->x[i] = element;
      } else {
        element = l->frag->x[i];
      }
    }
  }
}

template <bool kLoad, class F, class P>
void move(F& f, P* p, unsigned ldm, bool row_major, const char* file, int line) {
  MoveLane<F, P> me{&f, p, ldm, row_major};
  cuda_emu::warp_collective(file, line, &me, &warp_move<F, P, kLoad>);
}

}  // namespace detail

// matrix_a / matrix_b: the layout is the fragment's.
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f,
                             const typename fragment<Use, M, N, K, T, L>::element_type* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same<L, void>::value, "an accumulator load needs a layout_t");
  detail::move<true>(f, p, ldm, std::is_same<L, row_major>::value, file, line);
}

template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::move<true>(f, p, ldm, layout == mem_row_major, file, line);
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::move<false>(const_cast<fragment<accumulator, M, N, K, T>&>(f), p, ldm, layout == mem_row_major, file, line);
}

namespace detail {

template <class D, class A, class B, class C>
struct MmaLane {
  D* d;
  const A* a;
  const B* b;
  const C* c;
};

// The warp's product, run once by the last lane to arrive, from all 32 lanes' fragments.
template <class D, class A, class B, class C>
void warp_mma(void* const* lanes) {
  constexpr int M = A::rows, K = A::cols, N = B::cols;
  float a[M * K], b[K * N], acc[M * N];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* l = static_cast<const MmaLane<D, A, B, C>*>(lanes[lane]);
    const int* am = A::map() + lane * A::num_elements;
    const int* bm = B::map() + lane * B::num_elements;
    const int* cm = C::map() + lane * C::num_elements;
    for (int i = 0; i < A::num_elements; ++i) a[am[i]] = A::value(l->a->x[i]);
    for (int i = 0; i < B::num_elements; ++i) b[bm[i]] = B::value(l->b->x[i]);
    for (int i = 0; i < C::num_elements; ++i) acc[cm[i]] = l->c->x[i];
  }
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) {
      float s = acc[r * N + n];
      for (int k = 0; k < K; ++k) s += a[r * K + k] * b[k * N + n];
      acc[r * N + n] = s;
    }
  for (int lane = 0; lane < 32; ++lane) {
    const auto* l = static_cast<const MmaLane<D, A, B, C>*>(lanes[lane]);
    const int* dm = D::map() + lane * D::num_elements;
    for (int i = 0; i < D::num_elements; ++i) l->d->x[i] = acc[dm[i]];
  }
}

}  // namespace detail

template <int M, int N, int K, class TA, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using D = fragment<accumulator, M, N, K, float>;
  using A = fragment<matrix_a, M, N, K, TA, LA>;
  using B = fragment<matrix_b, M, N, K, TA, LB>;
  detail::MmaLane<D, A, B, D> me{&d, &a, &b, &c};
  cuda_emu::warp_collective(file, line, &me, &detail::warp_mma<D, A, B, D>);
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {
    u = (u + 0x1000u) & 0xffffe000u;
  } else if ((u & 0x7fffffu) != 0) {
    u |= 0x400000u;  // a NaN stays a quiet NaN
  }
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace wmma
}  // namespace nvcuda
