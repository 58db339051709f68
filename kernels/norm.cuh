// The normalisation layers' row math (LayerNorm and RMSNorm), written once for the device and
// the host: kernels/norm.cu wraps each *_block function below in a __global__ kernel, and
// tests/test_kernels_norm_host.py builds the same functions with g++ and nvcc (host code) into
// a library that runs every thread of a grid on host threads, against float64 NumPy.
//
// One group of threads per row: the whole block for rows of 32 packs or more, else a group of
// 1..16 consecutive lanes of a warp (several rows per block: short rows keep every lane busy).
// A group loops over rows (row_group gives its first row and stride, so any grid covers any row
// count); its threads stride over the row's n elements, 16 bytes per access when every row starts
// 16-byte aligned (n a multiple of the pack and aligned bases), else one element at a time.
// Reductions go through the Block type: on the device warp shuffles (DeviceGroup) plus one
// shared-memory step for a whole block (DeviceBlock, below), on the host a barrier (the test's
// HostBlock); that machinery is kernels/rows.cuh's. Indices within a row are int; the only 64-bit divisions are one per row (the
// sample of a stacked row).
//
// Memory traffic (the kernels are bandwidth-bound; B rows of n, per-row statistics O(B), gamma and
// beta O(n) and served by the caches). A row whose thread share fits RowCache (below: 4 packs of
// 16 bytes per operand and thread, i.e. n <= 4 * 4 * 256 = 4096 floats or 2048 doubles with the
// launcher's 256-thread blocks) is read ONCE into registers and every later pass works on them
// (norm.cu's __launch_bounds__(256, 2): at most 128 registers, two blocks per SM, 128 bytes of
// loads in flight per thread):
//   forward   read x, write y, write xhat                              3 B n  (was 3 reads of x: 5)
//   product   read a, read xhat, write out                             3 B n  (was 2 reads each: 5)
//   backward  read g, read xhat, write dx; the gamma/beta column sums   3 B n  (was 5 in the row kernel
//             accumulate in registers along the group's rows and are         plus 2 in the column
//             written once per row group: 2 G n partials, G <= B/32          kernel: 7)
// Longer rows stream each pass from memory (the second read mostly from L2) and the backward's
// column sums take the column kernel (param_grads_column): the traffic of the table's "was".
//
// The formulas mirror jacgrad/nn/layers.py (_Norm.forward) and jacgrad/algebra/factors.py
// (NormFactor._project), which stay the NumPy reference:
//   forward   mu = mean(x) (0 for RMSNorm), inv = 1/sqrt(mean((x - mu)^2) + eps),
//             xhat = (x - mu) * inv, y = xhat * gamma + beta        (two passes: no cancellation)
//   P a       = a - sum(a * xhat) * (xhat / n) - mean(a)             (mean term: LayerNorm only)
//   vjp       P(v * (gamma * inv)),   jvp  (P u) * (gamma * inv)
#pragma once

