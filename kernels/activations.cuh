// jacgrad activations: forward f(h), derivative df(h) and, where it is an exact function of
// the output, df_y(y) = phi'(h) written in terms of y = phi(h).
//
// This header is the one place the GPU's activation math lives. It is compiled three ways:
//   * by NVRTC, through CuPy's RawModule (jacgrad/cuda/kernels.py inlines it into the .cu sources);
//   * by nvcc, for sm_90 in CI (tests/test_kernels_host.py);
//   * by g++ and by nvcc as *host* code, in a test driver whose output is compared with the
//     NumPy table in jacgrad/elementwise/activations.py on a grid with 0, +-tiny, +-large and +-inf.
// So the formulas here mirror jacgrad/elementwise/activations.py operation for operation: change one, change
// both, and the host test says whether they still agree.
//
// Every functor is a struct with static templates f, df (and df_y when has_df_y) over T = float
// or double; float math stays float (expf, ...), so a float kernel never widens to double.
// Each takes its parameters as a Params<T>{a, b} (the kernels' last two arguments, so one compiled
// kernel serves every parameter value); its default is torch's default, and the rows without
// parameters ignore it. Kink conventions are PyTorch autograd's: relu'(0) = 0,
// leaky_relu'(0) = negative_slope, hard_tanh'(min_val) = hard_tanh'(max_val) = 0, elu'(0) = alpha.
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

// The parameters of a parameterised activation (which is which: see each functor); the numbers
// jacgrad/elementwise/activations.py calls Activation.kernel_args.
template <class T> struct Params {
  T a, b;
};

struct Identity {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h, Params<T> = {}) { return h; }
  template <class T> JG_HD static T df(T, Params<T> = {}) { return T(1); }
  template <class T> JG_HD static T df_y(T, Params<T> = {}) { return T(1); }
};

struct Relu {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h, Params<T> = {}) { return math::max0(h); }
  template <class T> JG_HD static T df(T h, Params<T> = {}) { return h > T(0) ? T(1) : T(0); }
  template <class T> JG_HD static T df_y(T y, Params<T> = {}) { return y > T(0) ? T(1) : T(0); }
};

struct LeakyRelu {  // a = negative_slope (> 0), torch's default 0.01
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static Params<T> defaults() { return {T(0.01), T(0)}; }
  template <class T> JG_HD static T f(T h, Params<T> p = defaults<T>()) { return h > T(0) ? h : p.a * h; }
  template <class T> JG_HD static T df(T h, Params<T> p = defaults<T>()) { return h > T(0) ? T(1) : p.a; }
  template <class T> JG_HD static T df_y(T y, Params<T> p = defaults<T>()) { return y > T(0) ? T(1) : p.a; }
};

struct Sigmoid {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    T s, q;
    math::logistic(h, s, q);
    return s;
  }
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    T s, q;
    math::logistic(h, s, q);
    return q;
  }
  template <class T> JG_HD static T df_y(T y, Params<T> = {}) { return y * (T(1) - y); }
};

struct Tanh {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h, Params<T> = {}) { return math::tanh_(h); }
  // 1 - tanh^2 = 4e / (1 + e)^2 with e = exp(-2|h|): no cancellation, no overflow.
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    T e = math::exp_(T(-2) * math::abs_(h));
    return T(4) * e / ((T(1) + e) * (T(1) + e));
  }
  template <class T> JG_HD static T df_y(T y, Params<T> = {}) { return (T(1) - y) * (T(1) + y); }
};

// torch's Softplus(beta, threshold): a = beta (> 0), b = threshold; h where beta h > threshold,
// else log(1 + exp(beta h)) / beta, computed without overflow.
struct Softplus {
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static Params<T> defaults() { return {T(1), T(20)}; }
  template <class T> JG_HD static T f(T h, Params<T> p = defaults<T>()) {
    const T bh = p.a * h;
    if (bh > p.b) return h;
    return (math::max0(bh) + math::log1p_(math::exp_(-math::abs_(bh)))) / p.a;
  }
  template <class T> JG_HD static T df(T h, Params<T> p = defaults<T>()) {
    const T bh = p.a * h;
    return bh > p.b ? T(1) : Sigmoid::f(bh);
  }
};

