// Device-side activation math: value, first and second derivative of every
// activation code. This is the only C++/CUDA copy of these formulas; the
// Python copy is torchjac/activations.py and the codes must stay equal.
//
// Derivatives at kinks follow PyTorch's autograd: ReLU'(0) = 0,
// LeakyReLU'(0) = slope, ELU'(0) = alpha but ELU''(0) = 0, Softplus is the
// identity when beta * z > threshold and Softplus'' = 0 already when
// beta * z >= threshold. As in activations.py, a NaN z gives a NaN value and
// NaN derivatives (ReLU and LeakyReLU included). The second derivative is for
// the backward kernels. tests/test_cuda_emulation.py holds both copies equal.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define TORCHJAC_HD __host__ __device__ __forceinline__
#else
#define TORCHJAC_HD inline
#endif

namespace torchjac {
namespace act {

enum Code : int {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,  // p0 = negative slope
  kSoftplus = 3,   // p0 = beta, p1 = threshold
  kSilu = 4,
  kGelu = 5,       // exact, with erf
  kGeluTanh = 6,   // approximate="tanh"
  kTanh = 7,
  kSigmoid = 8,
  kElu = 9,        // p0 = alpha
  kSine = 10,      // p0 = w0
};
constexpr int kNumCodes = 11;

// Overloads that pick the float or double libm function explicitly, so a
// float activation never silently runs in double (or the reverse).
TORCHJAC_HD float exp_(float v) { return expf(v); }
TORCHJAC_HD double exp_(double v) { return exp(v); }
TORCHJAC_HD float expm1_(float v) { return expm1f(v); }
TORCHJAC_HD double expm1_(double v) { return expm1(v); }
TORCHJAC_HD float log1p_(float v) { return log1pf(v); }
TORCHJAC_HD double log1p_(double v) { return log1p(v); }
TORCHJAC_HD float tanh_(float v) { return tanhf(v); }
TORCHJAC_HD double tanh_(double v) { return tanh(v); }
TORCHJAC_HD float erf_(float v) { return erff(v); }
TORCHJAC_HD double erf_(double v) { return erf(v); }
// One argument reduction for both sin and cos on the device.
TORCHJAC_HD void sincos_(float v, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(v, s, c);
#else
  *s = sinf(v);
  *c = cosf(v);
#endif
}
TORCHJAC_HD void sincos_(double v, double* s, double* c) {
#if defined(__CUDA_ARCH__)
  sincos(v, s, c);
#else
  *s = sin(v);
  *c = cos(v);
#endif
}

template <typename T>
struct Derivatives {
  T value;
  T d1;  // d value / dz
  T d2;  // d^2 value / dz^2
};

template <typename T>
TORCHJAC_HD T sigmoid(T z) {
  return T(1) / (T(1) + exp_(-z));
}

// All three quantities of activation `code` at z. Callers that need only some
// of them rely on inlining to drop the rest.
template <typename T>
TORCHJAC_HD Derivatives<T> evaluate(int code, T p0, T p1, T z) {
  // sqrt(2/pi), 1/sqrt(2), 1/sqrt(2*pi) and the GELU-tanh cubic coefficient.
  const T kSqrt2OverPi = T(0.79788456080286535588);
  const T kInvSqrt2 = T(0.70710678118654752440);
  const T kInvSqrt2Pi = T(0.39894228040143267794);
  const T kGeluTanhC = T(0.044715);
  switch (code) {
    case kIdentity:
      return {z, T(1), T(0)};
    // The comparisons are written so that a NaN z falls through to z itself.
    case kRelu:
      return {z <= T(0) ? T(0) : z, z > T(0) ? T(1) : (z <= T(0) ? T(0) : z), T(0)};
    case kLeakyRelu:
      return {z > T(0) ? z : z * p0, z > T(0) ? T(1) : (z <= T(0) ? p0 : z), T(0)};
    case kSoftplus: {
      const T bz = z * p0;
      if (bz > p1) return {z, T(1), T(0)};
      const T s = sigmoid(bz);
      // At bz == threshold PyTorch's gradient is already the identity's: Softplus'' = 0.
      return {log1p_(exp_(bz)) / p0, s, bz >= p1 ? T(0) : p0 * s * (T(1) - s)};
    }
    case kSilu: {
      const T s = sigmoid(z);
      return {z * s, s * (T(1) + z * (T(1) - s)), s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s))};
    }
    case kGelu: {
      const T cdf = T(0.5) * (T(1) + erf_(z * kInvSqrt2));
      const T pdf = kInvSqrt2Pi * exp_(T(-0.5) * z * z);
      return {z * cdf, cdf + z * pdf, pdf * (T(2) - z * z)};
    }
    case kGeluTanh: {
      const T u = kSqrt2OverPi * (z + kGeluTanhC * z * z * z);
      const T du = kSqrt2OverPi * (T(1) + T(3) * kGeluTanhC * z * z);
      const T ddu = kSqrt2OverPi * T(6) * kGeluTanhC * z;
      const T t = tanh_(u);
      const T sech2 = T(1) - t * t;
      return {T(0.5) * z * (T(1) + t), T(0.5) * (T(1) + t) + T(0.5) * z * sech2 * du,
              sech2 * (du - z * t * du * du + T(0.5) * z * ddu)};
    }
    case kTanh: {
      const T t = tanh_(z);
      return {t, T(1) - t * t, T(-2) * t * (T(1) - t * t)};
    }
    case kSigmoid: {
      const T s = sigmoid(z);
      return {s, s * (T(1) - s), s * (T(1) - s) * (T(1) - T(2) * s)};
    }
    case kElu: {
      if (z > T(0)) return {z, T(1), T(0)};
      const T e = p0 * exp_(z);
      return {p0 * expm1_(z), e, z >= T(0) ? T(0) : e};  // ELU''(0) = 0, as PyTorch's autograd
    }
    case kSine: {
      T s, c;
      sincos_(p0 * z, &s, &c);
      return {s, p0 * c, -p0 * p0 * s};
    }
    default: {
      // Unknown codes are rejected on the host; NaN makes a slip visible.
      const T nan = T(NAN);
      return {nan, nan, nan};
    }
  }
}

template <typename T>
TORCHJAC_HD T value(int code, T p0, T p1, T z) {
  return evaluate(code, p0, p1, z).value;
}

template <typename T>
TORCHJAC_HD T derivative(int code, T p0, T p1, T z) {
  return evaluate(code, p0, p1, z).d1;
}

template <typename T>
TORCHJAC_HD T second_derivative(int code, T p0, T p1, T z) {
  return evaluate(code, p0, p1, z).d2;
}

}  // namespace act
}  // namespace torchjac
