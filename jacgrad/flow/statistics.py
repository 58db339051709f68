"""What ``gradient_flow`` measures, as mergeable partials: per chunk of samples, sums, counts and
maxima; ``merge`` combines two chunks exactly (up to floating-point summation order); ``finish``
turns the merged partial into the report's numbers. One batch is one chunk, so the same code
serves a single call and a map-reduce over a dataset (``partials`` per chunk, ``merge`` as the
combine step, ``finish`` once).

Everything is read off the per-sample factors ``J_j = diag(d_j) · W_jᵀ`` of
``net.jacobian_chain(cache)`` and stays on their device; per layer one transfer brings its
scalars (and its per-sample bounds) to the host, besides the Lanczos checks of ``‖J_j‖₂``
(``jacgrad.flow.layer_norms``) and the spectrum (``jacgrad.flow.io_spectrum``). Memory: a few ``(B, H)``
blocks per layer, one Gram matrix of the smaller side, and the gradient sums (one ``W_j``-shaped
array per layer) that a partial carries.

A partial (plain dict): ``count`` (samples), ``total`` (samples of the whole batch), ``loss``,
``loss_sum`` (Σ over samples of the per-sample loss), ``mean`` (whether the gradients are those
of a mean loss), ``nonfinite``, ``layers`` (one dict per layer: ``grad``/``bias_grad`` = Σ over
samples of the per-sample gradient, on the device; ``delta2`` = Σ ‖δ_b‖² of the per-sample
deltas; ``norm_sum``, ``bound_sum`` = Σ ‖J_b‖₂ and Σ max|d_b|; ``d_sum``, ``active``,
``saturated``, ``fro2_sum``; ``ever_active`` (H_j,) bool; ``w2``; ``finite``), ``spectrum`` and
the net's description (``sizes``, ``activations``, ``dtype``, ``device``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core import sample_rng as _sample_rng
from ..elementwise import activations as _activations
from ..nn import losses as _losses
from .io_spectrum import finish_spectrum, merge_spectrum, spectrum_partial
from ..algebra.lanczos import top_eigenvalues
from .layer_norms import layer_dense, layer_gram, report_tol, small_gram, weight_norm_squared
from ..core.backend import get_xp
from ..algebra.jacobian import LayerJacobian

__all__ = [
    "LayerFlow", "SATURATION", "all_finite", "finish", "first_nonfinite", "is_finite", "layer_partial", "layer_row",
    "merge", "merge_layer", "norm_subsample", "partials",
]

SATURATION = 0.01  # a derivative below 1% of sup|φ'| counts as saturated


@dataclass
class LayerFlow:
    """The numbers of layer ``index`` (``W{index}``: ``(h_in, h_out)``); batch means unless noted.

    grad_norm: ‖∂L/∂W_j‖_F; bias_grad_norm: ‖∂L/∂b_j‖; delta_norm: ‖∂L/∂h_j‖_F over the batch;
    jacobian_norm: ‖diag(d)·W_jᵀ‖₂ per sample (to 1e-6 relative), averaged; jacobian_bound:
    max|d|·‖W_j‖₂ per sample, averaged; weight_spectral_norm: ‖W_j‖₂; derivative_mean: mean
    φ'(h); active_fraction: share of (sample, unit) pairs with φ' ≠ 0; dead_units: units with
    φ' = 0 for every sample; saturated_fraction: share with |φ'| < 1% of sup|φ'| (for
    piecewise-linear activations the inactive ones); chi: χ_j = ‖J_j‖_F²/h_out, the factor by
    which the layer scales the squared norm of an isotropic cotangent on its way back (see
    docs/gradient-flow.md); finite: False when this layer's values went non-finite (its numbers
    are then NaN).
    """

    index: int
    shape: tuple[int, int]
    activation: str
    grad_norm: float
    bias_grad_norm: float
    delta_norm: float
    jacobian_norm: float
    jacobian_bound: float
    weight_spectral_norm: float
    derivative_mean: float
    active_fraction: float
    dead_units: int
    saturated_fraction: float
    chi: float
    finite: bool = True


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def all_finite(xp, arrays) -> np.ndarray:
    """Host bool ``(len(arrays),)``: whether each array (None counts as finite) is all finite,
    in one transfer."""
    flags = [xp.isfinite(a).all() for a in arrays if a is not None]
    got = iter(_host(xp.stack(flags))) if flags else iter(())
    return np.array([True if a is None else bool(next(got)) for a in arrays], dtype=bool)


def is_finite(xp, a) -> bool:
    return bool(all_finite(xp, [a])[0])


def first_nonfinite(xp, cache, grads, grad_y, L: int) -> dict | None:
    """Where the values first went non-finite: forward in layer order, then backward from the top.

    Every flag comes to the host in one transfer. ``"key"`` orders the places (the smallest
    came first), so the first of several chunks' is their ``min``."""
    # The cache keeps z_j or h_j, whichever φ'_j is computed from; either one overflowing
    # is what makes the rest of the pass non-finite (tanh(±inf) = ±1 stays finite).
    arrays = list(cache.saved[:L]) + [grad_y] + [a for j in range(L) for a in (grads.deltas[j], grads.weights[j])]
    ok = all_finite(xp, arrays + [grads.input])
    forward, loss, backward, inp = ok[:L], ok[L], ok[L + 1 : 3 * L + 1].reshape(L, 2), ok[-1]
    for j in range(L):
        if not forward[j]:
            return {
                "key": (0, j),
                "layer": j,
                "stage": "forward",
                "message": f"layer {j} went non-finite in the forward pass (its output z_{j} overflowed)",
            }
    if not loss:
        return {"key": (1, 0), "layer": L - 1, "stage": "loss", "message": "the loss gradient ∂L/∂y is non-finite"}
    for j in reversed(range(L)):
        if not backward[j].all():
            return {
                "key": (2, L - 1 - j),
                "layer": j,
                "stage": "backward",
                "message": f"layer {j} went non-finite in the backward pass (∂L/∂h_{j} or ∂L/∂W{j} overflowed)",
            }
    if not inp:
        return {"key": (3, 0), "layer": 0, "stage": "backward", "message": "the input gradient ∂L/∂x overflowed"}
    return None


