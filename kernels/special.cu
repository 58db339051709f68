// Special functions for the GPU side of jacgrad/elementwise/activations.py (the erf-form gelu on CuPy
// arrays): the CUDA erf/erfc of T = float or double, elementwise, through kernels/elementwise.cuh's
// grid-stride loop (64-bit indices, 16-byte loads and stores when aligned).
#include "activations.cuh"
#include "elementwise.cuh"

namespace jacgrad {

template <class T>
__global__ void erf_elementwise(const T* __restrict__ x, T* __restrict__ y, long long n) {
  ew::map1((long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)blockDim.x * gridDim.x, x, y, n,
           [](T a) { return math::erf_(a); });
}

template <class T>
__global__ void erfc_elementwise(const T* __restrict__ x, T* __restrict__ y, long long n) {
  ew::map1((long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)blockDim.x * gridDim.x, x, y, n,
           [](T a) { return math::erfc_(a); });
}

}  // namespace jacgrad
