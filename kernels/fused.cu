// The elementwise steps of the hot path, one pass each, templated on the float type T, the
// activation functor Act (kernels/activations.cuh) and whether the derivative is taken from the
// activation's output. jacgrad/kernels.py instantiates them through CuPy's RawModule with
// name expressions such as "jacgrad::scale_cotangent<float, jacgrad::Tanh, false>".
//
// The activation's parameters (Params<T>{pa, pb}: leaky_relu's slope, elu's alpha, softplus'
// beta and threshold, hard_tanh's bounds) are the last two arguments, so one compiled kernel
// serves every parameter value.
//
// All kernels use a grid-stride loop with 64-bit indices, so any grid size covers any n.
// Pointers are __restrict__: the only aliasing callers may use is out == v in scale_cotangent,
// where each element is read once before it is written by the same thread.
#include "activations.cuh"

namespace jacgrad {

// out[i] = v[i] * phi'(x[i mod period]); period == n when x has v's shape, period == H when one
// diagonal x (H,) is shared by every row of v (B, H).
template <class T, class Act, bool FROM_OUTPUT>
__global__ void scale_cotangent(const T* __restrict__ v, const T* __restrict__ x,
                                T* __restrict__ out, long long n, long long period, T pa, T pb) {
  const long long stride = (long long)blockDim.x * gridDim.x;
  const Params<T> p{pa, pb};
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (period == n) {
    for (; i < n; i += stride) out[i] = v[i] * derivative<Act, FROM_OUTPUT>(x[i], p);
  } else {
    for (; i < n; i += stride) out[i] = v[i] * derivative<Act, FROM_OUTPUT>(x[i % period], p);
  }
}

// y[i] = phi(h[i])
template <class T, class Act>
__global__ void activation_forward(const T* __restrict__ h, T* __restrict__ y, long long n, T pa, T pb) {
  const long long stride = (long long)blockDim.x * gridDim.x;
  const Params<T> p{pa, pb};
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = Act::f(h[i], p);
  }
}

// d[i] = phi'(x[i]), x being the pre-activation h or (FROM_OUTPUT) the output y
template <class T, class Act, bool FROM_OUTPUT>
__global__ void activation_derivative(const T* __restrict__ x, T* __restrict__ d, long long n, T pa, T pb) {
  const long long stride = (long long)blockDim.x * gridDim.x;
  const Params<T> p{pa, pb};
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    d[i] = derivative<Act, FROM_OUTPUT>(x[i], p);
  }
}

// y[i] = phi(h[i]) and d[i] = phi'(h[i]) in one read of h (the forward pass with a cache)
template <class T, class Act>
__global__ void forward_with_derivative(const T* __restrict__ h, T* __restrict__ y,
                                        T* __restrict__ d, long long n, T pa, T pb) {
  const long long stride = (long long)blockDim.x * gridDim.x;
  const Params<T> p{pa, pb};
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T hi = h[i];
    y[i] = Act::f(hi, p);
    d[i] = Act::df(hi, p);
  }
}

}  // namespace jacgrad
