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
    "HUTCHINSON_PROBES", "LayerFlow", "MAX_SPECTRUM_ELEMENTS", "MAX_SPECTRUM_MACS", "SATURATION",
    "first_nonfinite", "io_spectrum", "is_finite", "layer_flow",
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
    jacobian_norm: exact ‖diag(d)·W_jᵀ‖₂ per sample, averaged; jacobian_bound: max|d|·‖W_j‖₂
    per sample, averaged; weight_spectral_norm: ‖W_j‖₂; derivative_mean: mean φ'(h);
    active_fraction: share of (sample, unit) pairs with φ' ≠ 0; dead_units: units with φ' = 0
    for every sample; saturated_fraction: share with |φ'| < 1% of sup|φ'| (for piecewise-linear
    activations the inactive ones); chi: ‖J_j‖_F²/h_in; backward_gain: ‖J_j‖_F²/h_out (the
    factor by which the layer scales the squared norm of an isotropic cotangent);
    finite: False when this layer's values went non-finite (its numbers are then NaN).
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
    backward_gain: float
    finite: bool = True


def is_finite(xp, a) -> bool:
    return bool(xp.isfinite(a).all())


def first_nonfinite(xp, cache, grads, grad_y, L: int) -> dict | None:
    """Where the values first went non-finite: forward in layer order, then backward from the top."""
    for j in range(L):
        # The cache keeps z_j or h_j, whichever φ'_j is computed from; either one overflowing
        # is what makes the rest of the pass non-finite (tanh(±inf) = ±1 stays finite).
        if not is_finite(xp, cache.saved[j]):
            return {
                "layer": j,
                "stage": "forward",
                "message": f"layer {j} went non-finite in the forward pass (its output z_{j} overflowed)",
            }
    if not is_finite(xp, grad_y):
        return {"layer": L - 1, "stage": "loss", "message": "the loss gradient ∂L/∂y is non-finite"}
    for j in reversed(range(L)):
        if not (is_finite(xp, grads.deltas[j]) and is_finite(xp, grads.weights[j])):
            return {
                "layer": j,
                "stage": "backward",
                "message": f"layer {j} went non-finite in the backward pass (∂L/∂h_{j} or ∂L/∂W{j} overflowed)",
            }
    if not is_finite(xp, grads.input):
        return {"layer": 0, "stage": "backward", "message": "the input gradient ∂L/∂x overflowed"}
    return None


def _norm(xp, a) -> float:
    return float(xp.sqrt((a * a).sum()))


def layer_flow(xp, j: int, J: LayerJacobian, activation: str, grads, seed: int, poisoned: bool) -> LayerFlow:
    W = J.W
    h_in, h_out = J.h_in, J.h_out
    d = J.d
    B = grads.deltas[j].shape[0]
    if d.ndim == 1:
        d = xp.broadcast_to(d, (B, h_out))
    fro2 = (d * d) @ (W * W).sum(axis=0)  # ‖J_b‖_F² = Σ_i d_i² ‖W[:, i]‖², (B,)
    fro2_mean = float(fro2.mean())
    ad = xp.abs(d)
    bound_act = _activations.get(activation).bound
    finite = not poisoned and is_finite(xp, d)
    nan = math.nan
    if finite:
        sq = top_eigenvalues(_layer_gram(xp, J, d), B + 1, min(h_in, h_out), xp=xp, dtype=d.dtype, seed=seed + j)
        norms = np.sqrt(np.maximum(sq[:B], 0.0))
        w2 = float(np.sqrt(max(sq[B], 0.0)))
        maxd = to_numpy(ad.max(axis=1)) if h_out else np.zeros(B)
        jacobian_norm, jacobian_bound = float(norms.mean()), float((maxd * w2).mean())
    else:
        jacobian_norm = jacobian_bound = w2 = nan
    return LayerFlow(
        index=j,
        shape=(h_in, h_out),
        activation=activation,
        grad_norm=_norm(xp, grads.weights[j]),
        bias_grad_norm=_norm(xp, grads.biases[j]) if grads.biases[j] is not None else nan,
        delta_norm=_norm(xp, grads.deltas[j]),
        jacobian_norm=jacobian_norm,
        jacobian_bound=jacobian_bound,
        weight_spectral_norm=w2,
        derivative_mean=float(d.mean()) if finite else nan,
        active_fraction=float((d != 0).mean()) if finite else nan,
        dead_units=int((d == 0).all(axis=0).sum()) if finite else 0,
        saturated_fraction=float((ad < SATURATION * bound_act).mean()) if finite else nan,
        chi=fro2_mean / h_in if finite else nan,
        backward_gain=fro2_mean / h_out if finite else nan,
        finite=finite,
    )


def _layer_gram(xp, J: LayerJacobian, d):
    """``matvec(v, rows)`` of ``J_b J_bᵀ`` (or ``J_bᵀ J_b``, on the smaller side) for every sample,
    plus one last row with ``d = 1`` whose top eigenvalue is ‖W‖₂²."""
    W = J.W
    dd = xp.concatenate([d, xp.ones((1, J.h_out), dtype=d.dtype)], axis=0)  # (B + 1, H_out)
    if J.h_out <= J.h_in:
        G = W.T @ W  # J Jᵀ = diag(d) WᵀW diag(d): one (H_out × H_out) GEMM per step

        def matvec(v, rows):
            s = dd[rows]
            return ((v * s) @ G) * s

    else:

        def matvec(u, rows):  # Jᵀ J through the factor's own JVP and VJP, on the H_in side
            F = LayerJacobian(dd[rows], W)
            return F.vjp(F.jvp(u))

    return matvec


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
        parts.append(to_numpy(singular_values(sub.jacobian("auto"))).astype(np.float64))
    return np.concatenate(parts, axis=0)


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
