"""Layers of a ``jacgrad.Sequential``: ``Dense``, ``Residual``, ``LayerNorm``, ``RMSNorm``.

Each layer does three things: its ``forward`` (returning the output and the least state its
backward needs), its ``backward`` (parameter gradients written into the views it is given,
and ∂L/∂input), and its Jacobian ``factor`` for ``Chain``. ``Dense`` runs the very per-layer
steps of ``MLP`` (``_passes.dense_forward`` / ``dense_backward``).

``forward``/``backward`` write into the buffers given as ``out`` (the shapes their layer's
``forward_shapes(B)`` / ``backward_shapes(B, input_grad)`` name), or into fresh arrays when
``out`` is None: ``Sequential`` hands them pooled blocks per call, a compiled step the same
buffers every call (``_block_passes``). ``backward`` only reads the cotangent it is given.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers.LayerNorm(np.ones(4), np.zeros(4))
    >>> y, state = L.forward(np.arange(8.0).reshape(2, 4))
    >>> y.shape, L.factor(state).h_in
    ((2, 4), 4)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import norm_kernels
from ._passes import column_sums, dense_backward, dense_forward
from ._validate import float_array, shape_str
from .activations import get as get_activation
from .backend import get_xp
from .chain import Chain
from .factors import NormFactor, ResidualFactor
from .jacobian import LayerJacobian
from .per_sample import grad_sq_norms
# the convolutional family: one module per concept, exported here
from .batchnorm_layers import BatchNorm1d, BatchNorm2d
from .conv_layers import Conv1d, Conv2d
from .pool_layers import AdaptiveAvgPool2d, AvgPool2d, Flatten, MaxPool2d

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv1d", "Conv2d", "Dense", "Flatten", "LayerNorm",
           "MaxPool2d", "NORMS", "RMSNorm", "Residual", "chained", "leaf_layers", "make_norm", "named_params"]


class Dense:
    """``z = φ(z_prev @ W + b)``, ``W: (H_in, H_out)``, ``b: (H_out,)`` (None: zeros, still a
    parameter, as in ``MLP``). Arrays are kept by reference.

    Keeps for backward: a reference to its input ``z_prev`` (for ∂W) and one ``(B, H_out)``
    array — the output ``y`` where φ' is a function of it (tanh, relu, sigmoid, …), else the
    pre-activation ``h`` (gelu, silu, softplus)."""

    kind = "dense"
    names = ("W", "b")

    def __init__(self, W: Any, b: Any = None, activation: str = "identity"):
        xp = get_xp(W) if b is None else get_xp(W, b)
        W = float_array(W, "W", xp)
        if W.ndim != 2 or min(W.shape) < 1:
            raise ValueError(f"Dense: W must be 2-D (H_in, H_out) with both ≥ 1, got shape {shape_str(W.shape)}")
        b = xp.zeros(W.shape[1], dtype=W.dtype) if b is None else float_array(b, "b", xp)
        if b.shape != (W.shape[1],) or b.dtype != W.dtype:
            raise ValueError(f"Dense: b is {shape_str(b.shape)} {b.dtype} but W {shape_str(W.shape)} {W.dtype} "
                             f"needs ({W.shape[1]},) {W.dtype}")
        self._W, self._b, self._act = W, b, get_activation(activation)

    W = property(lambda self: self._W, doc="``(H_in, H_out)``")
    b = property(lambda self: self._b, doc="``(H_out,)``")
    activation = property(lambda self: self._act.name, doc="the activation's name")
    n_in = property(lambda self: self._W.shape[0])
    n_out = property(lambda self: self._W.shape[1])

    @property
    def params(self) -> list:
        return [self._W, self._b]

    def spec(self) -> dict:
        return {"kind": self.kind, "activation": self._act.name}

    def __repr__(self) -> str:
        return f"Dense({self.n_in}->{self.n_out}, {self._act.name})"

    def forward_shapes(self, B: int, keep_derivative: bool = False) -> list:
        """Shapes of the buffers ``forward`` writes, its output first: ``[(B, H_out)]`` (``y`` over
        ``h``), or ``[z, h]`` where φ' needs ``h`` — and ``[z, h, φ'(h)]`` with ``keep_derivative``
        (a compiled step: one fused pass writes ``z`` and ``φ'(h)``, which backward then reads)."""
        if self._act.df_from_output is not None:
            return [(B, self.n_out)]
        return [(B, self.n_out)] * (3 if keep_derivative else 2)

    def backward_shapes(self, B: int, input_grad: bool = True) -> list:
        """Shapes of the buffers ``backward`` writes: ``δ: (B, H_out)`` and ``∂L/∂z_prev: (B, H_in)``."""
        return [(B, self.n_out)] + ([(B, self.n_in)] if input_grad else [])

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, H_in) -> (B, H_out)``; returns ``(out, state)``. ``out``: the buffers of
        ``forward_shapes`` to write into (fresh ones when None; three, ``[z, h, d]``, also keep
        ``d = φ'(h)``)."""
        from_output = self._act.df_from_output is not None
        bufs = out if out is not None else _buffers(None, self.forward_shapes(z.shape[0]), z)
        h, d = (bufs[0], None) if from_output else (bufs[1], bufs[2] if len(bufs) == 3 else None)
        y = dense_forward(z, self._W, self._b, self._act, h, None if from_output else bufs[0], d, check, where)
        return y, (z, h, from_output, d)

    def factor(self, state) -> LayerJacobian:
        """``diag(φ'(h))·Wᵀ`` from the kept ``φ'(h)``, else from the saved ``y`` or ``h``."""
        _, saved, from_output, d = state
        if d is not None:
            return LayerJacobian(d, self._W)
        return LayerJacobian.from_activation(self._act, self._W, **{"y" if from_output else "h": saved})

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None, factor=None):
        """``g = ∂L/∂z: (B, H_out)`` (only read); writes ``∂W, ∂b`` into ``grads``; returns ``(∂L/∂z_prev
        or None, δ = ∂L/∂h)``, written into ``out`` (the buffers of ``backward_shapes``; fresh when
        None). ``sq: (B,)``, when given, gets each sample's share of the squared gradient norm
        added, ``(‖z_prev,i‖² + 1)‖δ_i‖²`` (``per_sample.grad_sq_norms``). ``factor``: ``self.factor(state)``
        where the caller keeps it (a compiled step's states are the same buffers every call)."""
        z_prev = state[0]
        bufs = out if out is not None else _buffers(None, self.backward_shapes(g.shape[0], input_grad), g)
        delta, gin = bufs[0], (bufs[1] if input_grad else None)
        dense_backward(self.factor(state) if factor is None else factor, g, z_prev, grads[0], grads[1], delta, gin, check, where)
        if sq is not None:
            sq += grad_sq_norms(lambda _: z_prev, [delta], 1.0)[:, 0]
        return gin, delta

    def param_input(self, state):
        """The ``a`` its parameter gradients pair with ``δ`` (``∇_W = a ⊗ δ``): its input ``z_prev: (B, H_in)``."""
        return state[0]