struct Elu {  // a = alpha (>= 0), torch's default 1: alpha (e^h - 1) for h <= 0
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static Params<T> defaults() { return {T(1), T(0)}; }
  template <class T> JG_HD static T f(T h, Params<T> p = defaults<T>()) {
    return h > T(0) ? h : p.a * math::expm1_(h);
  }
  template <class T> JG_HD static T df(T h, Params<T> p = defaults<T>()) {
    return h > T(0) ? T(1) : p.a * math::exp_(h);
  }
  template <class T> JG_HD static T df_y(T y, Params<T> p = defaults<T>()) { return y > T(0) ? T(1) : y + p.a; }
};

// Phi(h) = erfc(-h / sqrt 2) / 2: erfc keeps the left tail accurate where 1 + erf cancels.
template <class T> JG_HD inline T normal_cdf(T h) {
  return T(0.5) * math::erfc_(h * T(-0.7071067811865476));
}

struct Gelu {  // h * Phi(h), torch's approximate='none'
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    return math::at_least(h, -math::saturation<T>()) * normal_cdf(h);
  }
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
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
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    T c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    T s, q;
    math::logistic(T(2) * inner(c), s, q);
    return math::at_least(h, -math::saturation<T>()) * s;
  }
  // sigma(2u) + h * 2 sigma(2u) sigma(-2u) * du/dh
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    T c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    T s, q;
    math::logistic(T(2) * inner(c), s, q);
    T du = T(0.7978845608028654) * (T(1) + T(3 * 0.044715) * (c * c));
    return s + T(2) * c * q * du;
  }
};

struct Silu {  // h * sigma(h)
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    T s, q;
    math::logistic(h, s, q);
    return math::at_least(h, -math::saturation<T>()) * s;
  }
  // sigma(h) + h sigma(h) sigma(-h)
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    T c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    T s, q;
    math::logistic(h, s, q);
    return s + c * q;
  }
};

struct HardTanh {  // clip to [a, b] = [min_val, max_val], torch's default [-1, 1]
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static Params<T> defaults() { return {T(-1), T(1)}; }
  template <class T> JG_HD static T f(T h, Params<T> p = defaults<T>()) { return math::clamp(h, p.a, p.b); }
  template <class T> JG_HD static T df(T h, Params<T> p = defaults<T>()) {
    return (h > p.a && h < p.b) ? T(1) : T(0);
  }
  template <class T> JG_HD static T df_y(T y, Params<T> p = defaults<T>()) {
    return (y > p.a && y < p.b) ? T(1) : T(0);
  }
};

// torch's Mish: h tanh(softplus(h)). t = tanh(softplus(c)) with e = exp(-|c|): for c <= 0,
// n = e (e + 2), t = n / (n + 2); for c > 0, t = (1 + 2e) / (1 + 2e + 2e^2); 1 - t without cancelling.
struct Mish {
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static void parts(T h, T& c, T& t, T& omt) {
    c = math::clamp(h, -math::saturation<T>(), math::saturation<T>());
    const T e = math::exp_(-math::abs_(c));
    const bool neg = c <= T(0);
    const T num = neg ? e * (e + T(2)) : T(1) + T(2) * e;
    const T rest = neg ? T(2) : T(2) * (e * e);
    const T den = num + rest;
    t = num / den;
    omt = rest / den;
  }
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    T c, t, omt;
    parts(h, c, t, omt);
    return math::at_least(h, -math::saturation<T>()) * t;
  }
  // tanh(sp) + h sigma(h) sech^2(sp), sech^2 = (1 - t)(1 + t)
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    T c, t, omt, s, q;
    parts(h, c, t, omt);
    math::logistic(c, s, q);
    return t + c * s * (omt * (T(1) + t));
  }
};

