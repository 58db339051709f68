// The row machinery of jacgrad's row kernels (kernels/norm.cuh, kernels/softmax.cuh), written once
// for the device and the host (the host tests' HostBlock stands in for DeviceGroup/DeviceBlock):
// one group of threads per row, vector loads and stores of 16 bytes, the thread's share of a row
// (streamed: row_each; held in registers: RowCache, row_slots), the row <-> thread mapping
// (row_group, on_rows) and the reductions. Kept in namespace jacgrad::norm, where it began.
#pragma once

#include "elementwise.cuh"

namespace jacgrad {
namespace norm {

// W consecutive elements, loaded or stored as one access (W * sizeof(T) = 16 bytes, or W = 1).
template <class T, int W> struct alignas(sizeof(T) * W) Vec {
  T e[W];
};
template <int W> struct Width {
  static constexpr int value = W;
};

template <int W, class T> JG_HD JG_INLINE Vec<T, W> ld(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Vec<T, W>*>(p);
#else
  Vec<T, W> a;
  for (int k = 0; k < W; ++k) a.e[k] = p[k];
  return a;
#endif
}

template <int W, class T> JG_HD JG_INLINE void st(T* p, const Vec<T, W>& a) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Vec<T, W>*>(p) = a;
#else
  for (int k = 0; k < W; ++k) p[k] = a.e[k];
#endif
}

// f(i, Width<W>{}) over this thread's share of a row of n: packs of V = 16/sizeof(T) elements
// when `packed`, then single elements.
template <class T, class Block, class F>
JG_HD JG_INLINE void row_each(const Block& b, int n, bool packed, F&& f) {
  constexpr int V = ew::Pack<T>::size;
  int done = 0;
  if (packed) {
    const int packs = n / V;
    for (int p = b.tid; p < packs; p += b.size) f(p * V, Width<V>{});
    done = packs * V;
  }
  for (int i = done + b.tid; i < n; i += b.size) f(i, Width<1>{});
}

// The one-read path: each thread of a row's group holds its share of the row in registers,
// RowCache<T>::packs packs of 16 bytes per operand (slot k: pack tid + k * size, or with unaligned
// rows RowCache<T>::packs * V single elements tid + k * size). Loops over the slots have a
// compile-time trip count (unrolled on the device: the slots stay registers, never local memory).
template <class T> struct RowCache {
  static constexpr int packs = 4;
  static constexpr int elems = packs * ew::Pack<T>::size;
};

// Whether a row of n fits a group of `size` threads' registers: ceil(n / V) <= packs * size (the
// same test for packed and single-element rows; jacgrad/cuda/norm_kernels.py's row_fits).
template <class T> JG_HD JG_INLINE bool row_fits(int n, int size) {
  constexpr int V = ew::Pack<T>::size;
  return (n + V - 1) / V <= RowCache<T>::packs * size;
}

// f(slot k, first element i) for this thread's units of W elements: unit tid + k * size.
template <int W, int S, class Block, class F> JG_HD JG_INLINE void row_slots(const Block& b, int n, F&& f) {
  const int units = n / W;
  JG_UNROLL
  for (int k = 0; k < S; ++k) {
    const int u = b.tid + k * b.size;
    if (u < units) f(k, u * W);
  }
}

// Whether every row of every operand starts 16-byte aligned: bases aligned, n a multiple of V.
template <class T> JG_HD JG_INLINE bool rows_packed(int n, const void* a, const void* b, const void* c,
                                                   const void* d, const void* e) {
  return n % ew::Pack<T>::size == 0 && ew::aligned16(a) && ew::aligned16(b) && ew::aligned16(c) &&
         ew::aligned16(d) && ew::aligned16(e);
}

// The rows of thread `thread` of block `block` (blockDim `block_dim`, grid `grid`) when groups of
// `group` threads (a power of two dividing block_dim) each take a row: its lane in the group,
// its first row and the stride to its next (the kernels' and the host tests' one mapping).
struct RowGroup {
  int tid;
  long long first, stride;
};
JG_HD JG_INLINE RowGroup row_group(int thread, int block_dim, long long block, long long grid, int group) {
  const int per_block = block_dim / group;
  return RowGroup{thread & (group - 1), block * per_block + thread / group, grid * per_block};
}

// The reductions' operators (Block::reduce): a + b, and the maximum that keeps NaN from either
// side (as NumPy's max; fmax would drop it).
struct Plus {
  template <class T> JG_HD JG_INLINE T operator()(T a, T b) const { return a + b; }
};
struct NanMax {
  template <class T> JG_HD JG_INLINE T operator()(T a, T b) const { return (a != a || a > b) ? a : b; }
};

#if defined(__CUDACC__)
// `size` (a power of two, at most 32) consecutive lanes of one warp working on one row.
struct DeviceGroup {
  int tid, size;

  // Each lane's v[k] becomes op over the group's v[k] (an xor butterfly: every lane gets the same
  // result). Only the group's lanes take part: the other groups of the warp may be on other rows.
  template <int K, class T, class Op> __device__ JG_INLINE void reduce(T (&v)[K], Op op) const {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned mask = size == 32 ? 0xffffffffu : ((1u << size) - 1u) << (lane & ~unsigned(size - 1));
    for (int k = 0; k < K; ++k)
      for (int off = size >> 1; off > 0; off >>= 1) v[k] = op(v[k], __shfl_xor_sync(mask, v[k], off));
  }
  template <int K, class T> __device__ JG_INLINE void sum(T (&v)[K]) const { reduce(v, Plus{}); }
};

// The device's block as one group (rows of 32 packs or more): blockDim.x a multiple of 32
// (jacgrad/cuda/norm_kernels.py launches 32..256 threads).
struct DeviceBlock {
  int tid, size;

  // Each thread's v[k] becomes op over the block's v[k]: a warp shuffle tree, then the warps'
  // partials through shared memory, read by every thread (nothing returns before all have).
  template <int K, class T, class Op> __device__ JG_INLINE void reduce(T (&v)[K], Op op) const {
    __shared__ T part[K][32];
    for (int k = 0; k < K; ++k)
      for (int off = 16; off > 0; off >>= 1) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], off));
    const int lane = tid & 31, warp = tid >> 5, warps = (size + 31) >> 5;
    if (lane == 0)
      for (int k = 0; k < K; ++k) part[k][warp] = v[k];
    __syncthreads();
    for (int k = 0; k < K; ++k) {
      T t = part[k][0];
      for (int q = 1; q < warps; ++q) t = op(t, part[k][q]);
      v[k] = t;
    }
    __syncthreads();  // part is free for the next reduction
  }
  template <int K, class T> __device__ JG_INLINE void sum(T (&v)[K]) const { reduce(v, Plus{}); }
};
#endif

}  // namespace norm

#if defined(__CUDACC__)
// body(group, first row, row stride) for this thread's row group: the whole block when `group` is
// blockDim.x (one row per block), else groups of `group` lanes (several rows per block). The row
// kernels of norm.cu and softmax.cu hand it their row function.
template <class Body> __device__ __forceinline__ void on_rows(int group, Body&& body) {
  if (group >= (int)blockDim.x) {
    body(norm::DeviceBlock{(int)threadIdx.x, (int)blockDim.x}, (long long)blockIdx.x, (long long)gridDim.x);
  } else {
    const norm::RowGroup g = norm::row_group((int)threadIdx.x, (int)blockDim.x, blockIdx.x, gridDim.x, group);
    body(norm::DeviceGroup{g.tid, group}, g.first, g.stride);
  }
}
#endif

}  // namespace jacgrad