def _buffers(out, shapes: list, like) -> list:
    """``out`` (the caller's buffers, one per shape), or fresh ones on ``like``'s device and dtype."""
    if out is not None:
        return out
    xp = get_xp(like)
    return [xp.empty(shape, dtype=like.dtype) for shape in shapes]


class _Norm:
    """Shared body of LayerNorm (``centered``) and RMSNorm. Keeps for backward: ``x̂: (B, n)``
    and ``inv = 1/σ`` (or ``1/r``): ``(B,)`` — nothing else (``y = γ⊙x̂ + β`` is not kept)."""

    centered = True

    def __init__(self, gamma: Any, beta: Any, eps: float, what: str):
        xp = get_xp(gamma) if beta is None else get_xp(gamma, beta)
        gamma = float_array(gamma, "gamma", xp)
        if gamma.ndim != 1 or gamma.shape[0] < 1:
            raise ValueError(f"{what}: gamma must be 1-D (n,) with n ≥ 1, got shape {shape_str(gamma.shape)}")
        if beta is not None:
            beta = float_array(beta, "beta", xp)
            if beta.shape != gamma.shape or beta.dtype != gamma.dtype:
                raise ValueError(f"{what}: beta is {shape_str(beta.shape)} {beta.dtype} but gamma is "
                                 f"{shape_str(gamma.shape)} {gamma.dtype}: they must match")
        eps = float(eps)
        if not (eps > 0 and np.isfinite(eps)):
            raise ValueError(f"{what}: eps must be finite and > 0, got {eps!r}")
        self._gamma, self._beta, self._eps = gamma, beta, eps

    gamma = property(lambda self: self._gamma, doc="``(n,)``")
    eps = property(lambda self: self._eps, doc="the variance floor (> 0)")
    n_in = n_out = property(lambda self: self._gamma.shape[0])

    @property
    def params(self) -> list:
        return [self._gamma] + ([] if self._beta is None else [self._beta])

    def spec(self) -> dict:
        return {"kind": self.kind, "eps": self.eps}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n_in}, eps={self.eps:g})"

    def forward_shapes(self, B: int) -> list:
        """Shapes of the buffers ``forward`` writes: the output, ``x̂``, ``inv`` and the mean ``(B, 1)``."""
        return [(B, self.n_in), (B, self.n_in), (B,), (B, 1)]

    def backward_shapes(self, B: int, input_grad: bool = True) -> list:
        """Shapes of the buffers ``backward`` writes: a ``(B, n)`` and two ``(B, 1)`` scratch arrays
        (``g⊙x̂``, then the VJP's work), and ``∂L/∂x: (B, n)``."""
        return [(B, self.n_in), (B, 1), (B, 1)] + ([(B, self.n_in)] if input_grad else [])

    def forward(self, x, check=None, where: Any = 0, out=None):
        """``x: (B, n) -> (B, n)``; returns ``(out, (x̂, inv))``; ``out``: the buffers of ``forward_shapes``.
        On CuPy: one fused kernel (``jacgrad.norm_kernels.forward``) computing what the NumPy lines
        below do, into the first three buffers when given."""
        xp = get_xp(x)
        if xp is not np:
            y, xhat, inv = norm_kernels.forward(x, self._gamma, self._beta, self._eps, self.centered,
                                                out=None if out is None else out[:3])
            if check is not None:
                check(y, f"{where if isinstance(where, str) else f'layer {where}'}: output")
            return y, (xhat, inv)
        y, xhat, inv, mean = _buffers(out, self.forward_shapes(x.shape[0]), x)
        xc = x
        if self.centered:
            xc = xp.subtract(x, x.mean(axis=1, keepdims=True, out=mean), out=xhat)
        xp.multiply(xc, xc, out=y)              # y is scratch until the last two lines
        y.mean(axis=1, out=inv)
        xp.add(inv, self._eps, out=inv)
        xp.sqrt(inv, out=inv)
        xp.divide(1.0, inv, out=inv)            # inv = 1/sqrt(mean(xc²) + eps)
        xp.multiply(xc, inv[:, None], out=xhat)
        xp.multiply(xhat, self._gamma, out=y)
        if self._beta is not None:
            y += self._beta
        if check is not None:
            check(y, f"{where if isinstance(where, str) else f'layer {where}'}: output")
        return y, (xhat, inv)

    def factor(self, state) -> NormFactor:
        return NormFactor(self._gamma, state[1], state[0], centered=self.centered)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``∂γ = Σ_batch g⊙x̂``, ``∂β = Σ_batch g``; ∂L/∂x is the factor's VJP. Returns
        ``(∂L/∂x or None, g)``; ``g`` is only read, ``out``: the buffers of ``backward_shapes``.
        ``sq: (B,)`` gets ``‖g_i⊙x̂_i‖² + ‖g_i‖²`` added when given. On CuPy: a fused row kernel and
        a column kernel (``jacgrad.norm_kernels.backward``), ∂L/∂x into ``out``'s last buffer when given."""
        xp = get_xp(g)
        if xp is not np:
            dbeta = grads[1] if self._beta is not None else None
            dx_out = out[3] if out is not None and input_grad else None
            dx = norm_kernels.backward(g, state[0], state[1], self._gamma, self.centered, grads[0], dbeta, sq,
                                       input_grad, dx_out=dx_out)
            return dx, g
        bufs = _buffers(out, self.backward_shapes(g.shape[0], input_grad), g)
        gx = xp.multiply(g, state[0], out=bufs[0])
        column_sums(gx, grads[0])  # the GEMV 1ᵀ(g⊙x̂): faster than an axis-0 sum (_passes.column_sums)
        if self._beta is not None:
            column_sums(g, grads[1])
        if sq is not None:
            sq += (gx * gx).sum(axis=1) + ((g * g).sum(axis=1) if self._beta is not None else 0.0)
        if not input_grad:
            return None, g
        return self.factor(state).vjp(g, out=bufs[3], work=bufs[:3]), g  # gx is scratch from here on

    def param_input(self, state):
        """The ``a`` its parameter gradients pair with ``g = ∂L/∂y`` (``∇_γ = a ⊙ g``): ``x̂: (B, n)``."""
        return state[0]