def layer_partial(xp, j: int, J: LayerJacobian, activation: str, grads, factor: float, seed: int,
                  poisoned: bool, sel: np.ndarray | None = None) -> dict:
    """Layer j's sums over the chunk; the gradients times ``factor`` (B for a mean loss: the sums
    of the per-sample gradients). ``sel``: host indices of the chunk's rows whose ‖J_j‖₂ and
    bound are measured (None: every row); everything else is summed over every row."""
    W = J.W
    h_in, h_out = J.h_in, J.h_out
    d = J.d
    B = grads.deltas[j].shape[0]
    if d.ndim == 1:
        d = xp.broadcast_to(d, (B, h_out))
    col2 = (W * W).sum(axis=0)  # ‖W[:, i]‖², (H_out,)
    d2 = d * d
    fro2 = d2 @ col2  # ‖J_b‖_F² = Σ_i d_i² ‖W[:, i]‖², (B,)
    bound_act = _activations.get(activation).bound
    f64 = np.float64
    scalars = [
        (grads.deltas[j] * grads.deltas[j]).sum(),
        fro2.sum(),
        d.sum(),
        (d != 0).sum(),
        (xp.abs(d) < SATURATION * bound_act).sum(),
        xp.isfinite(d).all() & xp.isfinite(col2).all(),  # weights so large that ‖W[:, i]‖² overflows count too
    ]
    per_sample = [d2.max(axis=1), (d2 * col2).max(axis=1)] if h_out else [xp.zeros(B, dtype=W.dtype)] * 2
    # one transfer for every number of the layer: the scalars, max_i d_i², max_i d_i²‖W[:, i]‖², φ' ≠ 0 per unit
    host = _host(xp.concatenate([xp.stack([s.astype(f64) for s in scalars])] + [p.astype(f64) for p in per_sample]
                                + [(d != 0).any(axis=0).astype(f64)]))
    delta2, fro2_sum, d_sum, active, saturated, d_finite = (float(v) for v in host[:6])
    maxd2, lower, ever_active = host[6 : 6 + B], host[6 + B : 6 + 2 * B], host[6 + 2 * B :] > 0
    finite = not poisoned and bool(d_finite)
    nan = math.nan
    norm_sum = bound_sum = w2 = nan
    if sel is not None:  # the spectral norms of the subsample's rows only: the costly part
        d, maxd2, lower = d[xp.asarray(sel)], maxd2[sel], lower[sel]
    P = int(d.shape[0])
    if finite:
        gram = small_gram(W)  # one WᵀW (or WWᵀ) for ‖W‖₂ and both forms of the layer operator
        w2sq = weight_norm_squared(xp, W, seed + j, gram)
        sq = top_eigenvalues(
            layer_gram(xp, J, d, gram), P, min(h_in, h_out), xp=xp, dtype=d.dtype, seed=seed + j,
            tol=report_tol(d.dtype), lower=lower, upper=maxd2 * w2sq, dense=layer_dense(xp, J, d, gram),
        )
        w2 = math.sqrt(w2sq)
        norm_sum = float(np.sqrt(np.maximum(sq, 0.0)).sum())
        bound_sum = float(np.sqrt(maxd2).sum())
    b = grads.biases[j]
    return dict(
        shape=(h_in, h_out), activation=activation, count=B, norm_count=P,
        grad=grads.weights[j] * factor if factor != 1 else grads.weights[j],
        bias_grad=None if b is None else (b * factor if factor != 1 else b),
        delta2=delta2 * factor * factor, norm_sum=norm_sum, bound_sum=bound_sum, w2=w2,
        d_sum=d_sum if finite else nan, active=active if finite else nan,
        saturated=saturated if finite else nan, fro2_sum=fro2_sum if finite else nan,
        ever_active=ever_active, finite=finite,
    )