#include "rows.cuh"

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace jacgrad {
namespace norm {

JG_HD JG_INLINE float rsqrt_of(float s) { return 1.0f / sqrtf(s); }
JG_HD JG_INLINE double rsqrt_of(double s) { return 1.0 / sqrt(s); }

// ---- forward: y, xhat and inv of rows of x (B, n) ----------------------------------------
// beta is read only when has_beta (RMSNorm has none); inv: (B,).

// The forward's last pass on the W elements at i of a row, a = x[i:i+W] (from the registers or
// memory): xhat = (a - mu) * s, y = xhat * gamma + beta, stored at i of the rows xr_hat and yr.
template <class T, int W>
JG_HD JG_INLINE void forward_store(const Vec<T, W>& a, int i, T mu, T s, const T* gamma, const T* beta,
                                   bool has_beta, T* xr_hat, T* yr) {
  const Vec<T, W> g = ld<W>(gamma + i);
  Vec<T, W> h, o;
  for (int e = 0; e < W; ++e) {
    h.e[e] = (a.e[e] - mu) * s;
    o.e[e] = h.e[e] * g.e[e];
  }
  if (has_beta) {
    const Vec<T, W> be = ld<W>(beta + i);
    for (int e = 0; e < W; ++e) o.e[e] += be.e[e];
  }
  st<W>(xr_hat + i, h);
  st<W>(yr + i, o);
}

// One read of x: the row in registers (W = V packed, 1 single elements), three passes over them.
template <class T, int W, class Block>
JG_HD void forward_cached(const Block& b, long long block, long long grid, const T* x, const T* gamma,
                          const T* beta, T* y, T* xhat, T* inv, int n, long long rows, T eps, bool centered,
                          bool has_beta) {
  constexpr int S = RowCache<T>::elems / W;
  const T count = T(n);
  for (long long r = block; r < rows; r += grid) {
    Vec<T, W> c[S] = {};
    T s[1] = {T(0)};
    row_slots<W, S>(b, n, [&](int k, int i) {
      c[k] = ld<W>(x + r * n + i);
      for (int e = 0; e < W; ++e) s[0] += c[k].e[e];
    });
    T mu = T(0);
    if (centered) {
      b.sum(s);
      mu = s[0] / count;
    }
    T q[1] = {T(0)};
    row_slots<W, S>(b, n, [&](int k, int) {
      for (int e = 0; e < W; ++e) {
        const T d = c[k].e[e] - mu;
        q[0] += d * d;
      }
    });
    b.sum(q);
    const T sc = rsqrt_of(q[0] / count + eps);
    row_slots<W, S>(b, n, [&](int k, int i) {
      forward_store<T, W>(c[k], i, mu, sc, gamma, beta, has_beta, xhat + r * n, y + r * n);
    });
    if (b.tid == 0) inv[r] = sc;
  }
}

template <class T, class Block>
JG_HD void forward_block(const Block& b, long long block, long long grid, const T* x, const T* gamma,
                         const T* beta, T* y, T* xhat, T* inv, int n, long long rows, T eps, bool centered,
                         bool has_beta) {
  const bool packed = rows_packed<T>(n, x, gamma, has_beta ? beta : gamma, y, xhat);
  if (row_fits<T>(n, b.size)) {
    if (packed)
      forward_cached<T, ew::Pack<T>::size>(b, block, grid, x, gamma, beta, y, xhat, inv, n, rows, eps, centered,
                                           has_beta);
    else
      forward_cached<T, 1>(b, block, grid, x, gamma, beta, y, xhat, inv, n, rows, eps, centered, has_beta);
    return;
  }
  // streamed: every pass reads x again (rows longer than the registers hold)
  const T count = T(n);
  for (long long r = block; r < rows; r += grid) {
    const T* xr = x + r * n;
    T mu = T(0);
    if (centered) {
      T s[1] = {T(0)};
      row_each<T>(b, n, packed, [&](int i, auto w) {
        constexpr int W = decltype(w)::value;
        const Vec<T, W> a = ld<W>(xr + i);
        for (int k = 0; k < W; ++k) s[0] += a.e[k];
      });
      b.sum(s);
      mu = s[0] / count;
    }
    T q[1] = {T(0)};
    row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      const Vec<T, W> a = ld<W>(xr + i);
      for (int k = 0; k < W; ++k) {
        const T c = a.e[k] - mu;
        q[0] += c * c;
      }
    });
    b.sum(q);
    const T s = rsqrt_of(q[0] / count + eps);
    row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      forward_store<T, W>(ld<W>(xr + i), i, mu, s, gamma, beta, has_beta, xhat + r * n, y + r * n);
    });
    if (b.tid == 0) inv[r] = s;
  }
}

// ---- the factor diag(gamma*inv) P on rows -------------------------------------------------
// Output rows: (rows, n); output row r belongs to sample r / per_sample (its xhat row and inv;
// a shared factor has per_sample = rows) and reads row r of a (a_rows = rows) or, for a stack of
// per_sample rows read by every sample (a_rows = per_sample), its row r - sample * per_sample.
// VJP (scale_first): out = P(a * gamma*inv); JVP:
// out = (P a) * gamma*inv. With `sq`, also sq[r] += sum((a*xhat)^2) + (with_beta ? sum(a^2) : 0)
// (the norm layer's per-sample squared parameter-gradient norm; a = g there); out is written
// only when `write_out`.
// With FUSE (the layer's backward, a = g), the group also sums its rows' g*xhat and g per column in
// registers and writes them once, after its last row, as row `block` (the group's index: the
// launch has `grid` groups) of part_g and part_b (grid, n): the column kernel's work without its
// second read of g and xhat.

