// Special functions for the GPU side of jacgrad/activations.py (the erf-form gelu on CuPy
// arrays): the CUDA erf/erfc of T = float or double, elementwise, grid-stride, 64-bit indices.
#include "activations.cuh"

namespace jacgrad {

template <class T>
__global__ void erf_elementwise(const T* __restrict__ x, T* __restrict__ y, long long n) {
  const long long stride = (long long)blockDim.x * gridDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = math::erf_(x[i]);
  }
}

template <class T>
__global__ void erfc_elementwise(const T* __restrict__ x, T* __restrict__ y, long long n) {
  const long long stride = (long long)blockDim.x * gridDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = math::erfc_(x[i]);
  }
}

}  // namespace jacgrad
