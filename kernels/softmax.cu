// The softmax Jacobian's product on rows, out = p * (v - sum(p * v)), T = float or double,
// instantiated by jacgrad/cuda/softmax_kernels.py as "jacgrad::softmax_jvp<float>" etc. (one NVRTC
// module per dtype). The math is kernels/softmax.cuh's (host-tested); the launch is the norm row
// kernels' (norm_kernels.block_threads: `group` threads per row). v and out are not __restrict__:
// out may be v (softmax.cuh says why that is safe).
#include "softmax.cuh"

namespace jacgrad {

template <class T>
__global__ void __launch_bounds__(256, 2)
softmax_jvp(const T* __restrict__ p, const T* v, T* out, int n, long long rows, long long inner,
            long long span, int group) {
  on_rows(group, [&](const auto& b, long long first, long long stride) {
    softmax::jvp_block(b, first, stride, p, v, out, n, rows, inner, span);
  });
}

}  // namespace jacgrad
