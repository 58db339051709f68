"""``BatchNorm1d`` and ``BatchNorm2d`` in eval mode: a per-channel affine map from the running
statistics, ``y = (x − μ_run)/sqrt(σ²_run + eps) · γ + β`` (torch's names: ``weight`` = γ,
``bias`` = β; ``running_mean``, ``running_var`` are constants, not parameters).

Train mode normalises with the batch's own statistics, which couples the samples: a sample's
output then depends on the others, so per-sample Jacobians and gradients lose their meaning.
It is not offered (``interop`` refuses a torch module in train mode with that reason).

An activation may be fused, as in ``Dense`` (torch's conv → BatchNorm → ReLU):
``y = φ(h)``, ``h = x̂·γ + β``. The Jacobian is ``diag(φ'(h))·diag(γ/σ)`` per channel
(``ChannelScaleOp``), shared by every sample with the identity. The parameter leaf is
elementwise: ``∂γ_b = Σ_t δ_b ⊙ x̂_b``, ``∂β_b = Σ_t δ_b`` with ``x̂ = param_input(state):
(B, C, *spatial)`` and ``δ = ∂L/∂h`` (what ``backward`` returns) of the same shape.

    >>> import numpy as np, jacgrad as jg
    >>> bn = jg.layers.BatchNorm2d(np.full(2, 2.0), np.zeros(2), np.zeros(2), np.full(2, 4.0), eps=0.0)
    >>> bn.forward(np.ones((1, 2, 1, 1)))[0].ravel().tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.validation import float_array, shape_str
from ..cuda import kernels
from ..core.backend import get_xp
from ..elementwise.activations import get as get_activation
from .factors import SpatialFactor
from .ops import ChannelScaleOp
from .leaves import LeafSpatialFactor, to_tokens
from ..protocol.layer import register_layer
from ..protocol.leaves import ElementwiseLeaf

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class BatchNorm2d:
    """Eval ``torch.nn.BatchNorm2d``: ``weight, bias: (C,)`` (None for both: ``affine=False``),
    ``running_mean, running_var: (C,)``, ``eps > 0``; input ``(B, C, H, W)``; ``activation``
    fused after it. Keeps ``x̂`` for backward, and ``y`` or ``h`` where the activation is not the identity."""

    kind = "batchnorm2d"
    _spatial = (2,)
    spec_fields = {"eps": (int, float), "affine": bool, "activation": str, "in_shape": (list, type(None))}

    def __init__(self, weight: Any, bias: Any, running_mean: Any, running_var: Any, eps: float = 1e-5,
                 in_shape: Sequence[int] | None = None, activation: str = "identity"):
        name = type(self).__name__
        xp = get_xp(*[a for a in (weight, bias, running_mean, running_var) if a is not None])
        mean, var = float_array(running_mean, "running_mean", xp), float_array(running_var, "running_var", xp)
        if mean.ndim != 1 or mean.shape[0] < 1 or var.shape != mean.shape or var.dtype != mean.dtype:
            raise ValueError(f"{name}: running_mean {shape_str(mean.shape)} and running_var {shape_str(var.shape)} "
                             f"must both be (C,) of one dtype")
        if (weight is None) != (bias is None):
            raise ValueError(f"{name}: give both weight and bias (affine=True) or neither (affine=False)")
        if weight is not None:
            weight, bias = float_array(weight, "weight", xp), float_array(bias, "bias", xp)
            for what, a in (("weight", weight), ("bias", bias)):
                if a.shape != mean.shape or a.dtype != mean.dtype:
                    raise ValueError(f"{name}: {what} is {shape_str(a.shape)} {a.dtype} but running_mean is "
                                     f"{shape_str(mean.shape)} {mean.dtype}: they must match")
        eps = float(eps)
        if not (eps >= 0 and np.isfinite(eps)):
            raise ValueError(f"{name}: eps must be finite and ≥ 0, got {eps!r}")
        if bool((var + eps <= 0).any()):
            raise ValueError(f"{name}: running_var + eps must be > 0 in every channel")
        self._w, self._b, self._mean, self._var, self._eps = weight, bias, mean, var, eps
        self._act = get_activation(activation)
        self.in_shape = None if in_shape is None else self.output_shape(tuple(int(s) for s in in_shape))
        self.out_shape = self.in_shape

    weight = property(lambda self: self._w, doc="γ: ``(C,)`` or None")
    bias = property(lambda self: self._b, doc="β: ``(C,)`` or None")
    running_mean = property(lambda self: self._mean)
    running_var = property(lambda self: self._var)
    eps = property(lambda self: self._eps)
    activation = property(lambda self: self._act.name)
    num_features = property(lambda self: self._mean.shape[0])
    n_in = n_out = property(lambda self: None if self.in_shape is None else int(np.prod(self.in_shape)))

    @property
    def names(self) -> tuple:
        return () if self._w is None else ("weight", "bias")

    @property
    def params(self) -> list:
        return [] if self._w is None else [self._w, self._b]

    def spec(self) -> dict:
        return {"kind": self.kind, "eps": self._eps, "affine": self._w is not None, "activation": self._act.name,
                "in_shape": None if self.in_shape is None else list(self.in_shape)}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None):
        """The layer of a file's ``spec`` and arrays (``weight``, ``bias`` where affine; the running statistics)."""
        return cls(params.get("weight"), params.get("bias"), params["running_mean"], params["running_var"],
                   eps=spec["eps"], activation=spec["activation"], in_shape=spec["in_shape"])

    @classmethod
    def file_names(cls, spec: dict) -> tuple:
        """``weight``, ``bias`` (affine) and the constants ``running_mean``, ``running_var``."""
        return (("weight", "bias") if spec["affine"] else ()) + ("running_mean", "running_var")

    def file_arrays(self) -> list:
        return list(zip(self.names, self.params)) + [("running_mean", self._mean), ("running_var", self._var)]

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple:
        """Every stored array is ``(C,)`` of one C; ``(None, None)``: widths are not chained through it."""
        (m, key) = shapes["running_mean"]
        for name, sk in shapes.items():
            if sk is not None and (len(sk[0]) != 1 or sk[0] != m):
                raise ValueError(f"layer {where} ({cls.kind}): {sk[1]} has shape {sk[0]}; it must be {m} as {key}")
        return None, None

    def bind_in_shape(self, in_shape) -> tuple:
        """Fix the per-sample input shape (``Sequential``); returns ``out_shape`` (the same)."""
        in_shape = self.output_shape(tuple(int(s) for s in in_shape))
        if self.in_shape is not None and self.in_shape != in_shape:
            raise ValueError(f"{self!r} was built for inputs {self.in_shape} but is given {in_shape}")
        self.in_shape = self.out_shape = in_shape
        return in_shape

    def param_leaves(self) -> list:
        """An ``ElementwiseLeaf`` (γ, β) over the channels where affine, paired with ``x̂`` channels-last."""
        return [] if self._w is None else [ElementwiseLeaf(bias=True)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features}, eps={self._eps:g}, eval, {self._act.name})"

    def _inv(self):
        return 1.0 / get_xp(self._var).sqrt(self._var + self._eps)

    def _scale(self):
        """``γ/σ: (C,)`` (``1/σ`` without affine)."""
        inv = self._inv()
        return inv if self._w is None else self._w * inv

    def _check(self, x):
        name = type(self).__name__
        ok = x.ndim - 2 in self._spatial and x.shape[1] == self.num_features
        if not ok:
            want = "(B, C, H, W)" if self._spatial == (2,) else "(B, C) or (B, C, L)"
            raise ValueError(f"{name}: input of shape {shape_str(x.shape)} is not {want} with C = {self.num_features}")

    def _col(self, a, x):
        return a.reshape((-1,) + (1,) * (x.ndim - 2))

    def output_shape(self, in_shape) -> tuple:
        """``in_shape`` itself, checked: ``(C, …)`` with C = ``num_features``."""
        in_shape = tuple(in_shape)
        if not in_shape or len(in_shape) - 1 not in self._spatial or in_shape[0] != self.num_features:
            raise ValueError(f"{type(self).__name__}: in_shape {in_shape} is not (C, …) with C = {self.num_features}")
        return in_shape

    def forward_shapes(self, B: int) -> list:
        """The output and ``x̂`` (and ``h`` where φ' needs it), all ``(B, *in_shape)``."""
        if self.in_shape is None:
            raise ValueError(f"{self!r}: forward_shapes needs in_shape; build the layer with in_shape=(C, ...)")
        return [(B,) + self.in_shape] * (2 if self._plain_or_from_output() else 3)

    def _plain_or_from_output(self) -> bool:
        return self._act.name == "identity" or self._act.df_from_output is not None

    def backward_shapes(self, B: int, input_grad: bool = True) -> list:
        return [(B,) + self.in_shape] if input_grad else []

    def forward(self, x, check=None, where: Any = 0, out=None):
        """``x: (B, C, …) -> (B, C, …)``; returns ``(y, (x̂, y or h or None))``."""
        self._check(x)
        xp = get_xp(x, self._mean)
        plain = self._plain_or_from_output()
        bufs = out if out is not None else [xp.empty_like(x) for _ in range(2 if plain else 3)]
        y, xhat = bufs[0], bufs[1]
        h = y if plain else bufs[2]
        xp.subtract(x, self._col(self._mean, x), out=xhat)
        xp.multiply(xhat, self._col(self._inv(), x), out=xhat)
        if self._w is None:
            h[...] = xhat
        else:
            xp.multiply(xhat, self._col(self._w, x), out=h)
            h += self._col(self._b, x)
        if self._act.name != "identity":
            kernels.activation_forward(h, self._act, out=y)
        if check is not None:
            check(y, f"{where if isinstance(where, str) else f'layer {where}'}: output")
        return y, (xhat, None if self._act.name == "identity" else y if plain else h)

    def factor(self, state) -> SpatialFactor:
        """``diag(φ'(h))·diag(γ/σ)`` per channel: shared by every sample with the identity."""
        xhat, saved = state
        d = None if saved is None else kernels.derivative(saved, self._act, from_output=self._act.df_from_output is not None)
        cls = SpatialFactor if self._w is None else LeafSpatialFactor
        return cls(ChannelScaleOp(self._scale(), xhat.shape[1:]), d, anchor=xhat)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``δ = g ⊙ φ'(h)``, ``∂γ = Σ δ⊙x̂``, ``∂β = Σ δ`` (over batch and positions); returns
        ``(δ·γ/σ or None, δ)``; ``g`` is only read."""
        xhat, saved = state
        if saved is not None:
            g = kernels.scale_cotangent(g, saved, self._act, from_output=self._act.df_from_output is not None)
        state = xhat
        axes = (0,) + tuple(range(2, g.ndim))
        if self._w is not None:
            gx = g * state
            grads[0][...] = gx.sum(axis=axes)
            grads[1][...] = g.sum(axis=axes)
            if sq is not None:
                per = tuple(range(2, g.ndim))
                a, b = (gx.sum(axis=per), g.sum(axis=per)) if per else (gx, g)
                sq += (a * a).sum(axis=1) + (b * b).sum(axis=1)
        if not input_grad:
            return None, g
        xp = get_xp(g)
        gin = xp.multiply(g, self._col(self._scale(), g), out=out[0] if out else None)
        return gin, g

    def param_input(self, state):
        """``x̂`` channels-last, ``(B, T, C)`` (``T = 1`` for a ``(B, C)`` input): the elementwise
        leaf's ``a`` (``∂γ_b = Σ_t δ_b,t ⊙ x̂_b,t``)."""
        return to_tokens(state[0], 1)


class BatchNorm1d(BatchNorm2d):
    """Eval ``torch.nn.BatchNorm1d``: input ``(B, C)`` or ``(B, C, L)``; everything else as ``BatchNorm2d``."""

    kind = "batchnorm1d"
    _spatial = (0, 1)


register_layer("batchnorm2d", BatchNorm2d)
register_layer("batchnorm1d", BatchNorm1d)
