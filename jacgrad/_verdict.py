"""The verdict of a gradient-flow report from its per-layer (or per-block) χ: one rule, read by
``diagnostics`` (dense layers) and ``block_flow`` (blocks of a ``Sequential``)."""

from __future__ import annotations

import math

__all__ = ["GAIN_BAND", "VERDICTS", "decide"]

VERDICTS = ("vanishing", "exploding", "healthy")
# Healthy while the squared gradient norm changes by less than GAIN_BAND from the output to the
# input, i.e. the gradient norm by less than 10x: depth L <= ln(100)·ξ ≈ 4.6 depth scales.
GAIN_BAND = 100.0


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
