"""``Dense``: ``z = φ(z_prev @ W + b)``, per token on ``(B, T, H_in)`` inputs.

It runs the very per-layer steps of ``MLP`` (``_passes.dense_forward`` / ``dense_backward``) on
the rows of its input (``_token_rows.PerToken``: a token batch is ``B·T`` rows); its parameters
are one ``TokenDenseLeaf`` (``jacgrad.protocol.leaves``) paired with its input.

    >>> import numpy as np
    >>> L = Dense(np.ones((3, 2)), activation="tanh")
    >>> L.forward(np.ones((4, 5, 3)))[0].shape, L.in_shape
    ((4, 5, 2), (3,))
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..protocol.passes import dense_backward, dense_forward
from ..protocol.token_rows import PerToken
from ..core.validation import float_array, shape_str
from ..elementwise.activations import get as get_activation
from ..core.backend import get_xp
from ..algebra.jacobian import LayerJacobian
from ..cuda.kernels import activation_forward, forward_with_derivative
from ..protocol.layer import buffers as _buffers, lead_shape, register_layer
from ..protocol.leaves import TokenDenseLeaf

__all__ = ["Dense"]

_LEAF, _LEAF_NO_BIAS = TokenDenseLeaf(bias=True), TokenDenseLeaf(bias=False)


class Dense(PerToken):
    """``z = φ(z_prev @ W + b)``, ``W: (H_in, H_out)``, ``b: (H_out,)`` (None: zeros, still a
    parameter, as in ``MLP``). ``bias=False``: no bias at all, ``z = φ(z_prev @ W)`` (torch's
    ``nn.Linear(bias=False)``): ``names`` is ``("W",)``, P counts no bias, every product leaves it
    out; ``b`` must then be None. Arrays are kept by reference.

    Keeps for backward: a reference to its input ``z_prev`` (for ∂W) and one ``(B, H_out)``
    array — the output ``y`` where φ' is a function of it (tanh, relu, sigmoid, …), else the
    pre-activation ``h`` (gelu, silu, softplus)."""

    kind = "dense"
    # a file's spec carries "bias": false only for a bias-free layer (files without it: a bias)
    spec_fields = {"activation": str}
    spec_optional = {"bias": bool}

    def __init__(self, W: Any, b: Any = None, activation: str = "identity", bias: bool = True):
        if not isinstance(bias, bool):
            raise TypeError(f"Dense: bias must be True or False, got {bias!r}")
        if not bias and b is not None:
            raise ValueError("Dense: bias=False takes no b (got an array); pass b=None, or bias=True to keep it")
        xp = get_xp(W) if b is None else get_xp(W, b)
        W = float_array(W, "W", xp)
        if W.ndim != 2 or min(W.shape) < 1:
            raise ValueError(f"Dense: W must be 2-D (H_in, H_out) with both ≥ 1, got shape {shape_str(W.shape)}")
        if bias:
            b = xp.zeros(W.shape[1], dtype=W.dtype) if b is None else float_array(b, "b", xp)
            if b.shape != (W.shape[1],) or b.dtype != W.dtype:
                raise ValueError(f"Dense: b is {shape_str(b.shape)} {b.dtype} but W {shape_str(W.shape)} {W.dtype} "
                                 f"needs ({W.shape[1]},) {W.dtype}")
        self._W, self._b, self._act = W, b, get_activation(activation)

    W = property(lambda self: self._W, doc="``(H_in, H_out)``")
    b = property(lambda self: self._b, doc="``(H_out,)``, or None for a bias-free layer")
    has_bias = property(lambda self: self._b is not None, doc="False for ``Dense(W, bias=False)``")
    activation = property(lambda self: self._act.name, doc="the activation's name")
    n_in = property(lambda self: self._W.shape[0])
    n_out = property(lambda self: self._W.shape[1])

    @property
    def names(self) -> tuple:
        return ("W", "b") if self._b is not None else ("W",)

    @property
    def params(self) -> list:
        return [self._W, self._b] if self._b is not None else [self._W]

    def spec(self) -> dict:
        s = {"kind": self.kind, "activation": self._act.name}
        return s if self._b is not None else dict(s, bias=False)

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "Dense":
        """The layer of a file's ``spec`` (``activation``, ``bias`` where False) and arrays ``W``,
        ``b`` (None: zeros)."""
        if not spec.get("bias", True):
            return cls(params["W"], None, spec["activation"], bias=False)
        return cls(params["W"], params.get("b"), spec["activation"])

    @classmethod
    def file_names(cls, spec: dict) -> tuple:
        """The arrays a file stores for it: ``W``, and ``b`` unless its spec says ``"bias": false``."""
        return ("W", "b") if spec.get("bias", True) else ("W",)

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        """``(n_in, n_out)`` of a file's declared ``{"W": (shape, key), "b": (shape, key) or None}``."""
        (W, key), b = shapes["W"], shapes.get("b")
        if len(W) != 2:
            raise ValueError(f"layer {where}: {key} must be 2-D (H_in, H_out), got shape {W}")
        if b is not None and b[0] != (W[1],):
            raise ValueError(f"layer {where}: {b[1]} has shape {b[0]} but {key} has {W[1]} outputs")
        return W[0], W[1]

    def param_leaves(self) -> list:
        """One ``TokenDenseLeaf``: ``W`` and ``b`` (``W`` alone without a bias), paired with the input
        ``z_prev`` (per token)."""
        return [_LEAF if self._b is not None else _LEAF_NO_BIAS]

    def __repr__(self) -> str:
        return f"Dense({self.n_in}->{self.n_out}, {self._act.name}{'' if self._b is not None else ', bias=False'})"

    def forward_shapes(self, B: Any, keep_derivative: bool = False) -> list:
        """Shapes of the buffers ``forward`` writes, its output first: ``[(B, H_out)]`` (``y`` over
        ``h``), or ``[z, h]`` where φ' needs ``h`` — and ``[z, h, φ'(h)]`` with ``keep_derivative``
        (a compiled step: one fused pass writes ``z`` and ``φ'(h)``, which backward then reads)."""
        out = lead_shape(B) + (self.n_out,)  # B: an int, or (B, T) for a token batch
        if self._act.df_from_output is not None:
            return [out]
        return [out] * (3 if keep_derivative else 2)

    def backward_shapes(self, B: Any, input_grad: bool = True) -> list:
        """Shapes of the buffers ``backward`` writes: ``δ: (B, H_out)`` and ``∂L/∂z_prev: (B, H_in)``."""
        lead = lead_shape(B)
        return [lead + (self.n_out,)] + ([lead + (self.n_in,)] if input_grad else [])

    # the lean-cache hooks of the layer protocol: where φ' needs h, h is kept and z = φ(h) is
    # recomputed by the next layer's backward (on a token batch, gelu/gelu_tanh/silu make φ'(h)
    # with φ(h) and keep it instead: one erfc, not two); δ is scaled in place; W and φ are bound
    input_in_state = scales_in_place = reusable_factor = True
    output_recomputable = property(lambda self: self._act.df_from_output is None)

    def recompute_output(self, state, with_factor: bool = True):
        """``(z, factor)``: the output ``φ(h)`` from the kept ``h`` and ``diag(φ'(h))·Wᵀ``, with ``φ'(h)``
        made in the same pass (``kernels.forward_with_derivative``); ``with_factor=False``: ``(z, None)``."""
        if not with_factor:
            return activation_forward(state[1], self._act), None
        z, d = forward_with_derivative(state[1], self._act)
        return z, LayerJacobian(d, self._W)

    @staticmethod
    def kept(state) -> tuple:
        """``(y or h, from_output)``: the ``(B, H_out)`` array the state keeps for the factor, and
        whether it is the output ``y`` (else ``h``)."""
        return state[1], state[2]

    def bound(self) -> tuple:
        return (("weights", self._W), ("activations", self._act))

    def _forward_rows(self, z, check=None, where: Any = 0, out=None, keep_derivative: bool = False):
        """``z: (B, H_in) -> (B, H_out)``; returns ``(out, state)``. ``out``: the buffers of
        ``forward_shapes`` to write into (fresh ones when None; three, ``[z, h, d]``, also keep
        ``d = φ'(h)``). ``keep_derivative`` (token batches): where φ and φ' share their costly part
        (``f_and_df``), ``d`` is made in the same pass and kept even without a third buffer."""
        from_output = self._act.df_from_output is not None
        bufs = out if out is not None else _buffers(None, self.forward_shapes(z.shape[0]), z)
        h, d = (bufs[0], None) if from_output else (bufs[1], bufs[2] if len(bufs) == 3 else None)
        if keep_derivative and d is None and self._act.f_and_df is not None and get_xp(z) is np:
            # gelu, gelu_tanh, silu: φ and φ' share their costly part (gelu's erfc: a quarter of a
            # transformer's training step), so φ'(h) is made with φ(h), bitwise as the factor's df(h)
            d = np.empty_like(h)
        y = dense_forward(z, self._W, self._b, self._act, h, None if from_output else bufs[0], d, check, where)
        return y, (z, h, from_output, d)

    def _factor_rows(self, state) -> LayerJacobian:
        """``diag(φ'(h))·Wᵀ`` from the kept ``φ'(h)``, else from the saved ``y`` or ``h``."""
        _, saved, from_output, d = state
        if d is not None:
            return LayerJacobian(d, self._W)
        return LayerJacobian.from_activation(self._act, self._W, **{"y" if from_output else "h": saved})

    def _backward_rows(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                       sq=None, out=None, factor=None):
        """``g = ∂L/∂z: (B, H_out)`` (only read); writes ``∂W, ∂b`` into ``grads``; returns ``(∂L/∂z_prev
        or None, δ = ∂L/∂h)``, written into ``out`` (the buffers of ``backward_shapes``; fresh when
        None). ``sq: (B,)``, when given, gets each sample's share of the squared gradient norm
        added, ``(‖z_prev,i‖² + 1)‖δ_i‖²`` (``‖z_prev,i‖²‖δ_i‖²`` without a bias; its leaf's ``sq_norms``). ``factor``: ``self.factor(state)``
        where the caller keeps it (a compiled step's states are the same buffers every call)."""
        z_prev = state[0]
        bufs = out if out is not None else _buffers(None, self.backward_shapes(g.shape[0], input_grad), g)
        delta, gin = bufs[0], (bufs[1] if input_grad else None)
        db = grads[1] if self._b is not None else None
        dense_backward(self._factor_rows(state) if factor is None else factor, g, z_prev, grads[0], db, delta, gin, check, where)
        if sq is not None:
            sq += self.param_leaves()[0].sq_norms(z_prev, delta)
        return gin, delta

    def _param_input_rows(self, state):
        """The ``a`` its parameter gradients pair with ``δ`` (``∇_W = a ⊗ δ``): its input ``z_prev: (B, H_in)``."""
        return state[0]


register_layer("dense", Dense)
