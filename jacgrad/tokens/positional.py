"""``PositionalEmbedding``: a learned additive table of positions, ``(B, T, d) -> x + table[:T]``
(ViT's ``pos_embed``, GPT's ``pos_emb(arange(T))``), and its Jacobian factor.

Its input Jacobian is the identity; its parameter leaf is an ``Embedding``'s leaf over the
positions ``0 … T-1`` of every sample (``jacgrad.tokens.embedding_leaf``, one implementation):
the per-sample gradient is ``∇_table ℓ_i = δ_i`` in rows ``0 … T-1``, zero in rows ``≥ T``.

    >>> import numpy as np
    >>> L = PositionalEmbedding(np.arange(6.0).reshape(3, 2))
    >>> L.forward(np.zeros((1, 2, 2)))[0][0]
    array([[0., 1.],
           [2., 3.]])
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.validation import float_array, shape_str
from ..core.backend import asarray, get_xp, is_foreign_array
from ..algebra.jacobian import _check_sample_selection
from .embedding_leaf import EmbeddingLeaf, EmbeddingTokens, embedding_param_jvp, embedding_sq_norms
from .embedding_leaf import embedding_weighted_sum
from ..protocol.layer import buffers, register_layer

__all__ = ["IdentityLeafFactor", "PositionalEmbedding", "positions"]


def positions(B: int, T: int, T_max: int, xp=np) -> EmbeddingTokens:
    """The leaf input of a positional table: position ids ``(B, T)`` (each row ``0 … T-1``) of a
    vocabulary of ``T_max`` positions."""
    return EmbeddingTokens(xp.broadcast_to(xp.arange(T, dtype=np.int64), (B, T)), None, T_max)


class PositionalEmbedding:
    """``y[b, t] = x[b, t] + table[t]``: ``x: (B, T, d)`` with ``T ≤ T_max``, ``table: (T_max, d)``
    (kept by reference). A token layer: it takes token batches only (a ``(B, d)`` input has no
    positions and is refused)."""

    kind = "positional_embedding"
    names = ("table",)
    spec_fields: dict = {}
    per_token = True  # takes token batches (B, T, ·): what Sequential.takes_tokens asks of every layer

    def __init__(self, table: Any):
        xp = get_xp(asarray(table) if is_foreign_array(table) else table)
        table = float_array(table, "PositionalEmbedding: table", xp)
        if table.ndim != 2 or min(table.shape) < 1:
            raise ValueError(f"PositionalEmbedding: table must be 2-D (T_max, d) with both ≥ 1, got shape "
                             f"{shape_str(table.shape)}")
        self._table = table

    table = property(lambda self: self._table, doc="``(T_max, d)``")
    T_max = property(lambda self: self._table.shape[0], doc="the most positions an input may have")
    d = n_in = n_out = property(lambda self: self._table.shape[1], doc="the token width d")
    in_shape = property(lambda self: (self.d,), doc="per token: ``(d,)``")
    out_shape = property(lambda self: (self.d,), doc="per token: ``(d,)``")
    dtype = property(lambda self: self._table.dtype)

    @property
    def params(self) -> list:
        return [self._table]

    def spec(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "PositionalEmbedding":
        """The layer of a file: the table by name."""
        return cls(params["table"])

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple[int, int]:
        """``(d, d)`` from a file's declared ``{"table": (shape, file key)}``; a ``ValueError``
        naming the key when the table is not 2-D."""
        shape, key = shapes["table"]
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{where} (positional_embedding): array {key!r} has shape {shape_str(shape)}; "
                             f"needs (T_max, d)")
        return int(shape[1]), int(shape[1])

    def __repr__(self) -> str:
        return f"PositionalEmbedding({self.T_max}, {self.d})"

    def _where(self, where) -> str:
        return f"{where if isinstance(where, str) else f'layer {where}'} ({self!r})"

    def _lead(self, B) -> tuple:
        if not isinstance(B, (tuple, list)) or len(B) != 2:
            raise ValueError(f"{self!r}: buffer shapes need the token batch (B, T), got {B!r}")
        if int(B[1]) > self.T_max:
            raise ValueError(f"{self!r}: {int(B[1])} tokens, more than the table's T_max = {self.T_max} positions")
        return int(B[0]), int(B[1])

    def forward_shapes(self, B) -> list:
        """For a token batch ``B = (B, T)``: the output ``(B, T, d)``."""
        return [self._lead(B) + (self.d,)]

    def backward_shapes(self, B, input_grad: bool = True) -> list:
        """``∂L/∂x: (B, T, d)`` when ``input_grad``."""
        return [self._lead(B) + (self.d,)] if input_grad else []

    def _check_input(self, z, where) -> None:
        shape = tuple(getattr(z, "shape", ()))
        if len(shape) != 3 or shape[2] != self.d:
            raise ValueError(f"{self._where(where)}: the input has shape {shape_str(shape)}; needs a token batch "
                             f"(B, T, {self.d})")
        if shape[1] > self.T_max:
            raise ValueError(f"{self._where(where)}: the input has T = {shape[1]} tokens, more than the table's "
                             f"T_max = {self.T_max} positions")

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, T, d) -> y = z + table[:T]``; returns ``(y, state)``, ``state`` the positions
        (an ``EmbeddingTokens`` of ``(B, T)`` ids)."""
        self._check_input(z, where)
        B, T, _ = z.shape
        (y,) = buffers(out, self.forward_shapes((B, T)), z)
        get_xp(z, self._table).add(z, self._table[:T], out=y)
        if check is not None:
            check(y, f"{self._where(where)}: output")
        return y, positions(B, T, self.T_max, get_xp(z))

    def factor(self, state) -> "IdentityLeafFactor":
        """The Jacobian factor: the identity on ``(B, T, d)``, split at the table's leaf."""
        return IdentityLeafFactor(state, self._table)

    def param_leaves(self) -> list:
        """One ``EmbeddingLeaf`` (the table), paired with the positions (``param_input``)."""
        return [EmbeddingLeaf()]

    def param_input(self, state):
        """The leaf's ``A``: the positions ``(B, T)`` (their one-hot is never built)."""
        return state

    def param_jvp(self, state, dirs: Sequence[Any]):
        """``ẏ = tablė[:T]`` per sample, ``(B, T, d)``, for the direction ``dirs = [tablė]``."""
        return embedding_param_jvp(state, dirs[0])

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``g = ∂L/∂y: (B, T, d)`` (only read); writes ``∂table`` (``Σ_i g_i`` in rows ``:T``, zero
        below) into ``grads[0]``; returns ``(∂L/∂x = g (a copy), δ = g)``. ``sq: (B,)`` gets
        ``‖g_i‖²`` added."""
        B, T = state.shape
        g = float_array(g, f"{self._where(where)}: grad_y", get_xp(g, self._table))
        if g.shape != (B, T, self.d):
            raise ValueError(f"{self._where(where)}: grad_y has shape {shape_str(g.shape)}; needs "
                             f"{shape_str((B, T, self.d))}")
        embedding_weighted_sum(state, g, None, out=grads[0])
        if sq is not None:
            sq += embedding_sq_norms(state, g)
        gin = None
        if input_grad:
            (gin,) = buffers(out, self.backward_shapes((B, T), True), g)
            gin[...] = g
            if check is not None:
                check(gin, f"{self._where(where)}: ∂L/∂x")
        return gin, g


class IdentityLeafFactor:
    """The Jacobian factor of an additive parameter on a token batch ``(B, T, d)``: the identity on
    the input, and a leaf (``EmbeddingLeaf`` over the positions ``state``) at the output:
    ``param_vjp_stack`` hands the cotangent rows on both to the leaf (as its ``G``) and to the input;
    ``param_jvp`` adds the leaf's tangent to the input tangent. ``dense()`` is the per-sample identity
    on the flattened tokens, ``(B, T·d, T·d)`` (what ``Chain.jacobian`` of a token chain reads)."""

    n_leaves = 1
    per_sample = property(lambda self: True)

    def __init__(self, state, table):
        self.state, self.table = state, table
        self.batch, self.tokens = state.shape
        self.h_in = self.h_out = table.shape[1]

    dtype = property(lambda self: self.table.dtype)
    xp = property(lambda self: get_xp(self.table))
    anchor = property(lambda self: self.table)
    row_cost = property(lambda self: self.tokens * self.h_in, doc="a copy of each sample's T·d entries")
    dense_cost = property(lambda self: 0)

    def __repr__(self) -> str:
        return f"IdentityLeafFactor(B={self.batch}, T={self.tokens}, d={self.h_in})"

    def _check(self, a, what: str, stack: bool):
        want = (self.batch, "R", self.tokens, self.h_in) if stack else (self.batch, self.tokens, self.h_in)
        got = tuple(a.shape)
        if len(got) != len(want) or any(w != "R" and g != w for g, w in zip(got, want)):
            raise ValueError(f"{what} has shape {got} but this positional factor needs ({', '.join(map(str, want))})")
        return a

    def param_vjp_stack(self, A, need_input: bool = True):
        """``([A], A)``: ``A: (B, R, T, d)`` is the leaf's ``G`` and (a copy) the input cotangent."""
        self._check(A, "cotangent stack", True)
        return [A], (A.copy() if need_input else None)

    def param_jvp(self, t, leaf_tangent):
        """The input tangent ``t: (B, T, d)`` (None: 0) plus the leaf's ``tablė[:T]``."""
        return leaf_tangent(0, None if t is None else self._check(t, "tangent", False))

    def vjp(self, v):
        """``(B, T, d) -> (B, T, d)``: the identity (a copy)."""
        return self._check(v, "cotangent", False).copy()

    def jvp(self, u):
        return self._check(u, "tangent", False).copy()

    def vjp_stack(self, A):
        """``(B, R, T, d) -> (B, R, T, d)``: the identity (a copy)."""
        return self._check(A, "cotangent stack", True).copy()

    def jvp_stack(self, A):
        return self._check(A, "tangent stack", True).copy()

    def dense(self, transposed: bool = False):
        n = self.tokens * self.h_in
        return self.xp.broadcast_to(self.xp.eye(n, dtype=self.dtype), (self.batch, n, n)).copy()

    def rows(self, sel) -> "IdentityLeafFactor":
        _check_sample_selection(sel)
        return IdentityLeafFactor(self.state[sel], self.table)

    def norm_bound(self):
        return self.xp.ones(self.batch, dtype=self.dtype)

    def singular_values(self):
        return self.xp.ones((self.batch, self.tokens * self.h_in), dtype=self.dtype)


register_layer("positional_embedding", PositionalEmbedding)
