// jacgrad activations: forward f(h), derivative df(h) and, where it is an exact function of
// the output, df_y(y) = phi'(h) written in terms of y = phi(h).
//
// This header is the one place the GPU's activation math lives. It is compiled three ways:
//   * by NVRTC, through CuPy's RawModule (jacgrad/kernels.py inlines it into the .cu sources);
//   * by nvcc, for sm_90 in CI (tests/test_kernels_host.py);
//   * by g++ and by nvcc as *host* code, in a test driver whose output is compared with the
//     NumPy table in jacgrad/activations.py on a grid with 0, +-tiny, +-large and +-inf.
// So the formulas here mirror jacgrad/activations.py operation for operation: change one, change
// both, and the host test says whether they still agree.
//
// Every functor is a struct with static templates f, df (and df_y when has_df_y) over T = float
// or double; float math stays float (expf, ...), so a float kernel never widens to double.
// Kink conventions are PyTorch autograd's: relu'(0) = 0, leaky_relu'(0) = 0.01,
// hard_tanh'(+-1) = 0, elu'(0) = 1.
#pragma once

#if defined(__CUDACC__)
#define JG_HD __host__ __device__
#else
#define JG_HD
#endif

// NVRTC has the CUDA math functions built in and no system headers.
#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace jacgrad {
namespace math {

// Overloads that pick the float or double libm/CUDA function for T.
JG_HD inline float abs_(float x) { return fabsf(x); }
JG_HD inline double abs_(double x) { return fabs(x); }
JG_HD inline float exp_(float x) { return expf(x); }
JG_HD inline double exp_(double x) { return exp(x); }
JG_HD inline float expm1_(float x) { return expm1f(x); }
JG_HD inline double expm1_(double x) { return expm1(x); }
JG_HD inline float log1p_(float x) { return log1pf(x); }
JG_HD inline double log1p_(double x) { return log1p(x); }
JG_HD inline float tanh_(float x) { return tanhf(x); }
JG_HD inline double tanh_(double x) { return tanh(x); }
JG_HD inline float erfc_(float x) { return erfcf(x); }
JG_HD inline double erfc_(double x) { return erfc(x); }
JG_HD inline float erf_(float x) { return erff(x); }
JG_HD inline double erf_(double x) { return erf(x); }

// Comparisons written so that NaN falls through to the argument (NaN propagates like NumPy's
// minimum/maximum/clip), unlike fmin/fmax which drop it.
template <class T> JG_HD inline T max0(T x) { return x < T(0) ? T(0) : x; }
template <class T> JG_HD inline T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
template <class T> JG_HD inline T at_least(T x, T lo) { return x < lo ? lo : x; }

// |h| beyond which every smooth activation here has saturated exactly (sigma, Phi, exp(-h^2/2)
// are 0 or 1 in float and double). Clamping to it is exact and keeps +-inf * 0 from becoming NaN
// and x^3 from overflowing.
template <class T> JG_HD inline T saturation() { return T(1e5); }

// sigma(t) and sigma(t) * sigma(-t) from one exp(-|t|), without overflow for any t.
template <class T> JG_HD inline void logistic(T t, T& s, T& q) {
  T e = exp_(-abs_(t));
  T s1 = T(1) / (T(1) + e);
  s = t >= T(0) ? s1 : e * s1;
  q = e * s1 * s1;
}

}  // namespace math

struct Identity {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h) { return h; }
  template <class T> JG_HD static T df(T) { return T(1); }
  template <class T> JG_HD static T df_y(T) { return T(1); }
};

struct Relu {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h) { return math::max0(h); }
  template <class T> JG_HD static T df(T h) { return h > T(0) ? T(1) : T(0); }
  template <class T> JG_HD static T df_y(T y) { return y > T(0) ? T(1) : T(0); }
};

struct LeakyRelu {  // negative slope 0.01, torch's default
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h) { return h > T(0) ? h : T(0.01) * h; }
  template <class T> JG_HD static T df(T h) { return h > T(0) ? T(1) : T(0.01); }
  template <class T> JG_HD static T df_y(T y) { return y > T(0) ? T(1) : T(0.01); }
};

