// The softmax Jacobian's product on rows, written once for the device and the host: for each row
// p of P = softmax(S) and row v of a tangent or cotangent,
//   out = (diag(p) - p p^T) v = p * (v - sum(p * v))
// (the matrix is symmetric: the JVP and the VJP are the same map). kernels/softmax.cu wraps
// jvp_block in a __global__ kernel; tests/norm_host_kernels.py builds it with g++ and nvcc (host
// code) and runs every thread of a grid on host threads against float64 NumPy
// (tests/test_kernels_softmax_host.py). jacgrad/tokens/attention_factor.py (_softmax_jvp) is the
// NumPy reference and the caller.
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

}  // namespace softmax
}  // namespace jacgrad