def partials(net, x, target=None, loss: str = "mse", *, seed: int = 0, spectrum_samples: int | None = None,
             start: int = 0, total: int | None = None, norm_rows: np.ndarray | None = None) -> dict:
    """The partial of the chunk ``x: (B, n_in)`` = samples ``start .. start+B-1`` of a batch of
    ``total`` (default: this chunk is the whole batch); ``target``: the chunk's targets, or None
    for per-sample random unit cotangents (sample i's is the same however the batch is chunked).
    ``norm_rows``: sorted host indices into the whole batch of the samples whose per-layer
    ‖J_j‖₂ and bound are measured (``norm_subsample``; None: all).
    ``x`` is validated by the caller (``gradient_flow``) and has the net's dtype."""
    xp = get_xp(net.weights[0], x)
    L, B = len(net.weights), int(x.shape[0])
    total = start + B if total is None else int(total)
    with np.errstate(all="ignore"):
        y, cache = net.forward(x)
        if target is None:
            v = _sample_rng.rows((seed,), start, start + B, int(y.shape[1]))
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.finfo(float).tiny)
            grad_y, loss_sum, factor = xp.asarray(v.astype(y.dtype)), None, 1.0
        else:
            value, grad_y = _losses.get(loss)(y, target)
            loss_sum, factor = float(value) * B, float(B)  # the loss is a mean over the chunk
        grads = net.backward(cache, grad_y)
        chain = net.jacobian_chain(cache)
        nonfinite = first_nonfinite(xp, cache, grads, grad_y, L)
        # After a forward overflow at layer k, layers k.. see inf/NaN inputs: their numbers are NaN.
        poisoned = nonfinite["layer"] if nonfinite and nonfinite["stage"] == "forward" else L
        sel = None
        if norm_rows is not None:
            lo, hi = np.searchsorted(norm_rows, [start, start + B])
            sel = np.asarray(norm_rows[lo:hi], dtype=np.int64) - start
        layers = [
            layer_partial(xp, j, chain.factors[j], net.activations[j], grads, factor, seed, j >= poisoned, sel)
            for j in range(L)
        ]
        spectrum = None if nonfinite else spectrum_partial(xp, chain, start, total, spectrum_samples, seed)
    return dict(
        count=B, total=total, loss=None if target is None else loss, loss_sum=loss_sum, mean=target is not None,
        nonfinite=nonfinite, layers=layers, spectrum=spectrum,
        sizes=[int(net.weights[0].shape[0])] + [int(W.shape[1]) for W in net.weights],
        activations=list(net.activations), dtype=str(np.dtype(net.weights[0].dtype)),
        device="gpu" if xp is not np else "cpu",
    )


