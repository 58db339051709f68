"""The ``.layers`` rows of a ``Sequential``'s gradient-flow report: one per parameterised layer
(a residual block's inner layers included, in parameter order), as mergeable partials. A Dense's row
is an MLP report's row (``_flow.layer_partial`` / ``layer_row`` on its factor ``diag(d)·Wᵀ``), with
``delta_norm`` None inside a residual block (its δ is not kept); a norm layer's row has its gradient
norms (γ, and β as ``bias_grad_norm``) and None in the fields that are a dense layer's.

What the report reads differently on a token batch ``(B, T, d)`` (token ids ``(B, T)`` into an
``Embedding``): the chain on each sample's flattened tokens, the embedded input, the per-sample
cotangents of ``(B, T, n_out)`` outputs, and the token rows of a per-token layer. A block's Jacobian on a token batch is
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

import math

import numpy as np

from .statistics import LayerFlow, layer_row, layer_sums, measure_norms, merge_layer
from ..algebra.chain import Chain
from ..algebra.per_sample import container_factors
from ..algebra.token_factor import FlatTokens, TokenFactor
from ..core.backend import get_xp, to_numpy
from ..distributed.budget import default_max_memory, rows_per_task

__all__ = ["finish_leaves", "is_token_batch", "leaf_partials", "merge_leaves", "reduce_tokens", "report_chains",
           "token_rows"]


def leaf_partials(xp, layers, chain, grads, B: int, factor: float, seed: int, sel, measure=None,
                  poisoned: int | None = None) -> list[dict]:
    """Per parameterised layer its partial over the chunk (``B`` samples; the gradients times
    ``factor``, B for a mean loss); ``sel``: the rows whose ‖J‖₂ is measured (None: all).
    ``measure(F, k, T) -> (Σχ, Σ‖J‖₂)`` per sample of a factor on ``T`` rows per sample: on a token
    batch, a norm's row gets its token rows' χ and ‖J‖₂, attention's those of its flattened tokens
    (``jacgrad.flow.layer_rows``; None on ``(B, d)`` rows). ``poisoned``: the first row whose
    numbers are NaN (its layer's output overflowed in the forward pass), None: none."""
    rows = []
    for k, (L, F, gr, delta) in enumerate(_leaves(layers, chain.factors, grads.layers, grads.deltas)):
        lp = leaf_partial(xp, k, L, F, gr, delta, B, factor, seed, sel, poisoned is not None and k >= poisoned)
        if measure is not None and "delta2" not in lp and getattr(F, "tokens", None) is not None and F.h_in:
            # per token (norms): its token rows' χ and ‖J‖₂, as a Dense's; attention couples the tokens: per sample
            lp["chi_sum"], lp["norm_sum"] = (measure(F.inner, k, F.tokens) if isinstance(F, TokenFactor)
                                             else measure(FlatTokens(F), k, 1))
        rows.append(lp)
    measure_norms(xp, rows)  # every Dense's ‖W‖₂ and per-sample ‖J‖₂, the layers of one size together
    return rows


def merge_leaves(a: list[dict], b: list[dict]) -> list[dict]:
    """Two chunks' leaf partials, merged."""
    return [merge_layer(la, lb) if "delta2" in la else dict(la, grad=la["grad"] + lb["grad"], bias_grad=None
            if la["bias_grad"] is None else la["bias_grad"] + lb["bias_grad"],
            **{s: la[s] + lb[s] for s in ("chi_sum", "norm_sum") if s in la}) for la, lb in zip(a, b)]


def _leaves(layers, factors, grads, deltas):
    """``(layer, factor, gradients by name, δ or None)`` of every parameterised layer, containers
    (``layers``: a residual block) opened, in parameter order; δ = ∂L/∂h of a top-level dense row (an
    inner layer's is not kept)."""
    for L, F, gr, d in zip(layers, factors, grads, deltas):
        if getattr(L, "layers", None) is not None:  # the protocol's container (protocol.layer.leaf_layers)
            yield from _leaves(L.layers, container_factors(F), gr, [None] * len(L.layers))
        elif L.params:
            yield L, F, gr, d if _dense_row(L) else None


def _dense_row(L) -> bool:
    """Whether ``L``'s row is an MLP layer's (``statistics.layer_partial`` of its factor ``diag(φ')·Wᵀ``):
    a layer that keeps the one array its factor's φ' is read from (the protocol's ``kept`` hook)."""
    return hasattr(L, "kept")


def leaf_partial(xp, k: int, L, F, grads: dict, delta, B: int, factor: float, seed: int, sel,
                 poisoned: bool = False) -> dict:
    """Leaf ``k``'s sums over the chunk: a Dense's those of an MLP's layer row (``_flow.layer_partial``;
    ``delta2`` None where its δ is not kept; its spectral norms still to measure: ``statistics.measure_norms``);
    a norm layer's its parameter gradients (times ``factor``)."""
    if _dense_row(L):
        T = getattr(F, "tokens", None)
        if T is not None:  # a token batch: the statistics of the B·T token rows (jacgrad.flow.layer_rows)
            F, B, sel = F.inner, B * T, token_rows(sel, T)
            delta = None if delta is None else delta.reshape(B, L.n_out)
        shim = _Grads({k: delta if delta is not None else xp.zeros((B, L.n_out), dtype=L.W.dtype)},
                      {k: grads["W"] if factor != 1 else grads["W"].copy()},
                      {k: None if "b" not in grads else grads["b"] if factor != 1 else grads["b"].copy()})
        lp = layer_sums(xp, k, F, L.activation, shim, factor, seed, poisoned, sel)  # its norms: measure_norms
        return lp if delta is not None else dict(lp, delta2=None)
    # fresh arrays (the pooled gradient block is reused); biases: the names "b…" ("bias", "beta", attention's "bq", …)
    weights = [grads[n] * factor for n in L.names if not n.startswith("b")]
    biases = [grads[n] * factor for n in L.names if n.startswith("b")]
    if len(weights) > 1 or len(biases) > 1:  # several projections (attention's q, k, v, out): together
        return dict(shape=(L.n_in, L.n_out), activation=L.kind, grad=xp.concatenate([a.ravel() for a in weights]),
                    bias_grad=xp.concatenate([a.ravel() for a in biases]) if biases else None)
    return dict(shape=(L.n_in, L.n_out), activation=L.kind, grad=weights[0], bias_grad=biases[0] if biases else None)


class _Grads:
    """What ``_flow.layer_partial`` reads of a ``Gradients``: ``deltas``, ``weights``, ``biases`` by index."""

    def __init__(self, deltas, weights, biases):
        self.deltas, self.weights, self.biases = deltas, weights, biases


def finish_leaves(p: dict) -> list[LayerFlow]:
    """A ``LayerFlow`` per parameterised layer: a Dense's as in an MLP's report (``delta_norm`` None
    inside a residual block); a norm layer's gradient norms (γ; β as ``bias_grad_norm``), None elsewhere."""
    N = p["count"]
    per = N if p["loss_sum"] is not None else 1
    arrays = [a for lp in p["layers"] for a in (lp["grad"], lp["bias_grad"]) if a is not None]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed gradient's norm is inf (or NaN), no warning
        sq = iter(to_numpy(get_xp(*arrays).stack([(a * a).sum() for a in arrays])).astype(np.float64)
                  if arrays else ())  # one transfer
    rows = []
    for k, lp in enumerate(p["layers"]):
        g2, b2 = (math.nan if a is None else float(next(sq)) for a in (lp["grad"], lp["bias_grad"]))
        if "delta2" in lp:  # lp["count"]: its rows, N samples or, on a token batch, the N·T token rows
            rows.append(layer_row(k, lp, lp["count"], per, g2, b2))
        else:
            measured = "chi_sum" in lp  # a norm or attention on tokens: χ and ‖J‖₂ of its flattened tokens
            rows.append(LayerFlow(k, lp["shape"], lp["activation"], math.sqrt(g2) / per,
                                  None if lp["bias_grad"] is None else math.sqrt(b2) / per, None,
                                  lp["norm_sum"] / (p["norm_count"] or math.nan) if measured else None,
                                  *([None] * 6), lp["chi_sum"] / N if measured else None,
                                  finite=math.isfinite(g2) and (lp["bias_grad"] is None or math.isfinite(b2))))
    return rows


# ---------------------------------------------------------------------------- token batches
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
