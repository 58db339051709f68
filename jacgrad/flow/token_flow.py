"""What the gradient-flow report of a ``Sequential`` reads differently on a token batch ``(B, T, d)``
(token ids ``(B, T)`` into an ``Embedding``): the chain on each sample's flattened tokens, the
embedded input, the per-sample cotangents of ``(B, T, n_out)`` outputs, and the token rows of a
per-token layer.

Definitions (``jacgrad.flow.block_flow``, ``layer_rows``): a block's Jacobian on a token batch is
sample i's ``J_i: (T·n_out, T·n_in)`` of its flattened tokens (the row's shape is ``T·n_in x T·n_out``),
and its χ is ``‖J_i‖_F²/(T·n_out)`` averaged over the samples: the mean over every (sample, token)
row of ``‖∂y_{i,t}/∂x_i‖_F²/n_out``, the dense report's per-sample χ taken per token row. For a
per-token layer (block-diagonal ``J_i``) that is the mean of its per-token-row Jacobians'
``‖J_{i,t}‖_F²/n_out``; attention couples the tokens and its rows count every token's input. A block's
``‖J‖₂`` and bound are of the whole ``J_i`` (for a per-token block: the largest over its tokens),
averaged over the samples. The ``.layers`` rows of per-token layers (Dense, norms) are per token row:
χ, ‖J‖₂ (and a Dense's bound, φ' statistics) averaged over the B·T rows, dead units: a feature whose
φ' is 0 on every token of every sample; attention's row: χ and ‖J‖₂ of its flattened tokens per
sample, its gradient norms over its four weights (``grad_norm``) and biases (``bias_grad_norm``). An ``Embedding`` has no
continuous input (ids): its block has ``h_in = 0`` (χ and ‖J‖₂ are 0 and it is left out of the
verdict), and the input-output spectrum is that of the embedded input, ``(T·n_out, T·d)``, from
the chain after the ``Embedding``.
"""

from __future__ import annotations

import numpy as np

from ..algebra.chain import Chain
from ..core.backend import get_xp
from ..distributed.budget import default_max_memory, rows_per_task

__all__ = ["is_token_batch", "reduce_tokens", "report_chains", "token_rows"]


def is_token_batch(net, x) -> bool:
    """Whether ``x`` is a token batch ``(B, T, *in_shape)`` (ids ``(B, T)`` for an ``Embedding``)."""
    return bool(getattr(net, "takes_tokens", False)) and getattr(x, "ndim", 0) == len(net.in_shape) + 2


def report_chains(chain: Chain):
    """``(blocks, whole)``: the chain whose factors the block rows measure, and the chain of the
    input-output spectrum — the chain itself twice on ``(B, n)`` rows; on tokens, its
    ``flat_tokens()``, and that without a first ``Embedding`` (width-0 input: the embedded input)."""
    if chain.tokens is None:
        return chain, chain
    flat = chain.flat_tokens()
    if flat.n_in == 0 and len(flat) > 1:
        return flat, Chain(flat.factors[1:])
    return flat, flat


def token_rows(sel, tokens: int):
    """The token rows ``b·T + t`` of the samples ``sel`` (host indices; None stays None)."""
    if sel is None:
        return None
    return (np.asarray(sel, dtype=np.int64)[:, None] * tokens + np.arange(tokens)).reshape(-1)


def reduce_tokens(chunk, combine, net, x, targets, bytes_per_sample: int, max_memory):
    """``distributed.reduce_in_memory`` for a token batch (``jacgrad.distributed`` reads ``(B, n)``
    rows): ``chunk(net, x[a:b], *targets[a:b], start=a)`` over runs of whole samples that fit in
    ``max_memory`` (``bytes_per_sample`` each; None: the default budget of a NumPy batch, one go on
    CuPy), merged by ``combine``."""
    B = int(x.shape[0])
    rows = B
    if get_xp(x) is np or max_memory is not None:
        rows = rows_per_task(bytes_per_sample, default_max_memory(x) if max_memory is None else max_memory)
    p = None
    for a in range(0, B, rows):
        q = chunk(net, x[a:a + rows], *[t[a:a + rows] for t in targets], start=a)
        p = q if p is None else combine(p, q)
    return p
