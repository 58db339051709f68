"""``LayerNorm`` and ``RMSNorm`` over the last axis, per token on ``(B, T, n)`` inputs.

Their parameters are one ``ElementwiseLeaf`` (``jacgrad.protocol.leaves``: ``γ`` and ``β``) paired
with ``x̂``; their Jacobian is a ``NormFactor`` of the rows (a ``TokenFactor`` over a token batch).

    >>> import numpy as np
    >>> L = LayerNorm(np.ones(4), np.zeros(4))
    >>> y, state = L.forward(np.arange(8.0).reshape(2, 4))
    >>> y.shape, L.factor(state).h_in
    ((2, 4), 4)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..cuda import norm_kernels
from ..protocol.passes import column_sums
from ..protocol.token_rows import PerToken
from ..core.validation import float_array, shape_str
from ..core.backend import get_xp
from ..algebra.factors import FixedNormFactor, NormFactor
from ..protocol.layer import buffers as _buffers, lead_shape, register_layer
from ..protocol.leaves import ElementwiseLeaf

__all__ = ["LayerNorm", "NORMS", "RMSNorm", "make_norm"]


class _Norm(PerToken):
    """Shared body of LayerNorm (``centered``) and RMSNorm. Keeps for backward: ``x̂: (B, n)``
    and ``inv = 1/σ`` (or ``1/r``): ``(B,)`` — nothing else (``y = γ⊙x̂ + β`` is not kept).
    ``affine=False`` (torch's ``elementwise_affine=False``): no parameters; ``gamma`` (ones, as
    torch computes) is a constant that sets the width and dtype, kept in files as a constant."""

    centered = True
    _all_names: tuple = ()

    def __init__(self, gamma: Any, beta: Any, eps: float, what: str, affine: bool = True):
        if not isinstance(affine, bool):
            raise TypeError(f"{what}: affine must be True or False, got {affine!r}")
        if not affine and beta is not None:
            raise ValueError(f"{what}: affine=False has no beta (got an array): torch's elementwise_affine=False "
                             f"has neither weight nor bias")
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
        self._gamma, self._beta, self._eps, self._affine = gamma, beta, eps, affine

    gamma = property(lambda self: self._gamma, doc="``(n,)``: a parameter, or the constant scale where not ``affine``")
    affine = property(lambda self: self._affine, doc="False: no parameters (torch's ``elementwise_affine=False``)")
    eps = property(lambda self: self._eps, doc="the variance floor (> 0)")
    n_in = n_out = property(lambda self: self._gamma.shape[0])

    @property
    def names(self) -> tuple:
        if not self._affine:
            return ()
        return ("gamma",) + (() if self._beta is None else ("beta",))

    @property
    def params(self) -> list:
        if not self._affine:
            return []
        return [self._gamma] + ([] if self._beta is None else [self._beta])

    spec_fields = {"eps": (int, float)}
    spec_optional = {"affine": bool}  # written only where False: older files have none

    def spec(self) -> dict:
        return {"kind": self.kind, "eps": self.eps, **({} if self._affine else {"affine": False})}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None):
        """The layer of a file's ``spec`` (``eps``; ``affine``, ``bias`` where False) and arrays by
        name (``gamma``, ``beta``; where not affine, ``gamma`` is the constant scale)."""
        return cls(params["gamma"], *([params.get("beta")] if "beta" in cls._all_names else []), eps=spec["eps"],
                   **cls._flags(spec))

    @classmethod
    def file_names(cls, spec: dict) -> tuple:
        """The arrays a file stores: ``gamma``, and ``beta`` where the layer has one; not affine:
        ``gamma`` alone, the constant scale."""
        if not spec.get("affine", True) or not spec.get("bias", True):
            return ("gamma",)
        return cls._all_names

    def file_arrays(self) -> list:
        return list(zip(self.names, self.params)) if self._affine else [("gamma", self._gamma)]

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple:
        """``(n, n)`` of a file's declared ``{name: (shape, key)}``; every array 1-D of one width."""
        n = None
        for name, (shape, key) in shapes.items():
            if len(shape) != 1:
                raise ValueError(f"layer {where} ({cls.kind}): {key} must be 1-D (n,), got shape {shape}")
            if n is not None and shape[0] != n:
                raise ValueError(f"layer {where} ({cls.kind}): {key} has shape {shape} but gamma has {n} features")
            n = shape[0]
        return n, n

    def param_leaves(self) -> list:
        """One ``ElementwiseLeaf``: ``γ`` (and ``β``), paired with ``x̂`` (per token); none where not affine."""
        return [ElementwiseLeaf(bias=self._beta is not None)] if self._affine else []

    def __repr__(self) -> str:
        flags = ("" if self._affine else ", affine=False") + (", bias=False" if self._affine and self._beta is None
                                                              and "beta" in self._all_names else "")
        return f"{type(self).__name__}({self.n_in}, eps={self.eps:g}{flags})"

    def forward_shapes(self, B: Any) -> list:
        """Shapes of the buffers ``forward`` writes: the output, ``x̂``, ``inv`` and the mean ``(B, 1)``
        (``B``: an int, or ``(B, T)`` for a token batch, which leads every shape)."""
        lead = lead_shape(B)
        return [lead + (self.n_in,), lead + (self.n_in,), lead, lead + (1,)]

    def backward_shapes(self, B: Any, input_grad: bool = True) -> list:
        """Shapes of the buffers ``backward`` writes: a ``(B, n)`` and two ``(B, 1)`` scratch arrays
        (``g⊙x̂``, then the VJP's work), and ``∂L/∂x: (B, n)``."""
        lead = lead_shape(B)
        return [lead + (self.n_in,), lead + (1,), lead + (1,)] + ([lead + (self.n_in,)] if input_grad else [])

    def _forward_rows(self, x, check=None, where: Any = 0, out=None):
        """``x: (B, n) -> (B, n)``; returns ``(out, (x̂, inv))``; ``out``: the buffers of ``forward_shapes``.
        On CuPy: one fused kernel (``jacgrad.cuda.norm_kernels.forward``) computing what the NumPy lines
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

    def _factor_rows(self, state) -> NormFactor:
        cls = NormFactor if self._affine else FixedNormFactor  # no parameters: no split at them
        return cls(self._gamma, state[1], state[0], centered=self.centered)

    def _backward_rows(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                       sq=None, out=None):
        """``∂γ = Σ_batch g⊙x̂``, ``∂β = Σ_batch g``; ∂L/∂x is the factor's VJP. Returns
        ``(∂L/∂x or None, g)``; ``g`` is only read, ``out``: the buffers of ``backward_shapes``.
        ``sq: (B,)`` gets ``‖g_i⊙x̂_i‖² + ‖g_i‖²`` added when given. On CuPy: a fused row kernel and
        a column kernel (``jacgrad.cuda.norm_kernels.backward``), ∂L/∂x into ``out``'s last buffer when given."""
        xp = get_xp(g)
        if xp is not np:
            dgamma = grads[0] if self._affine else None  # not affine: no parameter, nothing to add to sq
            dbeta = grads[1] if self._affine and self._beta is not None else None
            dx_out = out[3] if out is not None and input_grad else None
            dx = norm_kernels.backward(g, state[0], state[1], self._gamma, self.centered, dgamma, dbeta,
                                       sq if self._affine else None, input_grad, dx_out=dx_out)
            return dx, g
        bufs = _buffers(out, self.backward_shapes(g.shape[0], input_grad), g)
        if not self._affine:  # no parameters: only the input's gradient
            return (self._factor_rows(state).vjp(g, out=bufs[3], work=bufs[:3]) if input_grad else None), g
        gx = xp.multiply(g, state[0], out=bufs[0])
        column_sums(gx, grads[0])  # the GEMV 1ᵀ(g⊙x̂): faster than an axis-0 sum (_passes.column_sums)
        if self._beta is not None:
            column_sums(g, grads[1])
        if sq is not None:
            sq += (gx * gx).sum(axis=1) + ((g * g).sum(axis=1) if self._beta is not None else 0.0)
        if not input_grad:
            return None, g
        return self._factor_rows(state).vjp(g, out=bufs[3], work=bufs[:3]), g  # gx is scratch from here on

    def _param_input_rows(self, state):
        """The ``a`` its parameter gradients pair with ``g = ∂L/∂y`` (``∇_γ = a ⊙ g``): ``x̂: (B, n)``."""
        return state[0]


