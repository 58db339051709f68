// Index and memory helpers of the elementwise kernels (kernels/fused.cu, kernels/special.cu),
// written once for the device and the host: tests/test_kernels_host.py builds them with g++ and
// runs every thread of a grid on the host against a plain loop.
//
// Near the memory roofline, an elementwise kernel must (a) move 16 bytes per load and store
// (float4 / double2: one Pack<T>) and (b) spend nothing per element beyond the arithmetic. So:
//   * a thread walks its grid-stride sequence in packs when every pointer is 16-byte aligned
//     (CuPy's pool hands out 512-byte-aligned blocks; a view at an odd offset takes the scalar
//     path), then the last n mod V elements one by one;
//   * the column of a broadcast operand, i mod period, is computed ONCE per thread and then
//     advanced by stride mod period with one compare (no 64-bit % per element).
#pragma once

#if !defined(JG_HD)
#if defined(__CUDACC__)
#define JG_HD __host__ __device__
#else
#define JG_HD
#endif
#endif

#if defined(__CUDACC__)
#define JG_INLINE __forceinline__
#define JG_UNROLL _Pragma("unroll")
#else
#define JG_INLINE inline
#define JG_UNROLL
#endif

namespace jacgrad {
namespace ew {

// 16 bytes of T: float4's or double2's worth, loaded and stored as one access.
template <class T> struct alignas(16) Pack {
  static constexpr int size = 16 / sizeof(T);
  T e[size];
};

template <class T> JG_HD JG_INLINE Pack<T> load(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack<T>*>(p);  // one 128-bit load
#else
  Pack<T> a;
  for (int k = 0; k < Pack<T>::size; ++k) a.e[k] = p[k];
  return a;
#endif
}

template <class T> JG_HD JG_INLINE void store(T* p, const Pack<T>& a) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack<T>*>(p) = a;  // one 128-bit store
#else
  for (int k = 0; k < Pack<T>::size; ++k) p[k] = a.e[k];
#endif
}

JG_HD JG_INLINE bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// body(i, i mod period) for i = first, first + stride, ... < n: one % per thread, not per element.
template <class Body>
JG_HD JG_INLINE void strided(long long first, long long stride, long long n, long long period, Body&& body) {
  if (first >= n) return;
  long long col = first % period;
  const long long step = stride % period;
  for (long long i = first; i < n; i += stride) {
    body(i, col);
    col += step;
    if (col >= period) col -= period;
  }
}

// out[i] = f(a[i], b[i mod period]): period == n (same shape) or the row length H of a (B, H)
// operand a sharing one (H,) row b. Thread tid of a grid of `stride` threads.
template <class T, class F>
JG_HD JG_INLINE void map_broadcast(long long tid, long long stride, const T* a, const T* b, T* out, long long n,
                                   long long period, F f) {
  constexpr int V = Pack<T>::size;
  long long done = 0;
  if (aligned16(a) && aligned16(b) && aligned16(out) && (period == n || period % V == 0)) {
    const long long packs = n / V, row = period == n ? packs : period / V;
    if (row > 0) {
      strided(tid, stride, packs, row, [&](long long p, long long c) {
        const Pack<T> x = load(a + p * V), y = load(b + c * V);
        Pack<T> r;
JG_UNROLL
        for (int k = 0; k < V; ++k) r.e[k] = f(x.e[k], y.e[k]);
        store(out + p * V, r);
      });
      done = packs * V;
    }
  }
  strided(done + tid, stride, n, period, [&](long long i, long long c) { out[i] = f(a[i], b[c]); });
}

// y[i] = f(h[i])
template <class T, class F>
JG_HD JG_INLINE void map1(long long tid, long long stride, const T* h, T* y, long long n, F f) {
  constexpr int V = Pack<T>::size;
  long long done = 0;
  if (aligned16(h) && aligned16(y)) {
    const long long packs = n / V;
    for (long long p = tid; p < packs; p += stride) {
      const Pack<T> x = load(h + p * V);
      Pack<T> r;
JG_UNROLL
      for (int k = 0; k < V; ++k) r.e[k] = f(x.e[k]);
      store(y + p * V, r);
    }
    done = packs * V;
  }
  for (long long i = done + tid; i < n; i += stride) y[i] = f(h[i]);
}

// y[i] = f(h[i]) and d[i] = g(h[i]) from one read of h
template <class T, class F, class G>
JG_HD JG_INLINE void map1to2(long long tid, long long stride, const T* h, T* y, T* d, long long n, F f, G g) {
  constexpr int V = Pack<T>::size;
  long long done = 0;
  if (aligned16(h) && aligned16(y) && aligned16(d)) {
    const long long packs = n / V;
    for (long long p = tid; p < packs; p += stride) {
      const Pack<T> x = load(h + p * V);
      Pack<T> r, s;
JG_UNROLL
      for (int k = 0; k < V; ++k) {
        r.e[k] = f(x.e[k]);
        s.e[k] = g(x.e[k]);
      }
      store(y + p * V, r);
      store(d + p * V, s);
    }
    done = packs * V;
  }
  for (long long i = done + tid; i < n; i += stride) {
    const T x = h[i];
    y[i] = f(x);
    d[i] = g(x);
  }
}

}  // namespace ew
}  // namespace jacgrad
