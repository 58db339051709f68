"""What ``gradient_flow`` measures: per-layer statistics of the factors and the input-output spectrum.

Everything is read off the per-sample factors ``J_j = diag(d_j) · W_jᵀ`` of
``net.jacobian_chain(cache)`` and stays on their device; only scalars and the (small) singular
values come to the host. Memory: a few ``(B, H)`` blocks per layer and one ``H_out × H_out``
Gram matrix — the per-sample layer Jacobians themselves are never materialised; the whole
input-output Jacobian only for as many samples as ``MAX_SPECTRUM_ELEMENTS`` allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import activations as _activations
from ._lanczos import top_eigenvalues
from .backend import to_numpy
from .chain import Chain
from .jacobian import LayerJacobian
from .spectra import singular_values

__all__ = [
    "HUTCHINSON_PROBES", "LayerFlow", "MAX_SPECTRUM_ELEMENTS", "MAX_SPECTRUM_MACS", "REPORT_TOL", "SATURATION",
    "all_finite", "first_nonfinite", "io_spectrum", "is_finite", "layer_flow",
]

SATURATION = 0.01  # a derivative below 1% of sup|φ'| counts as saturated
# The input-output Jacobian of a sample is built only when its largest intermediate
# (max width x max(n_in, n_out)) has at most this many elements; beyond, matrix-free ...
MAX_SPECTRUM_ELEMENTS = 1 << 26
# ... and, unless spectrum_samples says otherwise, for as many samples as this many multiply-adds
# allow (its GEMMs plus ~4·m·n·k per SVD) ...
MAX_SPECTRUM_MACS = 1 << 35
# ... a few samples at a time, so no intermediate holds more than this many elements (8 MiB f64).
SPECTRUM_CHUNK_ELEMENTS = 1 << 20
HUTCHINSON_PROBES = 16


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

    Every flag comes to the host in one transfer."""
    # The cache keeps z_j or h_j, whichever φ'_j is computed from; either one overflowing
    # is what makes the rest of the pass non-finite (tanh(±inf) = ±1 stays finite).
    arrays = list(cache.saved[:L]) + [grad_y] + [a for j in range(L) for a in (grads.deltas[j], grads.weights[j])]
    ok = all_finite(xp, arrays + [grads.input])
    forward, loss, backward, inp = ok[:L], ok[L], ok[L + 1 : 3 * L + 1].reshape(L, 2), ok[-1]
    for j in range(L):
        if not forward[j]:
            return {
                "layer": j,
                "stage": "forward",
                "message": f"layer {j} went non-finite in the forward pass (its output z_{j} overflowed)",
            }
    if not loss:
        return {"layer": L - 1, "stage": "loss", "message": "the loss gradient ∂L/∂y is non-finite"}
    for j in reversed(range(L)):
        if not backward[j].all():
            return {
                "layer": j,
                "stage": "backward",
                "message": f"layer {j} went non-finite in the backward pass (∂L/∂h_{j} or ∂L/∂W{j} overflowed)",
            }
    if not inp:
        return {"layer": 0, "stage": "backward", "message": "the input gradient ∂L/∂x overflowed"}
    return None


# The report asks the per-sample ‖J_j‖₂ to this relative accuracy of ‖J_j‖₂² (≈ half of it in the norm).
REPORT_TOL = 1e-6


