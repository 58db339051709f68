"""``Embedding``: torch's ``nn.Embedding`` as a jacgrad layer, ``(B, T)`` integer tokens ->
``(B, T, d)`` rows of ``E: (V, d)``, and the algebra of its parameter leaf.

Its parameter leaf pairs the one-hot of the tokens with ``Δ = ∂L/∂y``; its per-sample algebra
(squared norms by the token-equality Gram, fill, NTK cross term, GGN diagonal, parameter JVP) is
``jacgrad.tokens.embedding_leaf``, which takes the layer's state (``param_input``) and never builds the
one-hot.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers.Embedding(np.arange(6.0).reshape(3, 2))
    >>> y, state = L.forward(np.array([[2, 0, 2]]))
    >>> y[0]
    array([[4., 5.],
           [0., 1.],
           [4., 5.]])
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.validation import float_array, ids_are_checked, shape_str
from ..core.backend import asarray, get_xp, is_foreign_array
from .embedding_leaf import EmbeddingFactor, EmbeddingLeaf, EmbeddingTokens, embedding_param_jvp, embedding_sq_norms
from .embedding_leaf import embedding_weighted_sum
from ..protocol.layer import register_layer

__all__ = ["Embedding"]


class Embedding:
    """``y[b, t] = E[tok[b, t]]``: ``tok: (B, T)`` integers in ``[0, V)``, ``E: (V, d)`` (torch's
    ``weight``, same layout). ``padding_idx``: a row whose gradient is always 0 (torch's). Kept by
    reference; keeps the tokens for backward. Its input is discrete: its Jacobian factor has input
    width 0 (``EmbeddingFactor``)."""

    kind = "embedding"
    names = ("E",)
    spec_fields = {"padding_idx": (int, type(None))}
    per_token = True  # takes token batches (B, T, ·): what Sequential.takes_tokens asks of every layer

    def __init__(self, E: Any, padding_idx: int | None = None):
        xp = get_xp(asarray(E) if is_foreign_array(E) else E)
        E = float_array(E, "Embedding: E", xp)
        if E.ndim != 2 or min(E.shape) < 1:
            raise ValueError(f"Embedding: E must be 2-D (V, d) with both ≥ 1, got shape {shape_str(E.shape)}")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
                raise TypeError(f"Embedding: padding_idx must be an int or None, got {padding_idx!r}")
            padding_idx = int(padding_idx) + (E.shape[0] if padding_idx < 0 else 0)
            if not 0 <= padding_idx < E.shape[0]:
                raise ValueError(f"Embedding: padding_idx must lie in [-{E.shape[0]}, {E.shape[0]}), got {padding_idx}")
        self._E, self._pad = E, padding_idx

    E = property(lambda self: self._E, doc="``(V, d)``")
    padding_idx = property(lambda self: self._pad)
    num_embeddings = n_in = property(lambda self: self._E.shape[0], doc="V, the number of tokens")
    d = n_out = property(lambda self: self._E.shape[1], doc="the embedding width d")
    in_shape = property(lambda self: (), doc="per token: ``()`` (inputs ``(B, T)`` integers)")
    out_shape = property(lambda self: (self.d,), doc="per token: ``(d,)``")
    dtype = property(lambda self: self._E.dtype)

    @property
    def params(self) -> list:
        return [self._E]

    def spec(self) -> dict:
        return {"kind": self.kind, "padding_idx": self._pad}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "Embedding":
        """The layer of a file: ``spec`` (``spec()``'s fields) and the arrays by name."""
        return cls(params["E"], padding_idx=spec["padding_idx"])

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple[int, int]:
        """``(V, d)`` from a file's declared shapes ``{"E": (shape, file key)}``; a ``ValueError``
        naming the key when E is not 2-D."""
        shape, key = shapes["E"]
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{where} (embedding): array {key!r} has shape {shape_str(shape)}; needs (V, d)")
        return int(shape[0]), int(shape[1])

    def __repr__(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.d}{'' if self._pad is None else f', padding_idx={self._pad}'})"

    def forward_shapes(self, B) -> list:
        """For a token batch ``B = (B, T)``: the output ``(B, T, d)``."""
        if not isinstance(B, (tuple, list)) or len(B) != 2:
            raise ValueError(f"{self!r}: buffer shapes need the token batch (B, T), got {B!r}")
        return [(int(B[0]), int(B[1]), self.d)]

    def backward_shapes(self, B, input_grad: bool = False) -> list:
        """Nothing: the gradient is written into ``grads``, and the tokens have no input gradient."""
        return []

    def _where(self, where) -> str:
        return f"{where if isinstance(where, str) else f'layer {where}'} ({self!r})"

    def check_tokens(self, tok, where: Any = 0):
        """``tok`` checked: an integer ``(B, T)`` array on the layer's device, every id in ``[0, V)``;
        else a ``TypeError``/``ValueError``/``IndexError`` naming the layer."""
        tok = asarray(tok) if is_foreign_array(tok) else tok
        if not hasattr(tok, "dtype"):
            tok = get_xp(self._E).asarray(tok)
        xp = get_xp(tok, self._E)
        if np.dtype(tok.dtype).kind not in "iu":
            raise TypeError(f"{self._where(where)}: tokens have dtype {tok.dtype}; needs integer token ids "
                            f"(a float or bool array is not cast silently)")
        if tok.ndim != 2:
            raise ValueError(f"{self._where(where)}: tokens have shape {shape_str(tok.shape)}; needs (B, T)")
        if tok.size and not ids_are_checked():  # a compiled step checked them at load
            lo, hi = int(tok.min()), int(tok.max())
            if lo < 0 or hi >= self.num_embeddings:
                bad = lo if lo < 0 else hi
                at = tuple(int(i) for i in xp.argwhere(tok == bad)[0])
                raise IndexError(f"{self._where(where)}: token id {bad} at (sample, position) {at} is out of range: "
                                 f"ids must lie in [0, {self.num_embeddings})")
        return tok

    def forward(self, tok, check=None, where: Any = 0, out=None):
        """``tok: (B, T)`` integers -> ``y: (B, T, d)``; returns ``(y, state)``, ``state = tok``."""
        tok = self.check_tokens(tok, where)
        xp = get_xp(self._E)
        y = out[0] if out is not None else xp.empty(tok.shape + (self.d,), self.dtype)
        xp.take(self._E, tok, axis=0, out=y)
        if check is not None:
            check(y, f"{self._where(where)}: output")
        return y, self._state(tok)

    def _state(self, tok):
        return EmbeddingTokens(tok, self._pad, self.num_embeddings)

    def factor(self, state) -> EmbeddingFactor:
        """The Jacobian factor: of width 0 on the input side (token ids are discrete), all leaf
        (``embedding_leaf.EmbeddingFactor``)."""
        return EmbeddingFactor(state, self._E)

    def param_leaves(self) -> list:
        """One ``EmbeddingLeaf`` (``E``), paired with the tokens (``param_input``)."""
        return [EmbeddingLeaf()]

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = False, check=None, where: Any = 0,
                 sq=None, out=None):
        """``g = ∂L/∂y: (B, T, d)`` (only read); writes ``∂E`` (the scatter-add of g's rows by token)
        into ``grads[0]``; returns ``(None, g)``: tokens have no input gradient (``input_grad`` is
        ignored). ``sq: (B,)`` gets ``‖∇_E ℓ_i‖²`` of these ``g`` added."""
        g = float_array(g, f"{self._where(where)}: grad_y", get_xp(g, self._E))
        if g.shape != state.tok.shape + (self.d,):
            raise ValueError(f"{self._where(where)}: grad_y has shape {shape_str(g.shape)}; the tokens were "
                             f"{shape_str(state.tok.shape)}: needs {shape_str(state.tok.shape + (self.d,))}")
        embedding_weighted_sum(state, g, None, out=grads[0])
        if sq is not None:
            sq += embedding_sq_norms(state, g)
        return None, g

    def param_input(self, state):
        """The leaf's ``A``: the tokens (``state``; the one-hot ``(B, T, V)`` is never built — the
        ``embedding_*`` functions of this module take it)."""
        return state

    def param_jvp(self, state, dirs: Sequence[Any]):
        """``ẏ = Ė[tok]: (B, T, d)`` for the direction ``dirs = [Ė]``."""
        return embedding_param_jvp(state, dirs[0])

    def to_torch(self):
        """A torch ``nn.Embedding`` with a copy of E (same dtype, padding_idx)."""
        import torch

        from ..core.backend import to_numpy

        m = torch.nn.Embedding(self.num_embeddings, self.d, padding_idx=self._pad,
                               dtype=getattr(torch, str(self.dtype)))
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(to_numpy(self._E))))
        return m


register_layer("embedding", Embedding)
