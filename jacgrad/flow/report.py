"""Rendering of a dense-layer ``GradientFlowReport``: hints, the text table (the report type and
its dict / JSON are in ``jacgrad.flow.report_blocks``; the PNG plot in ``jacgrad.flow.report_plot``,
re-exported here).

Kept apart from ``diagnostics`` (which computes, and imports this module; never the other way)
so the numbers and their presentation can change independently; matplotlib is imported only
inside ``plot_reports``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["hints", "histogram_bins", "plot_reports", "report_text", "usual_init", "PLOT_INSTALL_HINT"]

from .report_plot import PLOT_INSTALL_HINT, histogram_bins, plot_reports
from .verdict import spectrum_verdict

# ---------------------------------------------------------------------------- hints
def hints(report, framework: str | None = None) -> list[str]:
    """Concrete advice for an unhealthy verdict (empty when healthy), from the report's numbers;
    ``framework="torch"`` (a network imported from torch) names torch's initialisers."""
    if report.verdict == "healthy":
        return []
    out: list[str] = []
    L = report.depth
    hidden = report.layers[:-1] if L > 1 else report.layers
    acts = sorted({f.activation for f in hidden})
    finite = [f for f in report.layers if f.finite]
    if report.nonfinite is not None:
        out.append(
            f"{report.nonfinite['message']}: the values overflowed, so the weights are far too large "
            "for this depth — re-initialise smaller (see below) before anything else"
        )
    scale = 1.0 / math.sqrt(report.chi_bar) if 0 < report.chi_bar < math.inf else None
    inits = ", ".join(f"{a} → {_init_call(usual_init(a), framework)}" for a in acts)
    orthogonal, zero_bias = (("nn.init.orthogonal_(linear.weight)", "nn.init.zeros_(linear.bias)")
                             if framework == "torch" else ("orthogonal weights", "zero bias"))
    if report.verdict == "vanishing":
        if "sigmoid" in acts:
            dm = np.mean([f.derivative_mean for f in finite if f.activation == "sigmoid"])
            out.append(
                f"activation: sigmoid passes at most 1/4 of a signal per layer (σ' ≤ 1/4; here mean σ' = {dm:.3f}); "
                "use tanh or a ReLU-family activation in the hidden layers and keep sigmoid for a probability output"
            )
        sat = np.mean([f.saturated_fraction for f in finite if f.activation not in _PIECEWISE_LINEAR] or [0.0])
        if sat > 0.05:
            out.append(
                f"saturation: {sat:.0%} of the derivatives are below 1% of sup|φ'| — the pre-activations are too "
                "large; scale the inputs or the weights down, or normalise the pre-activations"
            )
        dead = sum(f.dead_units for f in finite)
        if dead:
            worst = max(finite, key=lambda f: f.dead_units)
            out.append(
                f"dead units: {dead} units have φ' = 0 for every sample (most in layer {worst.index}: "
                f"{worst.dead_units} of {worst.shape[1]}); lower the weight scale or the negative bias, or use "
                f"{'nn.LeakyReLU/nn.ELU' if framework == 'torch' else 'leaky_relu/elu'}"
            )
        if scale is not None and all(a in _HOMOGENEOUS for a in acts):
            out.append(
                f"initialisation scale: each layer keeps χ̄ = {report.chi_bar:.3g} of the squared gradient norm, and "
                f"for {', '.join(acts)} χ grows with the square of the weight scale: multiply the weights by "
                f"≈{scale:.3g} (the usual initialisation: {inits})"
            )
        elif scale is not None:
            out.append(
                f"initialisation scale: each layer keeps χ̄ = {report.chi_bar:.3g} of the squared gradient norm; for "
                f"{', '.join(acts)} larger weights raise χ only until the units saturate, so use the usual "
                f"initialisation ({inits}) or {orthogonal}, with {zero_bias}"
            )
        out.append(
            "architecture: residual connections (z + f(z)) add the identity to every layer Jacobian so the product "
            "cannot collapse, and normalisation (BatchNorm/LayerNorm) keeps the pre-activations where φ' is large"
        )
    else:
        w2 = max((f.weight_spectral_norm for f in finite), default=math.nan)
        if scale is not None:
            out.append(
                f"initialisation scale: each layer multiplies the squared gradient norm by χ̄ = {report.chi_bar:.3g} "
                f"(‖W‖₂ up to {w2:.3g}); scale the weights by ≈{scale:.3g} (the usual initialisation: {inits})"
            )
        else:
            out.append(f"initialisation scale: the usual initialisations are {inits}, with gain 1")
        out.append("training: clip gradients by their global norm so one step cannot blow up while the cause is fixed")
        out.append(
            "architecture: normalisation (BatchNorm/LayerNorm) re-scales the pre-activations every layer, and residual "
            "branches scaled down (e.g. by 1/√depth) keep each layer's gain near 1"
        )
    return out


_PIECEWISE_LINEAR = ("relu", "leaky_relu", "identity", "hard_tanh")
_HOMOGENEOUS = ("relu", "leaky_relu", "identity")  # φ(c·h) = c·φ(h) for c > 0: χ ∝ weight scale²


_RELU_LIKE = ("relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu", "softplus")