class LayerNorm(_Norm):
    """``y = γ ⊙ (x − μ)/σ + β``, ``σ = sqrt(var(x) + eps)`` over the features (``torch.nn.LayerNorm``).
    ``gamma, beta: (n,)`` (beta None: zeros, still a parameter); ``eps > 0``. ``bias=False``: no β
    (torch's ``LayerNorm(bias=False)``); ``affine=False``: no parameters, ``gamma`` the constant
    scale (ones: torch's ``elementwise_affine=False``). Jacobian ``diag(γ/σ)(I − 11ᵀ/n − x̂x̂ᵀ/n)``."""

    kind = "layernorm"
    _all_names = ("gamma", "beta")
    spec_optional = {"affine": bool, "bias": bool}

    def __init__(self, gamma: Any, beta: Any = None, eps: float = 1e-5, bias: bool = True, affine: bool = True):
        if not isinstance(bias, bool):
            raise TypeError(f"LayerNorm: bias must be True or False, got {bias!r}")
        if not bias and beta is not None:
            raise ValueError("LayerNorm: bias=False takes no beta (got an array); pass beta=None")
        if beta is None and bias and affine:
            beta = get_xp(gamma).zeros_like(float_array(gamma, "gamma", get_xp(gamma)))
        super().__init__(gamma, beta, eps, "LayerNorm", affine)

    beta = property(lambda self: self._beta, doc="``(n,)``, or None without a bias")
    has_bias = property(lambda self: self._affine and self._beta is not None)

    def spec(self) -> dict:
        s = super().spec()
        return s if not self._affine or self._beta is not None else dict(s, bias=False)

    @staticmethod
    def _flags(spec: dict) -> dict:
        return {"affine": spec.get("affine", True), "bias": spec.get("bias", True) and spec.get("affine", True)}


class RMSNorm(_Norm):
    """``y = γ ⊙ x/r``, ``r = sqrt(mean(x²) + eps)`` (``torch.nn.RMSNorm``). ``gamma: (n,)``;
    ``eps > 0``. Jacobian ``diag(γ/r)(I − x̂x̂ᵀ/n)``."""

    kind = "rmsnorm"
    _all_names = ("gamma",)
    centered = False

    def __init__(self, gamma: Any, eps: float = 1e-6, affine: bool = True):
        super().__init__(gamma, None, eps, "RMSNorm", affine)

    @staticmethod
    def _flags(spec: dict) -> dict:
        return {"affine": spec.get("affine", True)}


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


register_layer("layernorm", LayerNorm)
register_layer("rmsnorm", RMSNorm)