def norm_subsample(total: int, samples: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of the ``samples`` rows (of ``total``) whose per-layer ‖J_j‖₂ the report
    measures: a seeded uniform draw without replacement (the same for the same ``seed``,
    however the batch is chunked), or None (every row) when ``samples`` is None or ≥ ``total``."""
    if samples is None or samples >= total:
        return None
    return np.sort(np.random.default_rng([seed, 11]).choice(total, size=int(samples), replace=False))


def merge_layer(a: dict, b: dict) -> dict:
    """Two chunks' partials of one layer (``layer_partial``), merged."""
    out = dict(a)
    for name in ("count", "norm_count", "grad", "delta2", "norm_sum", "bound_sum", "d_sum", "active", "saturated",
                 "fro2_sum"):
        out[name] = None if a[name] is None else a[name] + b[name]
    out["bias_grad"] = None if a["bias_grad"] is None else a["bias_grad"] + b["bias_grad"]
    out["ever_active"] = a["ever_active"] | b["ever_active"]
    out["finite"] = a["finite"] and b["finite"]
    out["w2"] = a["w2"] if math.isfinite(a["w2"]) else b["w2"]
    return out


def merge(a: dict, b: dict) -> dict:
    """The partial of two disjoint chunks (in any order): sums and counts added, maxima and
    flags combined, the first non-finite place of either."""
    if a["layers"][0]["shape"] != b["layers"][0]["shape"] or len(a["layers"]) != len(b["layers"]):
        raise ValueError("partials of different networks cannot be merged")
    firsts = [p["nonfinite"] for p in (a, b) if p["nonfinite"] is not None]
    return dict(
        a,
        count=a["count"] + b["count"],
        loss_sum=None if a["loss_sum"] is None else a["loss_sum"] + b["loss_sum"],
        nonfinite=min(firsts, key=lambda n: n["key"]) if firsts else None,
        layers=[merge_layer(la, lb) for la, lb in zip(a["layers"], b["layers"])],
        spectrum=None if a["spectrum"] is None or b["spectrum"] is None else merge_spectrum(a["spectrum"], b["spectrum"]),
    )


def layer_row(j: int, lp: dict, N: int, per: float, g2: float, b2: float) -> LayerFlow:
    """The ``LayerFlow`` of a dense layer's (merged) partial ``lp`` over ``N`` samples; ``per``: N for
    the gradients of a mean loss (per-sample sums), else 1; ``g2``, ``b2``: its squared gradient norms."""
    h_in, h_out = lp["shape"]
    n = N * h_out
    ok, nan = lp["finite"], math.nan
    return LayerFlow(
        index=j,
        shape=(h_in, h_out),
        activation=lp["activation"],
        grad_norm=math.sqrt(g2) / per,
        bias_grad_norm=None if lp["bias_grad"] is None else math.sqrt(b2) / per,  # None: a bias-free Dense
        delta_norm=math.sqrt(lp["delta2"]) / per if lp["delta2"] is not None else None,
        jacobian_norm=lp["norm_sum"] / lp["norm_count"] if ok and lp["norm_count"] else nan,
        jacobian_bound=lp["bound_sum"] * lp["w2"] / lp["norm_count"] if ok and lp["norm_count"] else nan,
        weight_spectral_norm=lp["w2"] if ok else nan,
        derivative_mean=lp["d_sum"] / n if ok else nan,
        active_fraction=lp["active"] / n if ok else nan,
        dead_units=int(h_out - lp["ever_active"].sum()) if ok else 0,
        saturated_fraction=lp["saturated"] / n if ok else nan,
        chi=lp["fro2_sum"] / N / h_out if ok else nan,
        finite=ok,
    )


def finish(p: dict) -> dict:
    """The report's fields from a (merged) partial: ``layers`` (``LayerFlow``), ``nonfinite``,
    ``loss``, ``loss_value``, ``batch``, the net's description and the spectrum's fields."""
    N = p["count"]
    nonfinite = None if p["nonfinite"] is None else {k: v for k, v in p["nonfinite"].items() if k != "key"}
    forward_overflow = nonfinite is not None and nonfinite["stage"] == "forward"
    grads = [a for lp in p["layers"] for a in (lp["grad"], lp["bias_grad"]) if a is not None]
    xp = get_xp(*grads)
    with np.errstate(all="ignore"):  # overflowed gradients give inf/NaN norms, reported as such
        sq = iter(_host(xp.stack([(g * g).sum() for g in grads])).astype(np.float64))  # one transfer
    per = N if p["mean"] else 1  # a mean loss's gradients: the per-sample sums over N
    layers = []
    for j, lp in enumerate(p["layers"]):
        g2 = float(next(sq))
        f = layer_row(j, lp, N, per, g2, float(next(sq)) if lp["bias_grad"] is not None else math.nan)
        if forward_overflow:  # the backward pass ran through the overflowed layers: no gradient is meaningful
            f.grad_norm = f.bias_grad_norm = f.delta_norm = math.nan
        layers.append(f)
    n_in = p["sizes"][0]
    return dict(
        layers=layers, nonfinite=nonfinite, loss=p["loss"], norm_samples=int(p["layers"][0]["norm_count"]),
        loss_value=None if p["loss_sum"] is None else p["loss_sum"] / N, batch=N,
        sizes=p["sizes"], activations=p["activations"], dtype=p["dtype"], device=p["device"],
        **finish_spectrum(p["spectrum"], n_in, min(n_in, p["sizes"][-1]), nonfinite is not None),
    )