def layer_flow(xp, j: int, J: LayerJacobian, activation: str, grads, seed: int, poisoned: bool) -> LayerFlow:
    W = J.W
    h_in, h_out = J.h_in, J.h_out
    d = J.d
    B = grads.deltas[j].shape[0]
    if d.ndim == 1:
        d = xp.broadcast_to(d, (B, h_out))
    col2 = (W * W).sum(axis=0)  # ‖W[:, i]‖², (H_out,)
    d2 = d * d
    fro2 = d2 @ col2  # ‖J_b‖_F² = Σ_i d_i² ‖W[:, i]‖², (B,)
    ad = xp.abs(d)
    bound_act = _activations.get(activation).bound
    f64 = np.float64
    b = grads.biases[j]
    scalars = [
        (grads.weights[j] * grads.weights[j]).sum(),
        (b * b).sum() if b is not None else xp.zeros((), dtype=W.dtype),
        (grads.deltas[j] * grads.deltas[j]).sum(),
        fro2.sum(),
        d.sum(),
        (d != 0).sum(),
        (d == 0).all(axis=0).sum(),
        (ad < SATURATION * bound_act).sum(),
        xp.isfinite(d).all(),
    ]
    per_sample = [d2.max(axis=1), (d2 * col2).max(axis=1)] if h_out else [xp.zeros(B, dtype=W.dtype)] * 2
    # one transfer for every number of the layer: the scalars, then max_i d_i² and max_i d_i²‖W[:, i]‖²
    host = _host(xp.concatenate([xp.stack([s.astype(f64) for s in scalars])] + [p.astype(f64) for p in per_sample]))
    g2, bias2, delta2, fro2_sum, d_sum, active, dead, saturated, d_finite = (float(v) for v in host[:9])
    maxd2, lower = host[9 : 9 + B], host[9 + B :]
    n = B * h_out
    finite = not poisoned and bool(d_finite)
    nan = math.nan
    if finite:
        w2sq = _weight_norm_squared(xp, W, seed + j)
        sq = top_eigenvalues(
            _layer_gram(xp, J, d), B, min(h_in, h_out), xp=xp, dtype=d.dtype, seed=seed + j, tol=REPORT_TOL,
            lower=lower, upper=maxd2 * w2sq, dense=_layer_dense(xp, J, d),
        )
        w2 = math.sqrt(w2sq)
        jacobian_norm = float(np.sqrt(np.maximum(sq, 0.0)).mean())
        jacobian_bound = float((np.sqrt(maxd2) * w2).mean())
    else:
        jacobian_norm = jacobian_bound = w2 = nan
    return LayerFlow(
        index=j,
        shape=(h_in, h_out),
        activation=activation,
        grad_norm=math.sqrt(g2),
        bias_grad_norm=math.sqrt(bias2) if b is not None else nan,
        delta_norm=math.sqrt(delta2),
        jacobian_norm=jacobian_norm,
        jacobian_bound=jacobian_bound,
        weight_spectral_norm=w2,
        derivative_mean=d_sum / n if finite else nan,
        active_fraction=active / n if finite else nan,
        dead_units=int(dead) if finite else 0,
        saturated_fraction=saturated / n if finite else nan,
        chi=fro2_sum / B / h_out if finite else nan,
        finite=finite,
    )


def _weight_norm_squared(xp, W, seed: int) -> float:
    """‖W‖₂²: one dense eigensolve of the smaller Gram matrix (or Lanczos beyond ``DIRECT_MAX``)."""
    h_in, h_out = W.shape
    n = min(h_in, h_out)
    if n == 0:
        return 0.0

    def gram():
        return W.T @ W if h_out <= h_in else W @ W.T

    def matvec(v, rows):
        return v @ G

    G = gram()
    return float(top_eigenvalues(matvec, 1, n, xp=xp, dtype=W.dtype, seed=seed, tol=REPORT_TOL,
                                 dense=lambda rows: G[None])[0])


def _layer_gram(xp, J: LayerJacobian, d):
    """``matvec(v, rows)`` of ``J_b J_bᵀ`` (or ``J_bᵀ J_b``, on the smaller side) for the samples ``rows``."""
    W = J.W
    if J.h_out <= J.h_in:
        G = W.T @ W  # J Jᵀ = diag(d) WᵀW diag(d): one (H_out × H_out) GEMM per step

        def matvec(v, rows):
            s = d[_device_rows(xp, rows)]
            return ((v * s) @ G) * s

    else:

        def matvec(u, rows):  # Jᵀ J through the factor's own JVP and VJP, on the H_in side
            F = LayerJacobian(d[_device_rows(xp, rows)], W)
            return F.vjp(F.jvp(u))

    return matvec


