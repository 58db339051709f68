"""Layers of a ``jacgrad.Sequential``: ``Dense``, ``Residual``, ``LayerNorm``, ``RMSNorm``.

Each layer does three things: its ``forward`` (returning the output and the least state its
backward needs), its ``backward`` (parameter gradients written into the views it is given,
and ∂L/∂input), and its Jacobian ``factor`` for ``Chain``. ``Dense`` runs the very per-layer
steps of ``MLP`` (``_passes.dense_forward`` / ``dense_backward``).

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
from ._passes import dense_backward, dense_forward
from ._validate import float_array, shape_str
from .activations import get as get_activation
from .backend import get_xp
from .chain import Chain
from .factors import NormFactor, ResidualFactor
from .jacobian import LayerJacobian
from .per_sample import grad_sq_norms

__all__ = ["Dense", "LayerNorm", "NORMS", "RMSNorm", "Residual", "chained", "make_norm"]


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

    def forward(self, z, check=None, where: Any = 0):
        """``z: (B, H_in) -> (B, H_out)``; returns ``(out, state)``."""
        xp = get_xp(z)
        h = xp.empty((z.shape[0], self.n_out), dtype=self._W.dtype)
        from_output = self._act.df_from_output is not None
        out = dense_forward(z, self._W, self._b, self._act, h, None, None, check, where)
        return out, (z, h, from_output)

    def factor(self, state) -> LayerJacobian:
        """``diag(φ'(h))·Wᵀ`` from the saved ``y`` or ``h``."""
        _, saved, from_output = state
        return LayerJacobian.from_activation(self._act, self._W, **{"y" if from_output else "h": saved})

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None):
        """``g = ∂L/∂z: (B, H_out)``; writes ``∂W, ∂b`` into ``grads``; returns ``(∂L/∂z_prev or
        None, δ = ∂L/∂h)``. ``sq: (B,)``, when given, gets each sample's share of the squared
        gradient norm added, ``(‖z_prev,i‖² + 1)‖δ_i‖²`` (``per_sample.grad_sq_norms``)."""
        z_prev = state[0]
        xp = get_xp(g)
        delta = xp.empty_like(g)
        gin = xp.empty((g.shape[0], self.n_in), dtype=g.dtype) if input_grad else None
        dense_backward(self.factor(state), g, z_prev, grads[0], grads[1], delta, gin, check, where)
        if sq is not None:
            sq += grad_sq_norms(lambda _: z_prev, [delta], 1.0)[:, 0]
        return gin, delta


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

    def forward(self, x, check=None, where: Any = 0):
        """``x: (B, n) -> (B, n)``; returns ``(out, (x̂, inv))``. On CuPy: one fused kernel
        (``jacgrad.norm_kernels.forward``) computing what the NumPy lines below do."""
        xp = get_xp(x)
        if xp is not np:
            out, xhat, inv = norm_kernels.forward(x, self._gamma, self._beta, self._eps, self.centered)
            if check is not None:
                check(out, f"{where if isinstance(where, str) else f'layer {where}'}: output")
            return out, (xhat, inv)
        xc = x - x.mean(axis=1, keepdims=True) if self.centered else x
        inv = 1.0 / xp.sqrt((xc * xc).mean(axis=1) + self._eps)
        xhat = xc * inv[:, None]
        out = xhat * self._gamma
        if self._beta is not None:
            out += self._beta
        if check is not None:
            check(out, f"{where if isinstance(where, str) else f'layer {where}'}: output")
        return out, (xhat, inv)

    def factor(self, state) -> NormFactor:
        return NormFactor(self._gamma, state[1], state[0], centered=self.centered)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None):
        """``∂γ = Σ_batch g⊙x̂``, ``∂β = Σ_batch g``; ∂L/∂x is the factor's VJP. Returns
        ``(∂L/∂x or None, g)``. ``sq: (B,)`` gets ``‖g_i⊙x̂_i‖² + ‖g_i‖²`` added when given.
        On CuPy: a fused row kernel and a column kernel (``jacgrad.norm_kernels.backward``)."""
        xp = get_xp(g)
        if xp is not np:
            dbeta = grads[1] if self._beta is not None else None
            dx = norm_kernels.backward(g, state[0], state[1], self._gamma, self.centered, grads[0], dbeta, sq, input_grad)
            return dx, g
        gx = xp.multiply(g, state[0])
        gx.sum(axis=0, out=grads[0])
        if self._beta is not None:
            g.sum(axis=0, out=grads[1])
        if sq is not None:
            sq += (gx * gx).sum(axis=1) + ((g * g).sum(axis=1) if self._beta is not None else 0.0)
        return (self.factor(state).vjp(g) if input_grad else None), g


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

    def forward(self, z, check=None, where: Any = 0):
        name = where if isinstance(where, str) else f"layer {where}"
        u, states = z, []
        for i, L in enumerate(self._layers):
            u, st = L.forward(u, check, f"{name}.{i}")
            states.append(st)
        return z + self.scale * u, states

    def factor(self, state) -> ResidualFactor:
        return ResidualFactor(Chain([L.factor(st) for L, st in zip(self._layers, state)]), self.scale)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None):
        """Inner backward of ``s·g``; returns ``(g + its input gradient, g)``; ``sq`` as the inner layers'."""
        name = where if isinstance(where, str) else f"layer {where}"
        at = [0]
        for L in self._layers:
            at.append(at[-1] + len(L.params))
        u = self.scale * g
        for i in range(len(self._layers) - 1, -1, -1):
            u, _ = self._layers[i].backward(state[i], u, grads[at[i]:at[i + 1]], True, check, f"{name}.{i}", sq)
        return (g + u if input_grad else None), g


LAYER_TYPES = (Dense, LayerNorm, RMSNorm, Residual)


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
