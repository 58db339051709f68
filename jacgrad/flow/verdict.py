"""The verdict of a gradient-flow report from its per-layer (or per-block) χ: one rule, read by
``diagnostics`` (dense layers) and ``block_flow`` (blocks of a ``Sequential``)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GAIN_BAND", "SPECTRUM_RATIO", "VERDICTS", "decide", "healthy_chi_band", "spectrum_verdict"]

VERDICTS = ("vanishing", "exploding", "healthy")
# Healthy while the squared gradient norm changes by less than GAIN_BAND from the output to the
# input, i.e. the gradient norm by less than 10x: depth L <= ln(100)·ξ ≈ 4.6 depth scales.
GAIN_BAND = 100.0
# The input-output Jacobian is called rank-deficient when its median singular value is below this
# fraction of its largest: half of the input directions are then lost (1000x weaker than the best),
# whatever χ̄ says about the average squared norm, which the few large singular values carry.
SPECTRUM_RATIO = 1e-3


def decide(chi, nonfinite: bool = False) -> tuple[str, float, float, float]:
    """``(verdict, chi_bar, backward_gain, depth_scale)`` from the per-layer ``χ_j``.

    χ̄ is the geometric mean of ``χ_j = ‖J_j‖_F²/H_j`` — the squared-norm factor of layer j for
    an isotropic cotangent. The mean-field χ is a product over layers, so the geometric mean is
    its per-layer rate; it is computed exactly from every sample at the cost of one product per
    layer, never needs the whole Jacobian, and the normalisation by H_j (not H_{j-1}) drops the
    fixed factor n_in/n_out, so a net that merely narrows from 784 inputs to 10 outputs is not
    called vanishing. Γ = Π χ_j = χ̄^L is how much
    the squared gradient norm changes from output to input. The verdict compares Γ to 1 within
    ``GAIN_BAND`` = 100 (a 10x change of the gradient norm): below → "vanishing", above →
    "exploding". Equivalently, healthy while the depth is within ln(100)·ξ ≈ 4.6 depth scales
    ξ = 1/|ln χ̄| (a positive number of layers either way; the direction is in the verdict).
    Non-finite values are an overflow: "exploding" with χ̄ = Γ = inf and ξ = 0.

        >>> decide([0.5] * 20)[0], decide([1.0] * 20)[3], decide([2.56] * 20)[0]
        ('vanishing', inf, 'exploding')
    """
    gains = [float(g) for g in chi]
    if nonfinite or not gains or not all(math.isfinite(g) for g in gains):
        return "exploding", math.inf, math.inf, 0.0
    if min(gains) <= 0.0:
        return "vanishing", 0.0, 0.0, 0.0
    logs = [math.log(g) for g in gains]
    log_gamma = sum(logs)
    chi_bar = math.exp(log_gamma / len(logs))
    gamma = math.exp(log_gamma) if log_gamma < 709 else math.inf
    depth_scale = math.inf if log_gamma == 0.0 else len(logs) / abs(log_gamma)
    if log_gamma < -math.log(GAIN_BAND):
        verdict = "vanishing"
    elif log_gamma > math.log(GAIN_BAND):
        verdict = "exploding"
    else:
        verdict = "healthy"
    return verdict, chi_bar, gamma, depth_scale


def healthy_chi_band(depth: int) -> tuple[float, float]:
    """The χ̄ of a healthy verdict over ``depth`` layers: Γ = χ̄^L within [1/GAIN_BAND, GAIN_BAND].

        >>> [round(v, 4) for v in healthy_chi_band(20)]
        [0.7943, 1.2589]
    """
    L = max(int(depth), 1)
    return GAIN_BAND ** (-1.0 / L), GAIN_BAND ** (1.0 / L)


def spectrum_verdict(singular_values) -> str | None:
    """None, or a sentence when the input-output Jacobian is rank-deficient: its median singular
    value (per sample, then the median over the samples) is below ``SPECTRUM_RATIO`` times the
    largest. ``singular_values``: ``(S, k)``, one row per sample (any order); rows with a
    non-finite or zero largest value are left out (the verdict covers an overflow).

    A healthy χ̄ is an average of squared singular values: a few large ones can carry it while
    most directions of the input never reach the output, which is what this says.

        >>> spectrum_verdict([[1.0, 0.5, 0.2]]) is None
        True
        >>> spectrum_verdict([[2.0, 1.0, 1e-9, 1e-12, 0.0]])[:47]
        'rank-deficient: the median singular value of ∂y'
    """
    sv = np.abs(np.asarray(singular_values, dtype=float))
    if sv.ndim != 2 or sv.size == 0:
        return None
    top = sv.max(axis=1)
    keep = np.isfinite(top) & (top > 0) & np.isfinite(sv).all(axis=1)
    if not keep.any():
        return None
    sv, top = sv[keep], top[keep]
    ratio = float(np.median(np.median(sv, axis=1) / top))
    if ratio >= SPECTRUM_RATIO:
        return None
    k = sv.shape[1]
    strong = int(np.median((sv >= SPECTRUM_RATIO * top[:, None]).sum(axis=1)))
    # below max(m, n)·eps of the largest a value is rounding noise: its digits mean nothing
    size = "numerically zero" if ratio <= k * np.finfo(float).eps else f"{ratio:.2g} of the largest"
    return (f"rank-deficient: the median singular value of ∂y/∂x is {size} ({strong} of {k} "
            f"within {1 / SPECTRUM_RATIO:.0f}x of the largest): most input directions do not reach the output, whatever χ̄ says")