// A row's sums s (project_cached's, project_block's) over the group: all four with_sq, else s[0] and s[1]
// only.
template <class T, class Block> JG_HD JG_INLINE void project_reduce(const Block& b, bool with_sq, T (&s)[4]) {
  if (with_sq) {
    b.sum(s);
  } else {
    T s2[2] = {s[0], s[1]};
    b.sum(s2);
    s[0] = s2[0];
    s[1] = s2[1];
  }
}

template <class T, int W, bool FUSE, class Block>
JG_HD void project_cached(const Block& b, long long block, long long grid, const T* a, const T* xhat,
                          const T* gamma, const T* inv, T* out, T* sq, T* part_g, T* part_b, int n, long long rows,
                          long long a_rows, long long per_sample, bool centered, bool scale_first, bool write_out,
                          bool with_sq, bool with_beta) {
  constexpr int S = RowCache<T>::elems / W;
  const T count = T(n);
  Vec<T, W> pg[FUSE ? S : 1] = {}, pb[FUSE ? S : 1] = {};
  for (long long r = block; r < rows; r += grid) {
    const long long sample = r / per_sample;
    const T* ar = a + (a_rows == rows ? r : r - sample * per_sample) * n;
    const T* hr = xhat + sample * n;
    const T iv = inv[sample];
    Vec<T, W> cv[S] = {}, ch[S] = {};
    T s[4] = {T(0), T(0), T(0), T(0)};  // as in project_block
    row_slots<W, S>(b, n, [&](int k, int i) {
      cv[k] = ld<W>(ar + i);
      ch[k] = ld<W>(hr + i);
      const Vec<T, W> g = ld<W>(gamma + i);
      for (int e = 0; e < W; ++e) {
        const T v = cv[k].e[e], h = ch[k].e[e];
        const T wk = scale_first ? v * (g.e[e] * iv) : v;
        s[0] += wk;
        s[1] += wk * h;
        if (with_sq) {
          const T gx = v * h;
          s[2] += gx * gx;
          s[3] += v * v;
        }
        if constexpr (FUSE) {
          pg[k].e[e] += v * h;
          pb[k].e[e] += v;
        }
      }
    });
    project_reduce(b, with_sq, s);
    const T mean = centered ? s[0] / count : T(0);
    const T dot = s[1] / count;
    if (write_out) {
      row_slots<W, S>(b, n, [&](int k, int i) {
        const Vec<T, W> g = ld<W>(gamma + i);
        Vec<T, W> o;
        for (int e = 0; e < W; ++e) {
          const T sc = g.e[e] * iv;
          const T wk = scale_first ? cv[k].e[e] * sc : cv[k].e[e];
          const T t = wk - dot * ch[k].e[e] - mean;
          o.e[e] = scale_first ? t : t * sc;
        }
        st<W>(out + r * n + i, o);
      });
    }
    if (with_sq && b.tid == 0) sq[r] += s[2] + (with_beta ? s[3] : T(0));
  }
  if constexpr (FUSE) {
    row_slots<W, S>(b, n, [&](int k, int i) {
      st<W>(part_g + block * n + i, pg[k]);
      if (with_beta) st<W>(part_b + block * n + i, pb[k]);
    });
  }
}

