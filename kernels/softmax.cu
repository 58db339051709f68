// Attention's softmax on rows, T = float or double, instantiated by jacgrad/cuda/softmax_kernels.py
// as "jacgrad::softmax_rows<float>", "jacgrad::softmax_jvp<double>" etc. (one NVRTC module per
// dtype). The math is kernels/softmax.cuh's (host-tested); the launch is the norm row kernels'
// (norm_kernels.row_launch: `group` threads per row). Inputs and outputs are not __restrict__:
// both kernels may write in place (softmax.cuh says why that is safe).
#include "softmax.cuh"

namespace jacgrad {

// P = softmax(scale * S) over rows of n, keys masked by causality (when `causal`, key j > query
// r % queries) and by pad (samples, n) bool (when has_pad; sample r / per_sample); p may be s.
template <class T>
__global__ void __launch_bounds__(256, 2)
softmax_rows(const T* s, T* p, int n, long long rows, T scale, long long queries, long long per_sample,
             int causal, const bool* __restrict__ pad, int has_pad, int group) {
  const softmax::RowMask mk{queries, per_sample, causal != 0, has_pad ? pad : nullptr};
  on_rows(group, [&](const auto& b, long long first, long long stride) {
    softmax::forward_block(b, first, stride, s, p, n, rows, scale, mk);
  });
}

template <class T>
__global__ void __launch_bounds__(256, 2)
softmax_jvp(const T* __restrict__ p, const T* v, T* out, int n, long long rows, long long inner,
            long long span, int group) {
  on_rows(group, [&](const auto& b, long long first, long long stride) {
    softmax::jvp_block(b, first, stride, p, v, out, n, rows, inner, span);
  });
}

}  // namespace jacgrad