// torch's SELU: scale h for h > 0, scale alpha (e^h - 1) below; selu'(0) = scale alpha.
struct Selu {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T scale() { return T(1.0507009873554804934193349852946); }
  template <class T> JG_HD static T scale_alpha() {
    return T(1.0507009873554804934193349852946 * 1.6732632423543772848170429916717);
  }
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    return h > T(0) ? scale<T>() * h : scale_alpha<T>() * math::expm1_(h);
  }
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    return h > T(0) ? scale<T>() : scale_alpha<T>() * math::exp_(h);
  }
  template <class T> JG_HD static T df_y(T y, Params<T> = {}) { return y > T(0) ? scale<T>() : y + scale_alpha<T>(); }
};

// torch's Hardswish: h clip(h + 3, 0, 6) / 6 (h clamped below: -inf * 0 stays 0); its derivative
// 0 up to -3, h/3 + 1/2 strictly inside (-3, 3), 1 from 3 on (torch's values at the kinks: 0 and 1).
struct HardSwish {
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    return math::at_least(h, -math::saturation<T>()) * math::clamp(h + T(3), T(0), T(6)) / T(6);
  }
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    return h <= T(-3) ? T(0) : (h < T(3) ? h / T(3) + T(0.5) : T(1));
  }
};

// torch's Hardsigmoid: clip(h + 3, 0, 6) / 6; derivative 1/6 strictly inside (-3, 3), else 0.
struct HardSigmoid {  // no df_y: y rounds to 1 for h within 2 ulp below 3, where phi' is 1/6
  static constexpr bool has_df_y = false;
  template <class T> JG_HD static T f(T h, Params<T> = {}) { return math::clamp(h + T(3), T(0), T(6)) / T(6); }
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    return (h > T(-3) && h < T(3)) ? T(1.0 / 6.0) : T(0);
  }
};

// h / (1 + |h|), h clamped to +-2^60 (where 1 + |h| == |h|: exactly +-1, and no inf / inf).
struct Softsign {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    const T c = math::clamp(h, T(-1.152921504606846976e18), T(1.152921504606846976e18));
    return c / (T(1) + math::abs_(c));
  }
  template <class T> JG_HD static T df(T h, Params<T> = {}) {
    const T r = T(1) / (T(1) + math::abs_(h));
    return r * r;
  }
  template <class T> JG_HD static T df_y(T y, Params<T> = {}) {
    const T r = T(1) - math::abs_(y);
    return r * r;
  }
};

// torch's LogSigmoid: min(h, 0) - log1p(exp(-|h|)); derivative sigma(-h) = 1 - e^y.
struct LogSigmoid {
  static constexpr bool has_df_y = true;
  template <class T> JG_HD static T f(T h, Params<T> = {}) {
    return (h > T(0) ? T(0) : h) - math::log1p_(math::exp_(-math::abs_(h)));
  }
  template <class T> JG_HD static T df(T h, Params<T> = {}) { return Sigmoid::f(-h); }
  template <class T> JG_HD static T df_y(T y, Params<T> = {}) { return -math::expm1_(y > T(0) ? T(0) : y); }
};

// phi'(x): from the pre-activation (FROM_OUTPUT = false) or from the output y (true).
template <class Act, bool FROM_OUTPUT, class T> JG_HD inline T derivative(T x, Params<T> p) {
  if constexpr (FROM_OUTPUT) {
    static_assert(Act::has_df_y, "this activation's derivative is not a function of its output");
    return Act::template df_y<T>(x, p);
  } else {
    return Act::template df<T>(x, p);
  }
}

// The same with the functor's default parameters (torch's defaults).
template <class Act, bool FROM_OUTPUT, class T> JG_HD inline T derivative(T x) {
  if constexpr (FROM_OUTPUT) {
    static_assert(Act::has_df_y, "this activation's derivative is not a function of its output");
    return Act::template df_y<T>(x);
  } else {
    return Act::template df<T>(x);
  }
}

}  // namespace jacgrad