def _layer_dense(xp, J: LayerJacobian, d):
    """``dense(rows) -> (len(rows), n, n)``: the same operators as matrices, n the smaller side."""
    W = J.W
    h_in, h_out = J.h_in, J.h_out
    if h_out <= h_in:
        G = W.T @ W

        def dense(rows):
            s = d[_device_rows(xp, rows)]
            return s[:, :, None] * G[None] * s[:, None, :]

    else:
        per = max(1, SPECTRUM_CHUNK_ELEMENTS // (h_in * h_out))  # bounds the (r, H_in, H_out) intermediate

        def dense(rows):
            s2 = d[_device_rows(xp, rows)] ** 2
            return xp.concatenate([(W[None] * s2[i : i + per, None, :]) @ W.T for i in range(0, len(rows), per)])

    return dense


def _device_rows(xp, rows):
    return rows if isinstance(rows, slice) else xp.asarray(rows)


def _sample_elements(chain: Chain) -> int:
    """An upper bound of the largest array one sample needs while its Jacobian is accumulated."""
    return max(chain.widths) * max(chain.n_in, chain.n_out)


def _spectrum_size(chain: Chain, B: int, requested: int | None) -> int:
    if _sample_elements(chain) > MAX_SPECTRUM_ELEMENTS:
        return 0
    if requested is not None:
        return max(0, min(B, int(requested)))
    k = min(chain.n_out, chain.n_in)
    macs = chain.jacobian_cost("auto") / max(chain.batch or 1, 1) + 4 * chain.n_out * chain.n_in * k
    return int(min(B, MAX_SPECTRUM_MACS // max(macs, 1)))


def _singular_values_in_chunks(chain: Chain, S: int) -> np.ndarray:
    """Singular values ``(S, k)`` of the first S samples' Jacobians, a few samples at a time so
    that no intermediate exceeds ``SPECTRUM_CHUNK_ELEMENTS``; only the singular values are kept."""
    chunk = max(1, SPECTRUM_CHUNK_ELEMENTS // _sample_elements(chain))
    parts = []
    for start in range(0, S, chunk):
        sub = chain.rows(slice(start, min(S, start + chunk)))
        parts.append(singular_values(sub.jacobian("auto")))
    return to_numpy(chain.xp.concatenate(parts, axis=0)).astype(np.float64)  # one transfer


def io_spectrum(xp, chain: Chain, B: int, requested, nonfinite: bool, seed: int) -> dict:
    n_in, n_out = chain.n_in, chain.n_out
    k = min(n_in, n_out)
    if nonfinite:
        return dict(
            jacobian_singular_values=np.zeros((0, k)),
            jacobian_spectral_norm=math.nan,
            mean_squared_singular_value=math.nan,
            mean_squared_singular_value_method="skipped: non-finite values",
            spectrum_samples=0,
            spectrum_method="skipped: non-finite values",
        )
    S = _spectrum_size(chain, B, requested)
    if requested == 0:
        return dict(
            jacobian_singular_values=np.zeros((0, k)),
            jacobian_spectral_norm=math.nan,
            mean_squared_singular_value=_hutchinson(xp, chain, B, seed),
            mean_squared_singular_value_method=f"estimated from {HUTCHINSON_PROBES} random directions per sample",
            spectrum_samples=0,
            spectrum_method="skipped (spectrum_samples=0)",
        )
    if S > 0:
        sv = _singular_values_in_chunks(chain, S)
        return dict(
            jacobian_singular_values=sv,
            jacobian_spectral_norm=float(sv[:, 0].mean()) if k else 0.0,
            mean_squared_singular_value=float(((sv**2).sum(axis=1) / n_in).mean()),
            mean_squared_singular_value_method=f"exact ({S} of {B} samples)",
            spectrum_samples=S,
            spectrum_method=f"exact SVD of {S} of {B} samples' Jacobians",
        )
    # Too big to build: matrix-free norm by Lanczos, ‖J‖_F² by Hutchinson's estimator.
    if n_out <= n_in:

        def matvec(v, rows):
            c = chain.rows(rows)
            return c.jvp(c.vjp(v))

    else:

        def matvec(u, rows):
            c = chain.rows(rows)
            return c.vjp(c.jvp(u))

    sq = top_eigenvalues(matvec, B, k, xp=xp, dtype=chain.dtype, seed=seed)
    return dict(
        jacobian_singular_values=np.zeros((0, k)),
        jacobian_spectral_norm=float(np.sqrt(np.maximum(sq, 0.0)).mean()),
        mean_squared_singular_value=_hutchinson(xp, chain, B, seed),
        mean_squared_singular_value_method=f"estimated from {HUTCHINSON_PROBES} random directions per sample",
        spectrum_samples=0,
        spectrum_method="skipped (too large to build); spectral norm by Lanczos",
    )


def _hutchinson(xp, chain: Chain, B: int, seed: int) -> float:
    """‖J‖_F²/n_in averaged over the batch, estimated as E‖J u‖²/n_in with u ~ N(0, I)."""
    rng = np.random.default_rng([seed, 3])
    total = xp.zeros(B, dtype=chain.dtype)
    for _ in range(HUTCHINSON_PROBES):
        t = chain.jvp(xp.asarray(rng.standard_normal((B, chain.n_in)).astype(chain.dtype)))
        total += (t * t).sum(axis=1)
    return float(total.mean()) / (HUTCHINSON_PROBES * chain.n_in)