class LayerNorm(_Norm):
    """``y = γ ⊙ (x − μ)/σ + β``, ``σ = sqrt(var(x) + eps)`` over the features (``torch.nn.LayerNorm``).
    ``gamma, beta: (n,)``; ``eps > 0``. Jacobian ``diag(γ/σ)(I − 11ᵀ/n − x̂x̂ᵀ/n)``."""

    kind = "layernorm"
    names = ("gamma", "beta")

    def __init__(self, gamma: Any, beta: Any = None, eps: float = 1e-5):
        if beta is None:
            beta = get_xp(gamma).zeros_like(float_array(gamma, "gamma", get_xp(gamma)))
        super().__init__(gamma, beta, eps, "LayerNorm")

    beta = property(lambda self: self._beta, doc="``(n,)``")


class RMSNorm(_Norm):
    """``y = γ ⊙ x/r``, ``r = sqrt(mean(x²) + eps)`` (``torch.nn.RMSNorm``). ``gamma: (n,)``;
    ``eps > 0``. Jacobian ``diag(γ/r)(I − x̂x̂ᵀ/n)``."""

    kind = "rmsnorm"
    names = ("gamma",)
    centered = False

    def __init__(self, gamma: Any, eps: float = 1e-6):
        super().__init__(gamma, None, eps, "RMSNorm")


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(name: str, n: int, dtype: str = "float64", eps: float | None = None):
    """A fresh normalisation layer of width ``n`` (γ = 1, β = 0) by name: ``"layernorm"`` or
    ``"rmsnorm"``; an unknown name is a ``KeyError`` listing the valid ones."""
    if name not in NORMS:
        raise KeyError(f"unknown norm {name!r}; valid names: {', '.join(NORMS)}")
    cls = NORMS[name]
    gamma = np.ones(int(n), dtype=dtype)
    kw = {} if eps is None else {"eps": eps}
    return cls(gamma, np.zeros_like(gamma), **kw) if cls is LayerNorm else cls(gamma, **kw)


