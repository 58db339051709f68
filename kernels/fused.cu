// The elementwise steps of the hot path, one pass each, templated on the float type T, the
// activation functor Act (kernels/activations.cuh) and whether the derivative is taken from the
// activation's output. jacgrad/cuda/kernels.py instantiates them through CuPy's RawModule with
// name expressions such as "jacgrad::scale_cotangent<float, jacgrad::Tanh, false>", all those of
// one dtype in one module.
//
// The activation's parameters (Params<T>{pa, pb}: leaky_relu's slope, elu's alpha, softplus'
// beta and threshold, hard_tanh's bounds) are the last two arguments, so one compiled kernel
// serves every parameter value.
//
// Grid-stride loops with 64-bit indices (any grid covers any n), 16-byte loads and stores when
// the pointers are aligned, no % per element: the loops are kernels/elementwise.cuh's, which the
// host tests run thread by thread. Pointers are __restrict__: the only aliasing callers may use
// is out == v in scale_cotangent, where each element is read before the same thread writes it.
#include "activations.cuh"
#include "elementwise.cuh"

namespace jacgrad {

#define JG_GRID_THREAD ((long long)blockIdx.x * blockDim.x + threadIdx.x), ((long long)blockDim.x * gridDim.x)

// out[i] = v[i] * phi'(x[i mod period]); period == n when x has v's shape, period == H when one
// diagonal x (H,) is shared by every row of v (B, H).
template <class T, class Act, bool FROM_OUTPUT>
__global__ void scale_cotangent(const T* __restrict__ v, const T* __restrict__ x,
                                T* __restrict__ out, long long n, long long period, T pa, T pb) {
  const Params<T> p{pa, pb};
  ew::map_broadcast(JG_GRID_THREAD, v, x, out, n, period,
                    [p](T a, T b) { return a * derivative<Act, FROM_OUTPUT>(b, p); });
}

// y[i] = phi(h[i])
template <class T, class Act>
__global__ void activation_forward(const T* __restrict__ h, T* __restrict__ y, long long n, T pa, T pb) {
  const Params<T> p{pa, pb};
  ew::map1(JG_GRID_THREAD, h, y, n, [p](T a) { return Act::f(a, p); });
}

// h[i] += b[i mod H]; y[i] = phi(h[i]): a dense layer's bias and activation in one pass over h
// (eager, that was two launches per layer). y may be h itself (activations whose derivative is
// read from the output keep no h): each element is read, then written by the same thread, h first.
template <class T, class Act>
__global__ void bias_activation_forward(T* h, const T* __restrict__ b, T* y, long long n, long long period,
                                        T pa, T pb) {
  const Params<T> p{pa, pb};
  ew::strided(JG_GRID_THREAD, n, period, [&](long long i, long long c) {
    const T v = h[i] + b[c];
    h[i] = v;
    y[i] = Act::f(v, p);
  });
}

// d[i] = phi'(x[i]), x being the pre-activation h or (FROM_OUTPUT) the output y
template <class T, class Act, bool FROM_OUTPUT>
__global__ void activation_derivative(const T* __restrict__ x, T* __restrict__ d, long long n, T pa, T pb) {
  const Params<T> p{pa, pb};
  ew::map1(JG_GRID_THREAD, x, d, n, [p](T a) { return derivative<Act, FROM_OUTPUT>(a, p); });
}

// y[i] = phi(h[i]) and d[i] = phi'(h[i]) in one read of h (the forward pass with a cache)
template <class T, class Act>
__global__ void forward_with_derivative(const T* __restrict__ h, T* __restrict__ y,
                                        T* __restrict__ d, long long n, T pa, T pb) {
  const Params<T> p{pa, pb};
  ew::map1to2(JG_GRID_THREAD, h, y, d, n, [p](T a) { return Act::f(a, p); }, [p](T a) { return Act::df(a, p); });
}

#undef JG_GRID_THREAD

}  // namespace jacgrad
