"""Rendering of a ``BlockFlowReport`` (``jacgrad.block_flow``): hints that know the net's
residual blocks and norm layers, plain dict / JSON, the text table. Beside ``report`` (the
dense-layer report's rendering), whose number formatting it shares."""

from __future__ import annotations

import json
import math

from .report import _g, _json_safe, _plain, _sizes

__all__ = ["block_dict", "block_hints", "block_json", "block_text"]

_BLOCK_SCALARS = (
    "label", "verdict", "depth_scale", "chi_bar", "backward_gain", "jacobian_spectral_norm", "sizes",
    "activations", "has_residual", "norms", "batch", "dtype", "device", "loss", "loss_value", "hints", "chi",
    "norm_samples",
)
_BLOCK_FIELDS = ("index", "kind", "h_in", "h_out", "chi", "chi_exact", "jacobian_norm", "jacobian_bound",
                 "grad_norm", "scale", "inner")


def block_hints(report) -> list[str]:
    """Advice for an unhealthy block report (empty when healthy) that knows what the net already
    has: no "add residual connections" to a net with residual blocks, no "normalise" to one
    with norm layers — those get what to change in the cure they have instead."""
    if report.verdict == "healthy":
        return []
    out: list[str] = []
    blocks = report.blocks
    finite = [b for b in blocks if math.isfinite(b.chi)]
    if len(finite) < len(blocks):
        out.append("the values overflowed (non-finite χ): the weights are far too large for this depth — "
                   "re-initialise smaller before anything else")
    n_res = sum(b.kind == "residual" for b in blocks)
    scales = sorted({abs(b.scale) for b in blocks if b.kind == "residual"})
    if report.verdict == "vanishing":
        if "sigmoid" in report.activations:
            out.append("activation: sigmoid passes at most 1/4 of a signal per layer (σ' ≤ 1/4); use tanh or a "
                       "ReLU-family activation in the hidden layers")
        if finite:
            worst = min(finite, key=lambda b: b.chi)
            out.append(f"the smallest χ is block {worst.index} ({worst.kind}, χ = {worst.chi:.3g}, ‖J‖₂ = "
                       f"{worst.jacobian_norm:.3g})")
        if report.has_residual:
            plain = [b for b in finite if b.kind != "residual" and b.chi < 1]
            where = (f"; the gradient is lost outside them, in block{'s' if len(plain) > 1 else ''} "
                     f"{', '.join(str(b.index) for b in plain)}" if plain else "")
            out.append(f"residual blocks are already there ({n_res}, branch scale {', '.join(f'{v:g}' for v in scales)}): "
                       f"a block's χ = 1 + 2s·tr(J_f)/H + s²·‖J_f‖_F²/H stays near 1 unless its branch cancels the "
                       f"identity{where}; check the blocks with χ < 1 above")
        else:
            out.append("architecture: residual connections (z + s·f(z)) add the identity to every block Jacobian so "
                       "the product cannot collapse (jacgrad report --residual K shows the effect)")
        if report.norms:
            lows = [b for b in finite if b.kind in ("layernorm", "rmsnorm") and b.chi < 1]
            if lows:
                out.append(f"{', '.join(report.norms)} is already there; norm blocks "
                           f"{', '.join(str(b.index) for b in lows)} shrink the gradient (their ‖J‖ ≈ |γ|/σ: the "
                           "activations they see have σ > |γ|), so raise γ or keep the stream's variance near 1")
        else:
            out.append("normalisation (LayerNorm/RMSNorm) keeps the pre-activations where φ' is large")
    else:
        if 0 < report.chi_bar < math.inf:
            out.append(f"each block multiplies the squared gradient norm by χ̄ = {report.chi_bar:.3g} on average; "
                       f"scale the weights by ≈{1 / math.sqrt(report.chi_bar):.3g}")
        if report.has_residual:
            out.append(f"the {n_res} residual blocks add up (each χ ≈ 1 + s²·χ_f): scale the branches down, "
                       f"e.g. s ≈ 1/√{n_res} = {1 / math.sqrt(n_res):.3g} (now {', '.join(f'{v:g}' for v in scales)})")
        if not report.norms:
            out.append("normalisation (LayerNorm/RMSNorm) re-scales the activations every block")
        out.append("training: clip gradients by their global norm so one step cannot blow up while the cause is fixed")
    return out


def block_dict(report) -> dict:
    out = {name: _plain(getattr(report, name)) for name in _BLOCK_SCALARS}
    out["depth"] = report.depth
    out["blocks"] = [{name: _plain(getattr(b, name)) for name in _BLOCK_FIELDS} for b in report.blocks]
    return out


def block_json(report, indent: int | None = 2) -> str:
    return json.dumps(_json_safe(block_dict(report)), indent=indent, allow_nan=False, ensure_ascii=False)


def _block_what(b) -> str:
    if b.kind != "residual":
        return b.kind
    runs: list[list] = []
    for name in (n.split(":")[-1] for n in b.inner):  # dense:tanh -> tanh; runs of one name -> tanh×2
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return f"x+{b.scale:g}·[{','.join(n if k == 1 else f'{n}×{k}' for n, k in runs)}]"


def block_text(report) -> str:
    title = report.label or "network"
    lines = [
        f"== {title}: sizes {_sizes(report.sizes)} ({report.depth} blocks), B={report.batch}, {report.dtype} on "
        f"{report.device}, " + (f"loss {report.loss} = {report.loss_value:.4g}" if report.loss else "random unit cotangent")
        + " ==",
        f"{'block':>5} {'shape':>11} {'what':<34} {'‖∂L/∂θ‖':>9} {'‖J‖₂':>9} {'bound':>9} {'χ':>9}",
    ]
    for b in report.blocks:
        what = _block_what(b)
        what = what if len(what) <= 34 else what[:33] + "…"
        lines.append(f"{b.index:>5} {f'{b.h_in}x{b.h_out}':>11} {what:<34} {_g(b.grad_norm)} {_g(b.jacobian_norm)} "
                     f"{_g(b.jacobian_bound)} {_g(b.chi)}" + ("" if b.chi_exact else " (est.)"))
    if 0 < report.norm_samples < report.batch:
        lines.append(f"‖J‖₂ and bound: mean over a seeded subsample of {report.norm_samples:,} of the {report.batch:,} "
                     f"samples; every other column over all {report.batch:,}")
    xi = "inf" if math.isinf(report.depth_scale) else f"{report.depth_scale:.3g}"
    g = report.backward_gain
    lines.append(f"χ̄ = {report.chi_bar:.4g} per block; over {report.depth} blocks the squared gradient norm changes by "
                 f"Γ = {g:.3g} (×{math.sqrt(g):.3g} in norm); depth scale ξ = {xi} blocks")
    lines.append(f"input-output Jacobian: ‖J‖₂ = {report.jacobian_spectral_norm:.3g}")
    lines.append(f"verdict: {report.verdict.upper()}")
    lines += [f"  - {h}" for h in report.hints]
    return "\n".join(lines)