class Residual:
    """``z + s·f(z)`` with ``f`` the inner ``layers`` in order, each mapping ``H -> H`` overall
    (``n_in`` of the first = ``n_out`` of the last, consecutive widths agreeing). Keeps for
    backward: the inner layers' states (nothing of its own). Jacobian ``I + s·J_f``."""

    kind = "residual"

    def __init__(self, layers: Sequence[Any], scale: float = 1.0):
        layers = chained(layers, "Residual: ", "inner layer")
        if layers[0].n_in != layers[-1].n_out:
            raise ValueError(f"Residual: the inner layers map {layers[0].n_in} -> {layers[-1].n_out} features; a "
                             f"residual block needs H -> H (inner layer {len(layers) - 1} must output {layers[0].n_in})")
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"Residual: scale must be finite, got {scale!r}")
        self._layers, self._scale = tuple(layers), scale

    layers = property(lambda self: self._layers, doc="the inner layers (a tuple)")
    scale = property(lambda self: self._scale, doc="the branch scale s")
    n_in = n_out = property(lambda self: self._layers[0].n_in)

    @property
    def params(self) -> list:
        return [p for L in self._layers for p in L.params]

    def spec(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "layers": [L.spec() for L in self._layers]}

    def __repr__(self) -> str:
        return f"Residual([{', '.join(map(repr, self._layers))}], scale={self.scale:g})"

    def forward_shapes(self, B: int) -> list:
        """Shapes of the buffers ``forward`` writes: the output ``(B, H)``, then the inner layers'."""
        return [(B, self.n_in)] + [s for L in self._layers for s in L.forward_shapes(B)]

    def backward_shapes(self, B: int, input_grad: bool = True) -> list:
        """Shapes of the buffers ``backward`` writes: ``s·g``, the inner layers', and ``∂L/∂z``."""
        inner = [s for L in self._layers for s in L.backward_shapes(B, True)]
        return [(B, self.n_in)] + inner + ([(B, self.n_in)] if input_grad else [])

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, H) -> z + s·f(z)``; returns ``(out, inner states)``; ``out``: the buffers of ``forward_shapes``."""
        name = where if isinstance(where, str) else f"layer {where}"
        B = z.shape[0]
        bufs = _buffers(out, self.forward_shapes(B), z)
        u, states, at = z, [], 1
        for i, L in enumerate(self._layers):
            n = len(L.forward_shapes(B))
            u, st = L.forward(u, check, f"{name}.{i}", bufs[at:at + n])
            states.append(st)
            at += n
        xp = get_xp(z)
        su = u if self.scale == 1.0 else xp.multiply(u, self.scale, out=bufs[0])  # 1·u is u: skip the pass
        return xp.add(z, su, out=bufs[0]), states

    def factor(self, state) -> ResidualFactor:
        return ResidualFactor(Chain([L.factor(st) for L, st in zip(self._layers, state)]), self.scale)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """Inner backward of ``s·g``; returns ``(g + its input gradient, g)``; ``g`` is only read;
        ``out``: the buffers of ``backward_shapes``; ``sq`` as the inner layers'."""
        name = where if isinstance(where, str) else f"layer {where}"
        B, xp = g.shape[0], get_xp(g)
        bufs = _buffers(out, self.backward_shapes(B, input_grad), g)
        at, cut = [0], [1]
        for L in self._layers:
            at.append(at[-1] + len(L.params))
            cut.append(cut[-1] + len(L.backward_shapes(B, True)))
        u = g if self.scale == 1.0 else xp.multiply(g, self.scale, out=bufs[0])  # the inner layers only read it
        for i in range(len(self._layers) - 1, -1, -1):
            u, _ = self._layers[i].backward(state[i], u, grads[at[i]:at[i + 1]], True, check, f"{name}.{i}", sq,
                                            bufs[cut[i]:cut[i + 1]])
        return (xp.add(g, u, out=bufs[-1]) if input_grad else None), g


