// Attention's softmax on rows, written once for the device and the host:
//   * the forward (forward_block): P = softmax(scale * S) over the keys, the causal mask (key
//     j > query i) and a key-padding mask applied on the way, a row with every key masked all 0;
//   * the Jacobian's product (jvp_block): for each row p of P and row v of a tangent or cotangent,
//       out = (diag(p) - p p^T) v = p * (v - sum(p * v))
//     (the matrix is symmetric: the JVP and the VJP are the same map).
// kernels/softmax.cu wraps both in __global__ kernels; tests/norm_host_kernels.py builds them with
// g++ and nvcc (host code) and runs every thread of a grid on host threads against float64 NumPy
// (tests/test_kernels_softmax_host.py, tests/test_kernels_softmax_forward_host.py).
// jacgrad/tokens/attention_factor.py (attention_weights, _softmax_jvp) is the NumPy reference and
// the caller.
//
// The row machinery is kernels/rows.cuh's (shared with the norm kernels): one group of threads per
// row (a whole block, or 1..16 lanes of a warp for short rows), warp-shuffle sums, 16-byte packs
// when every row is aligned.
// Traffic: a row that fits its threads' registers (norm::row_fits) is read once, so the kernel moves
// read p, read v, write out = 3 values per element (the unfused expression, v -= (p*v).sum(-1),
// v *= p, moves 7 and launches 3 kernels); longer rows read p and v once more in the second pass.
//
// out may be v (in place): every element is read by the thread that writes it, and the first pass
// (all reads of the row) ends at the group's sum, before any write.
#pragma once

#include "activations.cuh"
#include "rows.cuh"

namespace jacgrad {
namespace softmax {

using norm::ld;
using norm::st;
using norm::Vec;

// Row r of v (rows, n) with row p_row(r) of p; out (rows, n). p broadcasts over one run of v's
// leading axes: v's rows are (outer, rep, inner) and p's (outer, inner), span = rep * inner
// (rep = 1: p has v's rows). One 64-bit division and modulo per row, none per element.
JG_HD JG_INLINE long long p_row(long long r, long long inner, long long span) {
  return span == inner ? r : (r / span) * inner + r % inner;
}

template <class T, int W, class Block>
JG_HD void jvp_cached(const Block& b, long long block, long long grid, const T* p, const T* v, T* out, int n,
                      long long rows, long long inner, long long span) {
  constexpr int S = norm::RowCache<T>::elems / W;
  for (long long r = block; r < rows; r += grid) {
    const T* pr = p + p_row(r, inner, span) * n;
    const T* vr = v + r * n;
    Vec<T, W> cp[S] = {}, cv[S] = {};
    T s[1] = {T(0)};
    norm::row_slots<W, S>(b, n, [&](int k, int i) {
      cp[k] = ld<W>(pr + i);
      cv[k] = ld<W>(vr + i);
      for (int e = 0; e < W; ++e) s[0] += cp[k].e[e] * cv[k].e[e];
    });
    b.sum(s);
    norm::row_slots<W, S>(b, n, [&](int k, int i) {
      Vec<T, W> o;
      for (int e = 0; e < W; ++e) o.e[e] = cp[k].e[e] * (cv[k].e[e] - s[0]);
      st<W>(out + r * n + i, o);
    });
  }
}

template <class T, class Block>
JG_HD void jvp_block(const Block& b, long long block, long long grid, const T* p, const T* v, T* out, int n,
                     long long rows, long long inner, long long span) {
  const bool packed = norm::rows_packed<T>(n, p, v, out, p, v);
  if (norm::row_fits<T>(n, b.size)) {
    if (packed)
      jvp_cached<T, ew::Pack<T>::size>(b, block, grid, p, v, out, n, rows, inner, span);
    else
      jvp_cached<T, 1>(b, block, grid, p, v, out, n, rows, inner, span);
    return;
  }
  // streamed (rows longer than the registers hold): p and v read in each pass
  for (long long r = block; r < rows; r += grid) {
    const T* pr = p + p_row(r, inner, span) * n;
    const T* vr = v + r * n;
    T s[1] = {T(0)};
    norm::row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      const Vec<T, W> a = ld<W>(pr + i), c = ld<W>(vr + i);
      for (int e = 0; e < W; ++e) s[0] += a.e[e] * c.e[e];
    });
    b.sum(s);
    norm::row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      const Vec<T, W> a = ld<W>(pr + i), c = ld<W>(vr + i);
      Vec<T, W> o;
      for (int e = 0; e < W; ++e) o.e[e] = a.e[e] * (c.e[e] - s[0]);
      st<W>(out + r * n + i, o);
    });
  }
}

// ---- forward: P = softmax(scale * S) over the last axis, masked keys 0 -----------------------
// Traffic: a row that fits its threads' registers is read once and written once (2 values per
// element; the array expression it replaces, S *= scale, where(mask), max, subtract, exp, sum,
// divide and the masked rows' guards, moves ~11 and launches 6 to 12 kernels, 3 more for the mask
// array); longer rows read S three times (the max, the sum, the write). The formula is attention_weights' on NumPy, step for
// step: x = scale * s, masked x = -inf; m = max(x) (NaN kept), m = 0 where not finite (a row of
// -inf: exp gives zeros, not NaN); e = exp(x - m); d = sum(e), d = 1 where not > 0; p = e / d.

