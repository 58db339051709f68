"""A dense layer's report row (``LayerFlow``) as a mergeable partial: per chunk of samples, sums,
counts and maxima (``layer_partial``), two chunks merged exactly up to summation order
(``merge_layer``), the row from the merged partial (``layer_row``); the per-sample layer operators
``J_b J_bᵀ`` (or ``J_bᵀ J_b``) and ``‖W‖₂`` that its ``‖J_j‖₂`` needs, matrix-free (for Lanczos) and
as dense batched Gram matrices (for the direct eigensolve), on the smaller side
``n = min(H_in, H_out)``; where the values first went non-finite (``first_nonfinite``). The one
sweep that calls them for every network is ``jacgrad.flow.block_flow``.

Everything is read off the per-sample factor ``J_j = diag(d_j) · W_jᵀ`` and stays on its device;
one transfer per layer brings its scalars (and its per-sample bounds) to the host, besides the
Lanczos checks of ``‖J_j‖₂``. Memory: a few ``(B, H)`` blocks per layer, one ``n × n`` Gram matrix
of ``W``, chunks of at most ``CHUNK_ELEMENTS`` elements for the dense form, and the gradient sums.

A layer's partial (plain dict): ``grad``/``bias_grad`` = Σ over samples of the per-sample
gradient, on the device; ``delta2`` = Σ ‖δ_b‖² of the per-sample deltas; ``norm_sum``,
``bound_sum`` = Σ ‖J_b‖₂ and Σ max|d_b|; ``d_sum``, ``active``, ``saturated``, ``fro2_sum``;
``ever_active`` (H_j,) bool; ``w2``; ``finite``; ``count`` and ``norm_count``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..algebra.jacobian import LayerJacobian
from ..algebra.lanczos import Operators, top_eigenvalues_many
from ..elementwise import activations as _activations

__all__ = [
    "CHUNK_ELEMENTS", "LayerFlow", "REPORT_TOL", "SATURATION", "all_finite", "first_nonfinite",
    "layer_dense", "layer_gram", "layer_partial", "layer_row", "layer_sums", "measure_norms", "merge_layer",
    "norm_subsample", "report_tol", "small_gram", "weight_norm_squared",
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
    bound are measured (None: every row); everything else is summed over every row.
    ``layer_sums`` then ``measure_norms`` of this one layer."""
    lp = layer_sums(xp, j, J, activation, grads, factor, seed, poisoned, sel)
    measure_norms(xp, [lp])
    return lp


def layer_sums(xp, j: int, J: LayerJacobian, activation: str, grads, factor: float, seed: int,
               poisoned: bool, sel: np.ndarray | None = None) -> dict:
    """``layer_partial`` without its spectral norms: ``norm_sum``, ``bound_sum`` and ``w2`` are NaN
    and, where the layer is finite, ``"_norms"`` holds what ``measure_norms`` needs to fill them
    (several layers' together)."""
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
    if sel is not None:  # the spectral norms of the subsample's rows only: the costly part
        d, maxd2, lower = d[xp.asarray(sel)], maxd2[sel], lower[sel]
    P = int(d.shape[0])
    b = grads.biases[j]
    return dict(
        shape=(h_in, h_out), activation=activation, count=B, norm_count=P,
        grad=grads.weights[j] * factor if factor != 1 else grads.weights[j],
        bias_grad=None if b is None else (b * factor if factor != 1 else b),
        delta2=delta2 * factor * factor, norm_sum=nan, bound_sum=nan, w2=nan,
        d_sum=d_sum if finite else nan, active=active if finite else nan,
        saturated=saturated if finite else nan, fro2_sum=fro2_sum if finite else nan,
        ever_active=ever_active, finite=finite,
        _norms=dict(J=J, d=d, maxd2=maxd2, lower=lower, seed=seed + j) if finite else None,
    )


def measure_norms(xp, partials: list[dict]) -> None:
    """Fill ``w2`` (‖W_j‖₂), ``norm_sum`` (Σ ‖J_b‖₂) and ``bound_sum`` (Σ max|d_b|) of the
    ``layer_sums`` partials that carry ``"_norms"`` (removed), the layers of one size together:
    every ‖W_j‖₂² and every sample's ‖J_b‖₂² (bounded by ``lower`` and ``max d² · ‖W_j‖₂²``) in one
    Lanczos block (``top_eigenvalues_many``, the per-sample sets ``bound_by`` their layer's ‖W_j‖₂²:
    each layer's numbers are those of its own calls, bit for bit; a step's host work is paid once
    for all layers, not twice per layer)."""
    jobs = [(lp, lp.pop("_norms")) for lp in partials if "_norms" in lp]
    sizes: dict = {}
    for lp, job in jobs:
        if job is not None:
            J = job["J"]
            job["gram"] = small_gram(J.W)  # one WᵀW (or WWᵀ) for ‖W‖₂ and both forms of the layer operator
            sizes.setdefault((min(J.h_in, J.h_out), np.dtype(job["d"].dtype)), []).append((lp, job))
    for (n, dtype), group in sizes.items():
        sets = []
        for lp, job in group:
            J, d = job["J"], job["d"]
            sets.append(_weight_operators(J.W, job["seed"], job["gram"]))
            sets.append(Operators(layer_gram(xp, J, d, job["gram"]), int(d.shape[0]), job["seed"], job["lower"],
                                  job["maxd2"], layer_dense(xp, J, d, job["gram"]), bound_by=len(sets) - 1))
        got = top_eigenvalues_many(sets, n, xp=xp, dtype=dtype, tol=report_tol(dtype))
        for (lp, job), w2sq, sq in zip(group, got[0::2], got[1::2]):
            lp["w2"] = math.sqrt(float(w2sq[0]))
            lp["norm_sum"] = float(np.sqrt(np.maximum(sq, 0.0)).sum())
            lp["bound_sum"] = float(np.sqrt(job["maxd2"]).sum())


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