struct Sigmoid {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h) {
    T s, q;
    math::logistic(h, s, q);
    return s;
  }
  template <class T> JG_HD static T df(T h) {
    T s, q;
    math::logistic(h, s, q);
    return q;
  }
  template <class T> JG_HD static T df_y(T y) { return y * (T(1) - y); }
};

struct Tanh {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h) { return math::tanh_(h); }
  // 1 - tanh^2 = 4e / (1 + e)^2 with e = exp(-2|h|): no cancellation, no overflow.
  template <class T> JG_HD static T df(T h) {
    T e = math::exp_(T(-2) * math::abs_(h));
    return T(4) * e / ((T(1) + e) * (T(1) + e));
  }
  template <class T> JG_HD static T df_y(T y) { return (T(1) - y) * (T(1) + y); }
};

struct Softplus {  // beta = 1
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T f(T h) {
    return math::max0(h) + math::log1p_(math::exp_(-math::abs_(h)));
  }
  template <class T> JG_HD static T df(T h) { return Sigmoid::f(h); }
};

struct Elu {  // alpha = 1
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h) { return h > T(0) ? h : math::expm1_(h); }
  template <class T> JG_HD static T df(T h) { return h > T(0) ? T(1) : math::exp_(h); }
  template <class T> JG_HD static T df_y(T y) { return y > T(0) ? T(1) : y + T(1); }
};

// Phi(h) = erfc(-h / sqrt 2) / 2: erfc keeps the left tail accurate where 1 + erf cancels.
template <class T> JG_HD inline T normal_cdf(T h) {
  return T(0.5) * math::erfc_(h * T(-0.7071067811865476));
}

struct Gelu {  // h * Phi(h), torch's approximate='none'
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T f(T h) {
    return math::at_least(h, -math::saturation<T>()) * normal_cdf(h);
  }
  template <class T> JG_HD static T df(T h) {
    T c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    T pdf = T(0.3989422804014327) * math::exp_(T(-0.5) * c * c);
    return normal_cdf(h) + c * pdf;
  }
};

// torch's approximate='tanh': h/2 (1 + tanh u) = h sigma(2u), u = sqrt(2/pi) (h + 0.044715 h^3).
struct GeluTanh {
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T inner(T c) {
    return T(0.7978845608028654) * (c + T(0.044715) * (c * c * c));
  }
  template <class T> JG_HD static T f(T h) {
    T c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    T s, q;
    math::logistic(T(2) * inner(c), s, q);
    return math::at_least(h, -math::saturation<T>()) * s;
  }
  // sigma(2u) + h * 2 sigma(2u) sigma(-2u) * du/dh
  template <class T> JG_HD static T df(T h) {
    T c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    T s, q;
    math::logistic(T(2) * inner(c), s, q);
    T du = T(0.7978845608028654) * (T(1) + T(3 * 0.044715) * (c * c));
    return s + T(2) * c * q * du;
  }
};

struct Silu {  // h * sigma(h)
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T f(T h) {
    T s, q;
    math::logistic(h, s, q);
    return math::at_least(h, -math::saturation<T>()) * s;
  }
  // sigma(h) + h sigma(h) sigma(-h)
  template <class T> JG_HD static T df(T h) {
    T c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    T s, q;
    math::logistic(h, s, q);
    return s + c * q;
  }
};

struct HardTanh {  // clip to [-1, 1]
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h) { return math::clamp(h, T(-1), T(1)); }
  template <class T> JG_HD static T df(T h) { return (h > T(-1) && h < T(1)) ? T(1) : T(0); }
  template <class T> JG_HD static T df_y(T y) { return (y > T(-1) && y < T(1)) ? T(1) : T(0); }
};

// phi'(x): from the pre-activation (FROM_OUTPUT = false) or from the output y (true).
template <class Act, bool FROM_OUTPUT, class T> JG_HD inline T derivative(T x) {
  if constexpr (FROM_OUTPUT) {
    static_assert(Act::has_df_y, "this activation's derivative is not a function of its output");
    return Act::template df_y<T>(x);
  } else {
    return Act::template df<T>(x);
  }
}

}  // namespace jacgrad
