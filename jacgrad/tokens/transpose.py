"""``TransposeTokens``: ``(B, T, d) -> (B, d, T)``, the structural layer of MLP-Mixer's token mixing —
after it the per-token layers (``Dense``, activations) act along the other axis: ``d`` rows of ``T``
features. It has no parameters; its Jacobian is the permutation of each sample's ``T·d`` entries
(``TransposeFactor``: the VJP and the JVP are the transposes back and forth, nothing is formed).

The layer changes the token count: a layer after it gets ``(B, d)`` leading dimensions
(``output_lead``, read by the buffer carving of ``jacgrad.protocol.layer.layer_leads``).

    >>> import numpy as np
    >>> L = TransposeTokens(tokens=3, width=2)
    >>> y, state = L.forward(np.arange(6.0).reshape(1, 3, 2))
    >>> y[0].tolist(), L.factor(state).vjp(y).shape
    ([[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]], (1, 3, 2))
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..core.backend import get_xp
from ..core.validation import float_array, shape_str
from ..protocol.layer import buffers as _buffers, lead_shape, register_layer

__all__ = ["FlatTranspose", "TransposeFactor", "TransposeTokens"]


class TransposeFactor:
    """``∂y/∂x`` of ``y = xᵀ`` per sample, ``x: (T, d)``, ``y: (d, T)``: shared by every sample. Rows
    ``(B, T, d)`` (or flat ``(B, T·d)``), stacks ``(B, R, T, d)`` / ``(B, R, T·d)`` / ``(R, T·d)``;
    results in the layout of the argument, with the two token axes swapped."""

    __slots__ = ("T", "d", "batch", "h_in", "h_out", "_anchor", "_B")
    per_sample = property(lambda self: False)

    def __init__(self, T: int, d: int, anchor: Any):
        self.T, self.d, self.batch, self._anchor = int(T), int(d), None, anchor
        self.h_in, self.h_out = self.d, self.T
        self._B = int(anchor.shape[0]) if getattr(anchor, "ndim", 0) == 3 else None  # the input's samples

    tokens = property(lambda self: self.T, doc="T, the tokens of the input")
    anchor = property(lambda self: self._anchor)
    dtype = property(lambda self: np.dtype(self._anchor.dtype))
    xp = property(lambda self: get_xp(self._anchor))
    row_cost = property(lambda self: self.T * self.d)
    dense_cost = property(lambda self: (self.T * self.d) ** 2)

    def __repr__(self) -> str:
        return f"TransposeFactor(T={self.T}, d={self.d})"

    def _apply(self, a, what: str, n_in: tuple, stacked: bool):
        """``a`` with its last two axes ``n_in`` swapped (flat layouts: per flattened row)."""
        a = float_array(a, what, get_xp(a, self._anchor))
        size = n_in[0] * n_in[1]
        if a.shape[-2:] == n_in and a.ndim == (4 if stacked else 3):
            return a.swapaxes(-1, -2).copy()
        if a.shape[-1] == size and a.ndim in ((2, 3) if stacked else (2,)):
            lead = a.shape[:-1]
            return a.reshape(lead + n_in).swapaxes(-1, -2).reshape(lead + (size,))
        raise ValueError(f"{what} has shape {shape_str(a.shape)} but this transpose maps (T, d) = ({self.T}, {self.d}) "
                         f"per sample: needs (…, {n_in[0]}, {n_in[1]}) or (…, {size})")

    def jvp(self, u: Any):
        """``J u``: ``(B, T, d)`` -> ``(B, d, T)`` (flat ``(B, T·d)`` likewise)."""
        return self._apply(u, "tangent", (self.T, self.d), False)

    def vjp(self, v: Any):
        """``Jᵀ v``: ``(B, d, T)`` -> ``(B, T, d)``."""
        return self._apply(v, "cotangent", (self.d, self.T), False)

    def jvp_stack(self, a):
        return self._apply(a, "tangent stack", (self.T, self.d), True)

    def vjp_stack(self, a):
        return self._apply(a, "cotangent stack", (self.d, self.T), True)

    def dense(self, transposed: bool = False):
        """``(T·d, T·d)``: the permutation matrix (shared by every sample)."""
        xp, n = self.xp, self.T * self.d
        P = self.jvp_stack(xp.eye(n, dtype=self.dtype))  # row k: J e_k
        return P if transposed else P.T

    def rows(self, sel) -> "TransposeFactor":
        return self

    def flat_rows(self) -> "FlatTranspose":
        """This factor on each sample's flattened tokens, ``(B, T·d) -> (B, d·T)``: how ``Chain.flat_tokens``
        takes a factor that changes the token axis."""
        if self._B is None:
            raise ValueError(f"{self!r} was made without its input: no batch for its flat rows")
        return FlatTranspose(self, self._B)

    def norm_bound(self):
        return self.xp.asarray(1.0, dtype=self.dtype)

    def singular_values(self):
        return self.xp.ones(self.T * self.d, dtype=self.dtype)


class FlatTranspose:
    """``TransposeFactor`` on flat rows ``(B, T·d) -> (B, d·T)``, per sample (the same permutation for each)."""

    __slots__ = ("factor", "batch", "h_in", "h_out")
    per_sample = property(lambda self: True)

    def __init__(self, factor: TransposeFactor, B: int):
        self.factor, self.batch = factor, int(B)
        self.h_in = self.h_out = factor.T * factor.d

    dtype = property(lambda self: self.factor.dtype)
    xp = property(lambda self: self.factor.xp)
    anchor = property(lambda self: self.factor.anchor)
    row_cost = property(lambda self: self.h_in)
    dense_cost = property(lambda self: self.batch * self.h_in * self.h_in)

    def __repr__(self) -> str:
        return f"FlatTranspose(B={self.batch}, T={self.factor.T}, d={self.factor.d})"

    def _per_sample(self, a):
        return a if a.ndim == 3 else self.xp.broadcast_to(a, (self.batch,) + a.shape)

    def jvp(self, u: Any):
        return self.factor.jvp(u)

    def vjp(self, v: Any):
        return self.factor.vjp(v)

    def jvp_stack(self, a):
        return self.factor.jvp_stack(self._per_sample(a))

    def vjp_stack(self, a):
        return self.factor.vjp_stack(self._per_sample(a))

    def dense(self, transposed: bool = False):
        P = self.factor.dense(transposed)
        return self.xp.broadcast_to(P, (self.batch,) + P.shape)

    def rows(self, sel) -> "FlatTranspose":
        return FlatTranspose(self.factor, len(np.arange(self.batch)[sel]))

    def norm_bound(self):
        return self.xp.ones(self.batch, dtype=self.dtype)

    def singular_values(self):
        return self.xp.ones((self.batch, self.h_in), dtype=self.dtype)


class TransposeTokens:
    """``(B, T, d) -> (B, d, T)`` (``x.transpose(1, 2)``) for ``tokens = T``, ``width = d`` (module text)."""

    kind = "transpose_tokens"
    names = ()
    spec_fields = {"tokens": int, "width": int}
    per_token = True  # takes token batches (B, T, ·)

    def __init__(self, tokens: int, width: int):
        for name, v in (("tokens", tokens), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"TransposeTokens: {name} must be an int ≥ 1, got {v!r}")
        self._T, self._d = int(tokens), int(width)

    tokens = property(lambda self: self._T, doc="T of the input (B, T, d)")
    width = n_in = property(lambda self: self._d, doc="d of the input")
    n_out = property(lambda self: self._T, doc="per token of the output (B, d, T): T")
    in_shape = property(lambda self: (self._d,))
    out_shape = property(lambda self: (self._T,))
    params = property(lambda self: [], doc="none: ``[]``")

    def spec(self) -> dict:
        return {"kind": self.kind, "tokens": self._T, "width": self._d}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "TransposeTokens":
        return cls(spec["tokens"], spec["width"])

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple:
        """``(None, None)``: no arrays declare its widths."""
        return None, None

    @staticmethod
    def spec_widths(spec: dict) -> tuple:
        """``(d, T)``: the widths a file's ``spec`` gives it (it has no arrays to declare them)."""
        return int(spec["width"]), int(spec["tokens"])

    def param_leaves(self) -> list:
        return []

    def __repr__(self) -> str:
        return f"TransposeTokens({self._T}, {self._d})"

    def output_lead(self, B) -> tuple:
        """The leading dimensions of the output: ``(B, T) -> (B, d)``."""
        lead = self._lead(B)
        return (lead[0], self._d)

    def _lead(self, B) -> tuple:
        lead = lead_shape(B)
        if len(lead) != 2 or lead[1] != self._T:
            raise ValueError(f"{self!r} takes token batches (B, {self._T}, {self._d}), not leading dimensions {lead}")
        return lead

    def forward_shapes(self, B) -> list:
        return [(self._lead(B)[0], self._d, self._T)]

    def backward_shapes(self, B, input_grad: bool = True) -> list:
        return [self._lead(B) + (self._d,)] if input_grad else []

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, T, d) -> (B, d, T)``; the state is the input (its dtype and device)."""
        if z.ndim != 3 or z.shape[1:] != (self._T, self._d):
            at = where if isinstance(where, str) else f"layer {where}"
            raise ValueError(f"{at} ({self!r}): input of shape {shape_str(z.shape)}, needs (B, {self._T}, {self._d})")
        y = _buffers(out, self.forward_shapes(z.shape[:2]), z)[0]
        y[...] = z.swapaxes(1, 2)
        return y, z

    def factor(self, state) -> TransposeFactor:
        return TransposeFactor(self._T, self._d, state)

    def backward(self, state, g, grads, input_grad: bool = True, check=None, where: Any = 0, sq=None, out=None):
        """``(gᵀ or None, g)``: ``g = ∂L/∂y: (B, d, T)`` only read; no parameters."""
        if not input_grad:
            return None, g
        gin = _buffers(out, self.backward_shapes((g.shape[0], self._T), True), g)[-1]
        gin[...] = g.swapaxes(1, 2)
        return gin, g


register_layer("transpose_tokens", TransposeTokens)