# ---------------------------------------------------------------------------- the per-sample layer operators
CHUNK_ELEMENTS = 1 << 20  # the (r, H_in, H_out) intermediate of the dense widening form: 8 MiB f64

# The report asks the per-sample ‖J_j‖₂ to this relative accuracy of ‖J_j‖₂² (≈ half of it in the
# norm); float32 arithmetic cannot settle a Ritz value that finely, so it gets 1e-5.
REPORT_TOL = 1e-6


def report_tol(dtype) -> float:
    return REPORT_TOL if np.dtype(dtype) == np.float64 else 1e-5


def small_gram(W):
    """``() -> G``: the Gram matrix of ``W: (H_in, H_out)`` on its smaller side — ``WᵀW: (H_out, H_out)``
    when ``H_out ≤ H_in``, else ``WWᵀ: (H_in, H_in)`` — formed by one GEMM on the first call and
    kept. One per layer, shared by ``weight_norm_squared``, ``layer_gram`` and ``layer_dense``:
    ``top_eigenvalues`` applies the matrix-free and the dense operator only to the rows its bounds
    leave open, often only one of them, or none."""
    G = []

    def gram():
        if not G:
            G.append(W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T)
        return G[0]

    return gram


def weight_norm_squared(xp, W, seed: int, gram=None) -> float:
    """‖W‖₂² from the smaller Gram matrix (``gram``: the layer's ``small_gram(W)``, made here when
    None): Lanczos, or its dense eigensolve where that is cheaper or Lanczos is slow to settle
    (see ``top_eigenvalues``)."""
    n = min(W.shape)
    return float(top_eigenvalues_many([_weight_operators(W, seed, gram)], n, xp=xp, dtype=W.dtype,
                                      tol=report_tol(W.dtype))[0][0])


def _weight_operators(W, seed: int, gram=None) -> Operators:
    """The one operator ``WᵀW`` (or ``WWᵀ``, the smaller) whose λ_max is ‖W‖₂², matrix-free and dense."""
    G = gram or small_gram(W)
    return Operators(lambda v, rows: v @ G(), 1, seed, dense=lambda rows: G()[None])


def layer_gram(xp, J: LayerJacobian, d, gram=None):
    """``matvec(v, rows)`` of ``J_b J_bᵀ`` (or ``J_bᵀ J_b``, on the smaller side) for the samples
    ``rows``; ``gram``: the layer's ``small_gram(J.W)`` to share, made here when None."""
    W = J.W
    if J.h_out <= J.h_in:
        G = gram or small_gram(W)  # J Jᵀ = diag(d) WᵀW diag(d): one (H_out × H_out) GEMM per step

        def matvec(v, rows):
            s = d[_device_rows(xp, rows)]
            return ((v * s) @ G()) * s

    else:

        def matvec(u, rows):  # Jᵀ J through the factor's own JVP and VJP, on the H_in side
            F = LayerJacobian(d[_device_rows(xp, rows)], W)
            return F.vjp(F.jvp(u))

    return matvec


def layer_dense(xp, J: LayerJacobian, d, gram=None):
    """``dense(rows) -> (len(rows), n, n)``: the same operators as matrices, n the smaller side;
    ``gram`` as for ``layer_gram``."""
    W = J.W
    h_in, h_out = J.h_in, J.h_out
    if h_out <= h_in:
        G = gram or small_gram(W)

        def dense(rows):
            s = d[_device_rows(xp, rows)]
            return s[:, :, None] * G()[None] * s[:, None, :]

    else:
        per = max(1, CHUNK_ELEMENTS // (h_in * h_out))  # bounds the (r, H_in, H_out) intermediate

        def dense(rows):
            s2 = d[_device_rows(xp, rows)] ** 2
            return xp.concatenate([(W[None] * s2[i : i + per, None, :]) @ W.T for i in range(0, len(rows), per)])

    return dense


def _device_rows(xp, rows):
    return rows if isinstance(rows, slice) else xp.asarray(rows)
