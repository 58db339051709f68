"""A new layer in one file: Scale(s), y = s ⊙ x per feature (and per token), on jacgrad's layer protocol.

It registers the layer, builds a Sequential with it, saves and loads it, and checks its per-sample
gradient norms (all three methods), the NTK and the Gauss-Newton products against torch.func."""

import numpy as np
import torch

import jacgrad as jg
from jacgrad.protocol.layer import buffers, lead_shape, register_layer
from jacgrad.protocol.leaves import ElementwiseLeaf


class ScaleFactor:
    """J = diag(s) for each of `batch` rows. The parameter tangent x ⊙ ṡ enters at the output."""

    def __init__(self, s, batch):
        self.s, self.batch, self.h_in, self.h_out = s, batch, s.shape[0], s.shape[0]

    per_sample = True
    dtype = property(lambda self: self.s.dtype)
    xp = property(lambda self: jg.get_xp(self.s))
    anchor = property(lambda self: self.s)
    row_cost = property(lambda self: self.h_in)
    dense_cost = 0

    def jvp(self, u):               # (…, n) -> (…, n); diag(s) is symmetric, so vjp is the same
        return u * self.s

    vjp = jvp_stack = vjp_stack = jvp

    def dense(self, transposed=False):
        return np.broadcast_to(np.diag(self.s), (self.batch, self.h_in, self.h_in)).copy()

    def rows(self, sel):
        return ScaleFactor(self.s, len(np.arange(self.batch)[sel]))

    def norm_bound(self):
        return np.full(self.batch, np.abs(self.s).max())

    # the split at the parameters, which is all the parameter-space products need of a factor
    def param_vjp_stack(self, A, need_input=True):
        return [A], (A * self.s if need_input else None)

    def param_jvp(self, t, leaf_tangent):
        return leaf_tangent(0, None if t is None else t * self.s)


class Scale(jg.layers.PerToken):  # PerToken: (B, n) rows, and (B, T, n) token batches from them
    """y = s ⊙ x, s: (n,). Its one parameter leaf is elementwise (∇s_i = Σ_t x_i,t ⊙ δ_i,t)."""

    kind, names, spec_fields = "scale", ("s",), {}

    def __init__(self, s):
        self.s = np.asarray(s, dtype=float)

    n_in = n_out = property(lambda self: self.s.shape[0])
    params = property(lambda self: [self.s])

    def __repr__(self):
        return f"Scale({self.n_in})"

    def spec(self):
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, spec, params, inner=None):
        return cls(params["s"])

    @staticmethod
    def file_widths(where, shapes):
        shape, key = shapes["s"]
        if len(shape) != 1:
            raise ValueError(f"layer {where} (scale): {key} must be 1-D (n,), got shape {shape}")
        return shape[0], shape[0]

    def param_leaves(self):
        return [ElementwiseLeaf(bias=False)]

    def forward_shapes(self, B):
        return [lead_shape(B) + (self.n_in,)]

    def backward_shapes(self, B, input_grad=True):
        return [lead_shape(B) + (self.n_in,)] if input_grad else []

    # the row passes: x (N, n); the state is the input itself (the leaf's a)
    def _forward_rows(self, x, check=None, where=0, out=None):
        (y,) = buffers(out, self.forward_shapes(x.shape[0]), x)
        return np.multiply(x, self.s, out=y), x

    def _factor_rows(self, x):
        return ScaleFactor(self.s, x.shape[0])

    def _backward_rows(self, x, g, grads, input_grad=True, check=None, where=0, sq=None, out=None):
        (g * x).sum(axis=0, out=grads[0])
        if sq is not None:
            sq += ((g * x) ** 2).sum(axis=1)
        gin = np.multiply(g, self.s, out=buffers(out, self.backward_shapes(g.shape[0]), g)[0]) if input_grad else None
        return gin, g               # δ at the output is g itself (only read)

    def _param_input_rows(self, x):
        return x


register_layer("scale", Scale)

# ---------------------------------------------------------------- use it, and check it against torch.func
rng = np.random.default_rng(0)
W1, b1, s, W2, b2 = (rng.standard_normal((3, 4)) / 2, rng.standard_normal(4), 1 + rng.standard_normal(4) / 4,
                     rng.standard_normal((4, 2)) / 2, rng.standard_normal(2))
net = jg.Sequential([jg.layers.Dense(W1, b1, "tanh"), Scale(s), jg.layers.Dense(W2, b2)])
x, t = rng.standard_normal((5, 6, 3)), rng.standard_normal((5, 6, 2))  # B = 5 samples of T = 6 tokens
net.save("toy.npz")
print(jg.Sequential.load("toy.npz"))

sizes = [(3, 4), (4,), (4,), (4, 2), (2,)]


def f(theta, xi):                    # one sample (T, 3) -> (T, 2), theta in jacgrad's flat order
    parts, at = [], 0
    for shape in sizes:
        n = int(np.prod(shape))
        parts.append(theta[at:at + n].reshape(shape))
        at += n
    w1, c1, sc, w2, c2 = parts
    return (torch.tanh(xi @ w1 + c1) * sc) @ w2 + c2


theta = torch.tensor(np.concatenate([p.ravel() for p in (W1, b1, s, W2, b2)]))
X, T = torch.tensor(x), torch.tensor(t)
g = torch.func.vmap(torch.func.grad(lambda th, xi, ti: ((f(th, xi) - ti) ** 2).mean()), in_dims=(None, 0, 0))(theta, X, T)
J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(theta, X).reshape(5, 12, -1).numpy()
G = np.einsum("iop,ioq->pq", J, J) * (2 / 12) / 5   # mse over the 12 outputs of a sample: H_i = 2/12 · I
v = rng.standard_normal(theta.numel())

close = lambda a, b: bool(np.allclose(a, b, rtol=1e-10, atol=1e-12))  # noqa: E731
for method in ("auto", "gram", "instantiate"):
    print(method, close(net.per_sample_grad_norms(x, t, method=method), g.norm(dim=1).numpy()))
print("ntk", close(jg.ntk(net, x), np.einsum("iop,jqp->ijoq", J, J)))
print("ggn_vp", close(net.ggn_vp(x, v, t), G @ v))
print("ggn_diagonal", close(net.ggn_diagonal(x, t).flat, np.diag(G)))