// `fuse` (the backward; only for rows that fit, row_fits): part_g, part_b as in project_cached.
template <class T, class Block>
JG_HD void project_block(const Block& b, long long block, long long grid, const T* a, const T* xhat,
                         const T* gamma, const T* inv, T* out, T* sq, T* part_g, T* part_b, int n, long long rows,
                         long long a_rows, long long per_sample, bool centered, bool scale_first, bool write_out,
                         bool with_sq, bool with_beta, bool fuse) {
  const bool packed = rows_packed<T>(n, a, xhat, gamma, out, a) &&
                      (!fuse || (ew::aligned16(part_g) && ew::aligned16(with_beta ? part_b : part_g)));
  if (row_fits<T>(n, b.size)) {
    constexpr int V = ew::Pack<T>::size;
#define JG_PROJECT(W, F)                                                                                       \
  project_cached<T, W, F>(b, block, grid, a, xhat, gamma, inv, out, sq, part_g, part_b, n, rows, a_rows,       \
                          per_sample, centered, scale_first, write_out, with_sq, with_beta)
    if (fuse) {
      if (packed) JG_PROJECT(V, true); else JG_PROJECT(1, true);
    } else {
      if (packed) JG_PROJECT(V, false); else JG_PROJECT(1, false);
    }
#undef JG_PROJECT
    return;
  }
  // streamed (rows longer than the registers hold; never fused): a and xhat read once per pass
  const T count = T(n);
  for (long long r = block; r < rows; r += grid) {
    const long long sample = r / per_sample;
    const T* ar = a + (a_rows == rows ? r : r - sample * per_sample) * n;
    const T* hr = xhat + sample * n;
    const T iv = inv[sample];
    // s[0] = sum(w), s[1] = sum(w * xhat), w = a * gamma*inv (VJP) or a (JVP);
    // s[2] = sum((a * xhat)^2), s[3] = sum(a^2) for sq
    T s[4] = {T(0), T(0), T(0), T(0)};
    row_each<T>(b, n, packed, [&](int i, auto w) {
      constexpr int W = decltype(w)::value;
      const Vec<T, W> v = ld<W>(ar + i), h = ld<W>(hr + i), g = ld<W>(gamma + i);
      for (int k = 0; k < W; ++k) {
        const T wk = scale_first ? v.e[k] * (g.e[k] * iv) : v.e[k];
        s[0] += wk;
        s[1] += wk * h.e[k];
        if (with_sq) {
          const T gx = v.e[k] * h.e[k];
          s[2] += gx * gx;
          s[3] += v.e[k] * v.e[k];
        }
      }
    });
    project_reduce(b, with_sq, s);
    const T mean = centered ? s[0] / count : T(0);
    const T dot = s[1] / count;  // sum(w * xhat) / n
    if (write_out) {
      row_each<T>(b, n, packed, [&](int i, auto w) {
        constexpr int W = decltype(w)::value;
        const Vec<T, W> v = ld<W>(ar + i), h = ld<W>(hr + i), g = ld<W>(gamma + i);
        Vec<T, W> o;
        for (int k = 0; k < W; ++k) {
          const T sc = g.e[k] * iv;
          const T wk = scale_first ? v.e[k] * sc : v.e[k];
          const T t = wk - dot * h.e[k] - mean;
          o.e[k] = scale_first ? t : t * sc;
        }
        st<W>(out + r * n + i, o);
      });
    }
    if (with_sq && b.tid == 0) sq[r] += s[2] + (with_beta ? s[3] : T(0));
  }
}

// ---- the gamma / beta gradients: column sums over the batch ------------------------------
// Thread column j of chunk c (rows [c*chunk, (c+1)*chunk)): part_g[c, j] = sum g*xhat,
// part_b[c, j] = sum g (when with_beta). Consecutive threads read consecutive columns
// (coalesced); the (chunks, n) partials are summed by the caller.
template <class T>
JG_HD void param_grads_column(long long j, long long c, const T* g, const T* xhat, T* part_g, T* part_b,
                              int n, long long rows, long long chunk, bool with_beta) {
  if (j >= n) return;
  long long end = (c + 1) * chunk;
  if (end > rows) end = rows;
  T sg = T(0), sb = T(0);
  for (long long r = c * chunk; r < end; ++r) {
    const T v = g[r * n + j];
    sg += v * xhat[r * n + j];
    sb += v;
  }
  part_g[c * n + j] = sg;
  if (with_beta) part_b[c * n + j] = sb;
}

}  // namespace norm
}  // namespace jacgrad