LAYER_TYPES = (Dense, LayerNorm, RMSNorm, Residual)


def leaf_layers(layers: Sequence[Any], path: tuple = ()):
    """``(path, layer)`` for every layer that is not a residual block, residual blocks opened, in
    parameter order; ``path``: the indices from the top, ``(1, 0)`` for inner layer 0 of layer 1."""
    for j, L in enumerate(layers):
        if isinstance(L, Residual):
            yield from leaf_layers(L.layers, path + (j,))
        else:
            yield path + (j,), L


def named_params(layers: Sequence[Any], prefix: str = "layer ") -> list[tuple[str, Any]]:
    """``[(where, array)]`` for every parameter, in ``leaf_layers`` order, ``where`` like
    ``"layer 2 (LayerNorm) gamma"`` or ``"layer 1.0 (Dense) W"`` inside a residual block: the names
    the compiled steps' messages give."""
    return [(f"{prefix}{'.'.join(map(str, path))} ({type(L).__name__}) {name}", p)
            for path, L in leaf_layers(layers) for name, p in zip(L.names, L.params)]


def chained(layers: Sequence[Any], owner: str, label: str) -> list:
    """``layers`` as a list, checked: at least one, each a layer of this module, consecutive
    widths agreeing; errors read ``f"{owner}{label} {j} ..."``."""
    layers = list(layers)
    if not layers:
        raise ValueError(f"{owner}needs at least one {label}")
    for j, L in enumerate(layers):
        if not isinstance(L, LAYER_TYPES):
            raise TypeError(f"{owner}{label} {j} is a {type(L).__name__}, not one of "
                            f"{', '.join(t.__name__ for t in LAYER_TYPES)} (jacgrad.layers)")
        if j and L.n_in != layers[j - 1].n_out:
            raise ValueError(f"{owner}{label} {j} ({L!r}) takes {L.n_in} features but {label} {j - 1} "
                             f"({layers[j - 1]!r}) outputs {layers[j - 1].n_out}")
    return layers
