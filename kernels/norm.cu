// The normalisation layers' kernels (LayerNorm, RMSNorm), T = float or double, instantiated by
// jacgrad/cuda/norm_kernels.py as "jacgrad::norm_forward<float>" etc., all of one dtype in one NVRTC
// module. The math is kernels/norm.cuh's (host-tested); these wrappers only hand it the
// coordinates of the thread's row group. Flags are ints (0/1), uniform per launch; `group` is
// the threads per row: blockDim.x (one block per row) or a power of two below 32.
#include "norm.cuh"

namespace jacgrad {

// The row kernels' blocks are at most 256 threads (norm_kernels.MAX_THREADS); two resident per SM
// caps a thread at 128 registers, which hold the one-read path's row share (norm.cuh, RowCache).
#define JG_NORM_BOUNDS __launch_bounds__(256, 2)

// x (rows, n) -> y = xhat * gamma + beta, xhat (rows, n), inv (rows,), in one kernel.
template <class T>
__global__ void JG_NORM_BOUNDS
norm_forward(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                             T* __restrict__ y, T* __restrict__ xhat, T* __restrict__ inv, int n, long long rows,
                             T eps, int centered, int has_beta, int group) {
  on_rows(group, [&](const auto& b, long long first, long long stride) {
    norm::forward_block(b, first, stride, x, gamma, beta, y, xhat, inv, n, rows, eps, centered != 0, has_beta != 0);
  });
}

// The factor on rows: out = P(a * gamma*inv) (transpose: the VJP) or (P a) * gamma*inv (the JVP).
// Output row r uses sample r / per_sample and reads row r of a, or (a_rows = per_sample) that
// row of the stack every sample shares (kernels/norm.cuh, project_block).
template <class T>
__global__ void JG_NORM_BOUNDS
norm_product(const T* __restrict__ a, const T* __restrict__ xhat, const T* __restrict__ gamma,
                             const T* __restrict__ inv, T* __restrict__ out, int n, long long rows, long long a_rows,
                             long long per_sample, int centered, int transpose, int group) {
  on_rows(group, [&](const auto& b, long long first, long long stride) {
    norm::project_block(b, first, stride, a, xhat, gamma, inv, out, (T*)nullptr, (T*)nullptr, (T*)nullptr, n, rows,
                        a_rows, per_sample, centered != 0, transpose != 0, true, false, false, false);
  });
}

// The layer's backward row pass: dx = P(g * gamma*inv) (when write_dx) and, when with_sq,
// sq[r] += |g*xhat|^2 (+ |g|^2 when with_beta), from one read of g and xhat. dx and sq are
// only written when their flag is set (the caller passes some array of the launch otherwise).
// With `fuse` (rows that fit the registers), each row group also writes its column sums of g*xhat
// and g as its row of part_g, part_b (groups, n): the whole backward reads g and xhat once.
template <class T>
__global__ void JG_NORM_BOUNDS
norm_backward(const T* __restrict__ g, const T* __restrict__ xhat, const T* __restrict__ gamma,
                              const T* __restrict__ inv, T* __restrict__ dx, T* __restrict__ sq,
                              T* __restrict__ part_g, T* __restrict__ part_b, int n, long long rows, int centered,
                              int write_dx, int with_sq, int with_beta, int fuse, int group) {
  on_rows(group, [&](const auto& b, long long first, long long stride) {
    norm::project_block(b, first, stride, g, xhat, gamma, inv, dx, sq, part_g, part_b, n, rows, rows, 1LL,
                        centered != 0, true, write_dx != 0, with_sq != 0, with_beta != 0, fuse != 0);
  });
}

// part_g[c, j] = sum over chunk c of g*xhat, part_b[c, j] = sum of g: grid (ceil(n / blockDim), chunks).
template <class T>
__global__ void norm_param_grads(const T* __restrict__ g, const T* __restrict__ xhat, T* __restrict__ part_g,
                                 T* __restrict__ part_b, int n, long long rows, long long chunk, int with_beta) {
  norm::param_grads_column((long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)blockIdx.y, g, xhat, part_g,
                           part_b, n, rows, chunk, with_beta != 0);
}

}  // namespace jacgrad