_TORCH_INITS = {"he_normal": "nn.init.kaiming_normal_(linear.weight, nonlinearity='relu')",
                "xavier_normal": "nn.init.xavier_normal_(linear.weight)"}  # the same distributions in torch's API


def _init_call(scheme: str, framework: str | None) -> str:
    """How a user of ``framework`` asks for ``scheme``: ``init='he_normal'`` in jacgrad, torch's
    ``nn.init`` call for a torch model."""
    return _TORCH_INITS[scheme] if framework == "torch" else f"init='{scheme}'"


def usual_init(activation: str) -> str:
    """The initialisation usually paired with ``activation``: he_normal for the ReLU family,
    xavier_normal otherwise (sigmoid, tanh, identity, hard_tanh)."""
    return "he_normal" if activation in _RELU_LIKE else "xavier_normal"


# ---------------------------------------------------------------------------- JSON
def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------- text
def _g(value: float, width: int = 9) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan".rjust(width)
    return f"{value:.3g}".rjust(width)


def _sizes(sizes: Sequence[int]) -> str:
    parts, i = [str(sizes[0])], 1
    while i < len(sizes):
        j = i
        while j + 1 < len(sizes) and sizes[j + 1] == sizes[i]:
            j += 1
        count = j - i + 1
        parts.append(f"{sizes[i]}x{count}" if count > 1 else str(sizes[i]))
        i = j + 1
    return ",".join(parts)


def _sv(sv, value) -> str:
    """A singular value for the text: ``≈0`` below the rounding level max(m, n)·eps·σ_max of the
    Jacobians (rounding noise, whose digits differ from one BLAS to the next)."""
    noise = max(sv.shape[-1], 1) * np.finfo(float).eps * float(np.max(sv))
    return "≈0" if value <= noise else f"{value:.3g}"


def report_text(report) -> str:
    lines = []
    title = report.label or "network"
    lines.append(
        f"== {title}: sizes {_sizes(report.sizes)} ({report.depth} layers), B={report.batch}, "
        f"{report.dtype} on {report.device}, "
        + (f"loss {report.loss} = {report.loss_value:.4g}" if report.loss else "random unit cotangent")
        + " =="
    )
    head = (
        f"{'layer':>5} {'shape':>11} {'φ':>8} {'‖∂L/∂W‖':>9} {'‖δ‖':>9} {'‖J‖₂':>9} {'bound':>9} "
        f"{'‖W‖₂':>9} {'mean φ′':>9} {'active':>7} {'satur.':>7} {'dead':>5} {'χ':>9}"
    )
    lines.append(head)
    for f in report.layers:
        shape = f"{f.shape[0]}x{f.shape[1]}"
        pct = lambda v: ("nan" if math.isnan(v) else f"{v:.0%}").rjust(7)  # noqa: E731
        lines.append(
            f"{f.index:>5} {shape:>11} {f.activation[:8]:>8} {_g(f.grad_norm)} {_g(f.delta_norm)} "
            f"{_g(f.jacobian_norm)} {_g(f.jacobian_bound)} {_g(f.weight_spectral_norm)} {_g(f.derivative_mean)} "
            f"{pct(f.active_fraction)} {pct(f.saturated_fraction)} {f.dead_units:>5} {_g(f.chi)}"
            + ("" if f.finite else "  non-finite")
        )
    if 0 < report.norm_samples < report.batch:
        lines.append(f"‖J‖₂ and bound: mean over a seeded subsample of {report.norm_samples:,} of the {report.batch:,} "
                     f"samples; every other column over all {report.batch:,}")
    if report.nonfinite is not None:
        lines.append(f"non-finite: {report.nonfinite['message']}")
    xi = "inf" if math.isinf(report.depth_scale) else f"{report.depth_scale:.3g}"
    gamma = report.backward_gain
    if report.nonfinite is not None:
        lines.append("χ̄ and Γ: not computable — the values overflowed, which counts as exploding")
    else:
        lines.append(
            f"χ̄ = {report.chi_bar:.4g} per layer; over {report.depth} layers the squared gradient norm changes by "
            f"Γ = {gamma:.3g} (×{math.sqrt(gamma):.3g} in norm); depth scale ξ = 1/|ln χ̄| = {xi} layers"
        )
    sv = np.asarray(report.jacobian_singular_values)
    if sv.size:
        lines.append(
            f"input-output Jacobian ({report.spectrum_method}): ‖J‖₂ = {report.jacobian_spectral_norm:.3g}, "
            f"mean squared singular value = {report.mean_squared_singular_value:.3g}, singular values "
            f"{_sv(sv, sv.min())} … {_sv(sv, np.median(sv))} (median) … {sv.max():.3g}"
        )
    else:
        lines.append(
            f"input-output Jacobian ({report.spectrum_method}): ‖J‖₂ = {report.jacobian_spectral_norm:.3g}, "
            f"mean squared singular value = {report.mean_squared_singular_value:.3g} "
            f"({report.mean_squared_singular_value_method})"
        )
    spectrum = spectrum_verdict(sv) if sv.size else None
    if spectrum is not None:
        lines.append(f"spectrum: {spectrum}")
    lines.append(f"verdict: {report.verdict.upper()}" + (" (the spectrum: rank-deficient)" if spectrum else ""))
    for h in report.hints:
        lines.append(f"  - {h}")
    return "\n".join(lines)

