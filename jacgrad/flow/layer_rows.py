"""The ``.layers`` rows of a ``Sequential``'s gradient-flow report: one per parameterised layer
(a residual block's inner layers included, in parameter order), as mergeable partials. A Dense's row
is an MLP report's row (``_flow.layer_partial`` / ``layer_row`` on its factor ``diag(d)·Wᵀ``), with
``delta_norm`` None inside a residual block (its δ is not kept); a norm layer's row has its gradient
norms (γ, and β as ``bias_grad_norm``) and None in the fields that are a dense layer's.
"""

from __future__ import annotations

import math

import numpy as np

from .statistics import LayerFlow, layer_partial, layer_row, merge_layer
from .token_flow import token_rows
from ..algebra.token_factor import FlatTokens, TokenFactor
from ..core.backend import to_numpy
from ..nn.layers import Dense, Residual

__all__ = ["finish_leaves", "leaf_partials", "merge_leaves"]


def leaf_partials(xp, layers, chain, grads, B: int, factor: float, seed: int, sel, measure=None) -> list[dict]:
    """Per parameterised layer its partial over the chunk (``B`` samples; the gradients times
    ``factor``, B for a mean loss); ``sel``: the rows whose ‖J‖₂ is measured (None: all).
    ``measure(F, k, T) -> (Σχ, Σ‖J‖₂)`` per sample of a factor on ``T`` rows per sample: on a token
    batch, a norm's row gets its token rows' χ and ‖J‖₂, attention's those of its flattened tokens
    (``jacgrad.flow.token_flow``; None on ``(B, d)`` rows)."""
    rows = []
    for k, (L, F, gr, delta) in enumerate(_leaves(layers, chain.factors, grads.layers, grads.deltas)):
        lp = leaf_partial(xp, k, L, F, gr, delta, B, factor, seed, sel)
        if measure is not None and "delta2" not in lp and getattr(F, "tokens", None) is not None and F.h_in:
            # per token (norms): its token rows' χ and ‖J‖₂, as a Dense's; attention couples the tokens: per sample
            lp["chi_sum"], lp["norm_sum"] = (measure(F.inner, k, F.tokens) if isinstance(F, TokenFactor)
                                             else measure(FlatTokens(F), k, 1))
        rows.append(lp)
    return rows


def merge_leaves(a: list[dict], b: list[dict]) -> list[dict]:
    """Two chunks' leaf partials, merged."""
    return [merge_layer(la, lb) if "delta2" in la else dict(la, grad=la["grad"] + lb["grad"], bias_grad=None
            if la["bias_grad"] is None else la["bias_grad"] + lb["bias_grad"],
            **{s: la[s] + lb[s] for s in ("chi_sum", "norm_sum") if s in la}) for la, lb in zip(a, b)]


def _leaves(layers, factors, grads, deltas):
    """``(layer, factor, gradients by name, δ or None)`` of every parameterised layer, residual blocks
    opened, in parameter order; δ = ∂L/∂h of a top-level Dense (an inner layer's is not kept)."""
    for L, F, gr, d in zip(layers, factors, grads, deltas):
        if isinstance(L, Residual):
            yield from _leaves(L.layers, F.inner.factors, gr, [None] * len(L.layers))
        elif L.params:
            yield L, F, gr, d if isinstance(L, Dense) else None


def leaf_partial(xp, k: int, L, F, grads: dict, delta, B: int, factor: float, seed: int, sel) -> dict:
    """Leaf ``k``'s sums over the chunk: a Dense's those of an MLP's layer row (``_flow.layer_partial``;
    ``delta2`` None where its δ is not kept); a norm layer's its parameter gradients (times ``factor``)."""
    if isinstance(L, Dense):
        T = getattr(F, "tokens", None)
        if T is not None:  # a token batch: the statistics of the B·T token rows (jacgrad.flow.token_flow)
            F, B, sel = F.inner, B * T, token_rows(sel, T)
            delta = None if delta is None else delta.reshape(B, L.n_out)
        shim = _Grads({k: delta if delta is not None else xp.zeros((B, L.n_out), dtype=L.W.dtype)},
                      {k: grads["W"] if factor != 1 else grads["W"].copy()},
                      {k: None if "b" not in grads else grads["b"] if factor != 1 else grads["b"].copy()})
        lp = layer_partial(xp, k, F, L.activation, shim, factor, seed, False, sel)
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
    rows = []
    for k, lp in enumerate(p["layers"]):
        with np.errstate(over="ignore", invalid="ignore"):
            g2, b2 = (math.nan if a is None else float(to_numpy((a * a).sum())) for a in (lp["grad"], lp["bias_grad"]))
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