// -inf (NVRTC has no INFINITY, no builtins for it: the device takes the bits).
template <class T> JG_HD JG_INLINE T neg_inf();
template <> JG_HD JG_INLINE float neg_inf<float>() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0xff800000);
#else
  return -__builtin_huge_valf();
#endif
}
template <> JG_HD JG_INLINE double neg_inf<double>() {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(0xfff0000000000000ULL);
#else
  return -__builtin_huge_val();
#endif
}

// Which keys of row r are masked: key j of query i = r % queries when causal and j > i, and key
// j of sample r / per_sample where pad (samples, n) is true (pad nullptr: no padding mask).
struct RowMask {
  long long queries, per_sample;
  bool causal;
  const bool* pad;
};

// Row r's view of the mask: the causal limit (keys above it masked) and its padding row.
struct RowKeys {
  long long last;  // the last unmasked key by causality (n - 1 or more when not causal)
  const bool* pad;
  JG_HD JG_INLINE bool masked(long long j) const { return j > last || (pad != nullptr && pad[j]); }
};

JG_HD JG_INLINE RowKeys row_keys(const RowMask& mk, long long r, int n) {
  return RowKeys{mk.causal ? r % mk.queries : (long long)n, mk.pad ? mk.pad + (r / mk.per_sample) * n : nullptr};
}

template <class T> JG_HD JG_INLINE T score(T s, T scale, const RowKeys& keys, long long j) {
  return keys.masked(j) ? neg_inf<T>() : s * scale;
}

// The row's max as the exponent's shift: 0 where it is not finite (every key masked, or +-inf/NaN).
template <class T> JG_HD JG_INLINE T shift_of(T m) {
  return m - m == T(0) ? m : T(0);
}

template <class T> JG_HD JG_INLINE T divisor_of(T d) {
  return d > T(0) ? d : T(1);
}

template <class T, int W, class Block>
JG_HD void forward_cached(const Block& b, long long block, long long grid, const T* s, T* p, int n, long long rows,
                          T scale, const RowMask& mk) {
  constexpr int S = norm::RowCache<T>::elems / W;
  for (long long r = block; r < rows; r += grid) {
    const T* sr = s + r * n;
    const RowKeys keys = row_keys(mk, r, n);
    Vec<T, W> c[S] = {};
    T m[1] = {neg_inf<T>()};
    norm::row_slots<W, S>(b, n, [&](int k, int i) {
      c[k] = ld<W>(sr + i);
      for (int e = 0; e < W; ++e) {
        c[k].e[e] = score(c[k].e[e], scale, keys, i + e);
        m[0] = norm::NanMax{}(m[0], c[k].e[e]);
      }
    });
    b.reduce(m, norm::NanMax{});
    const T top = shift_of(m[0]);
    T d[1] = {T(0)};
    norm::row_slots<W, S>(b, n, [&](int k, int) {
      for (int e = 0; e < W; ++e) {
        c[k].e[e] = math::exp_(c[k].e[e] - top);
        d[0] += c[k].e[e];
      }
    });
    b.sum(d);
    const T div = divisor_of(d[0]);
    norm::row_slots<W, S>(b, n, [&](int k, int i) {
      Vec<T, W> o;
      for (int e = 0; e < W; ++e) o.e[e] = c[k].e[e] / div;
      st<W>(p + r * n + i, o);
    });
  }
}

// Rows (rows, n) of s into p (p may be s: every element is read by the thread that writes it, and
// each row's reads end at its group's reductions, before its writes).
template <class T, class Block>
JG_HD void forward_block(const Block& b, long long block, long long grid, const T* s, T* p, int n, long long rows,
                         T scale, const RowMask& mk) {
  const bool packed = norm::rows_packed<T>(n, s, p, s, p, s);
  if (norm::row_fits<T>(n, b.size)) {
    if (packed)
      forward_cached<T, ew::Pack<T>::size>(b, block, grid, s, p, n, rows, scale, mk);
    else
      forward_cached<T, 1>(b, block, grid, s, p, n, rows, scale, mk);
    return;
  }
  // streamed (rows longer than the registers hold): s read for the max, the sum and the write
  for (long long r = block; r < rows; r += grid) {
    const T* sr = s + r * n;
    const RowKeys keys = row_keys(mk, r, n);
    T m[1] = {neg_inf<T>()};
    norm::row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      const Vec<T, W> a = ld<W>(sr + i);
      for (int e = 0; e < W; ++e) m[0] = norm::NanMax{}(m[0], score(a.e[e], scale, keys, i + e));
    });
    b.reduce(m, norm::NanMax{});
    const T top = shift_of(m[0]);
    T d[1] = {T(0)};
    norm::row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      const Vec<T, W> a = ld<W>(sr + i);
      for (int e = 0; e < W; ++e) d[0] += math::exp_(score(a.e[e], scale, keys, i + e) - top);
    });
    b.sum(d);
    const T div = divisor_of(d[0]);
    norm::row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      const Vec<T, W> a = ld<W>(sr + i);
      Vec<T, W> o;
      for (int e = 0; e < W; ++e) o.e[e] = math::exp_(score(a.e[e], scale, keys, i + e) - top) / div;
      st<W>(p + r * n + i, o);
    });
  }
}

}  // namespace softmax
}  // namespace jacgrad
