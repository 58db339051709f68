"""``PerToken``: the token axis for a layer that acts on the last axis of its input, row by row.

A per-token layer (``Dense``, ``LayerNorm``, ``RMSNorm``) implements its passes on rows ``(N, n)``
(``_forward_rows``, ``_backward_rows``, ``_factor_rows``, ``_param_input_rows``); ``PerToken``
gives it the protocol's ``forward``/``backward``/``factor``/``param_input`` on ``(B, n)`` — those
very row passes, bit for bit — and on ``(B, T, n)``: the ``B·T`` rows in one GEMM, the state kept
as a ``TokenState``, the factor a ``TokenFactor``, ``a`` with its token axis ``(B, T, p)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .layer import lead_shape
from ..algebra.token_factor import TokenFactor

__all__ = ["PerToken", "TokenState"]


class TokenState(NamedTuple):
    """The state of a per-token layer on ``(B, T, n)``: its row state and ``lead = (B, T)``."""
    rows: Any
    lead: tuple


def _as_rows(bufs, N: int):
    return None if bufs is None else [b.reshape((N,) + tuple(b.shape[2:])) for b in bufs]


class PerToken:
    """Mixin: the protocol's passes of a per-token layer from its row passes (module text)."""

    per_token = True

    in_shape = property(lambda self: (self.n_in,), doc="per sample, without B: ``(n_in,)`` (a token axis may lead)")
    out_shape = property(lambda self: (self.n_out,), doc="per sample, without B: ``(n_out,)``")

    def _check_input(self, z) -> None:
        if getattr(z, "ndim", 0) not in (2, 3) or z.shape[-1] != self.n_in:
            raise ValueError(f"{type(self).__name__}: the input has shape {tuple(getattr(z, 'shape', ()))} but the "
                             f"layer takes (B, {self.n_in}) or, per token, (B, T, {self.n_in})")

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, n_in) -> (B, n_out)`` or, per token, ``(B, T, n_in) -> (B, T, n_out)``;
        returns ``(y, state)``; ``out``: the buffers of ``forward_shapes((B,)`` or ``(B, T))``."""
        self._check_input(z)
        if z.ndim == 2:
            return self._forward_rows(z, check, where, out)
        B, T = z.shape[:2]
        rows = z.reshape(B * T, z.shape[2])
        if getattr(self, "output_recomputable", False):  # nothing is recomputed on tokens: its derivative is kept
            y, st = self._forward_rows(rows, check, where, _as_rows(out, B * T), keep_derivative=True)
        else:
            y, st = self._forward_rows(rows, check, where, _as_rows(out, B * T))
        return y.reshape(B, T, y.shape[-1]), TokenState(st, (B, T))

    def passes_for(self, lead: Any) -> tuple:
        """``(forward, backward)`` for inputs of leading shape ``lead`` (``nn.stack.Plan``): on
        ``(B, n)`` (an int lead) the row passes themselves — the very calls ``forward``/``backward``
        make there, without the dispatch on the token axis (the network has checked the input's
        shape); on a token batch, or a layer on images (``in_shape`` ``(C, H, W)``), ``forward``/``backward``."""
        if isinstance(lead, int) and len(self.in_shape) == 1:
            return self._forward_rows, self._backward_rows
        return self.forward, self.backward

    def factor(self, state):
        """The Jacobian factor: of the rows, or a ``TokenFactor`` over them for a token batch."""
        if isinstance(state, TokenState):
            return TokenFactor(self._factor_rows(state.rows), state.lead)
        return self._factor_rows(state)

    def backward(self, state, g, grads, input_grad: bool = True, check=None, where: Any = 0, sq=None, out=None,
                 **kw):
        """``g = ∂L/∂y`` shaped as the output (only read); see the row pass ``_backward_rows``.
        ``sq: (B,)`` gets each sample's share of the squared gradient norm (over its tokens)."""
        if not isinstance(state, TokenState):
            return self._backward_rows(state, g, grads, input_grad, check, where, sq, out, **kw)
        B, T = state.lead
        gin, delta = self._backward_rows(state.rows, g.reshape(B * T, g.shape[-1]), grads, input_grad, check, where,
                                         None, _as_rows(out, B * T), **kw)
        delta = delta.reshape(B, T, delta.shape[-1])
        if sq is not None:
            sq += self.param_leaves()[0].sq_norms(self.param_input(state), delta)
        return (None if gin is None else gin.reshape(B, T, gin.shape[-1])), delta

    def param_input(self, state):
        """The ``a`` its leaf pairs with ``δ``: ``(B, p)``, or ``(B, T, p)`` for a token batch."""
        if not isinstance(state, TokenState):
            return self._param_input_rows(state)
        a = self._param_input_rows(state.rows)
        return a.reshape(state.lead + (a.shape[-1],))


def lead(B: Any) -> tuple:
    """``forward_shapes``' ``B`` as leading dimensions (``layer_protocol.lead_shape``)."""
    return lead_shape(B)
