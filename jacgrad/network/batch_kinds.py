"""Which layers of a network run on which batches, checked before a compiled step is built: a
step's buffers are ``(batch, n)`` (a layer that runs on token batches ``(B, T, ·)`` only refuses
them), and ``compile(B, tokens=T)`` asks every layer to act per token (a convolution, a pool does
not). Both name the first layer that refuses, by its place in the network (``1.0`` inside a
residual block)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..nn.layers import leaf_layers
from ..nn.stack import layer_leads

__all__ = ["check_batch_kind", "refuse_per_sample_only", "refuse_token_only"]


def check_batch_kind(layers: Sequence[Any], batch: Any, tokens: Any, what: str) -> None:
    """What ``compile`` and ``compile_jacobian`` (``what``) check before building a step: without
    ``tokens``, that no layer runs on token batches only; with ``tokens=T``, that every layer acts
    per token."""
    if tokens is None:
        refuse_token_only(layers, batch, what)
    else:
        refuse_per_sample_only(layers, tokens)


def refuse_token_only(layers: Sequence[Any], batch: Any, what: str) -> None:
    """A ``ValueError`` naming the first layer that runs on token batches ``(B, T, ·)`` only (its
    ``forward_shapes(batch)`` refuses an int batch: ``MultiHeadAttention``, ``Embedding``): a
    compiled step's buffers are ``(batch, n)``. ``what``: the call refused (``"compile"``,
    ``"compile_jacobian"``)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        return  # the step's own check names a bad batch
    lead = int(batch)  # handed on through the layers that change the token axis (an image -> tokens)
    for j, top in enumerate(layers):
        for path, L in leaf_layers([top], (j,)):
            try:
                L.forward_shapes(lead)
            except ValueError:
                how = ("compile token batches with compile(batch, tokens=T)" if what == "compile" else
                       "a compiled step's buffers are (batch, features): use loss_and_grads on token batches")
                raise ValueError(f"{what}: layer {'.'.join(map(str, path[:1] + path[2:]))} ({L!r}) runs on token "
                                 f"batches (B, T, ·) only; {how}") from None
        lead = layer_leads([top], lead)[-1]


def refuse_per_sample_only(layers: Sequence[Any], tokens: Any) -> None:
    """A ``ValueError`` naming the first layer that does not act per token (a convolution, a pool:
    no ``per_token``, what ``takes_tokens`` asks of every layer), for ``compile(B, tokens=T)``."""
    for path, L in leaf_layers(layers):
        if not getattr(L, "per_token", False):
            raise ValueError(f"compile(tokens={tokens}): layer {'.'.join(map(str, path))} ({L!r}) does not run "
                             f"on token batches (B, T, ·); compile this network without tokens=")
