"""The one report type of ``gradient_flow`` (``GradientFlowReport``, for an MLP and a
``Sequential`` alike: one JSON schema, ``SCHEMA``) and the rendering of block reports
(``jacgrad.flow.block_flow``): the block rows (``BlockFlow``), hints that know the net's residual blocks and norm layers, the text
table. Beside ``report`` (the dense-layer rendering), whose number formatting it shares."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..core.backend import get_xp, to_numpy
from .report_plot import plot_reports
from .verdict import spectrum_verdict
from .io_spectrum import finish_spectrum
from .layer_rows import finish_leaves
from .report import _g, _json_safe, _sizes, hints, report_text
from .verdict import decide

__all__ = ["SCHEMA", "BlockFlow", "GradientFlowReport", "block_hints", "block_text", "finish_blocks", "inner_kinds",
           "report_from_partial"]

SCHEMA = "jacgrad.gradient_flow/2"  # to_dict()["schema"]: the version of the report's JSON layout
_LAYER_FIELDS = (
    "index", "shape", "activation", "grad_norm", "bias_grad_norm", "delta_norm", "jacobian_norm",
    "jacobian_bound", "weight_spectral_norm", "derivative_mean", "active_fraction", "dead_units",
    "saturated_fraction", "chi", "finite",
)
_SCALAR_FIELDS = (
    "label", "verdict", "depth_scale", "chi_bar", "backward_gain", "mean_squared_singular_value",
    "mean_squared_singular_value_method", "jacobian_spectral_norm", "spectrum_samples", "spectrum_method",
    "nonfinite", "sizes", "activations", "batch", "dtype", "device", "loss", "loss_value", "hints", "chi",
    "norm_samples", "has_residual", "norms",
)
_BLOCK_FIELDS = ("index", "kind", "h_in", "h_out", "chi", "chi_exact", "jacobian_norm", "jacobian_bound",
                 "grad_norm", "scale", "inner")


@dataclass
class BlockFlow:
    """Layer ``index`` of the network (``kind``: dense, residual, layernorm, rmsnorm), batch means:
    chi: ‖J‖_F²/h_out, the MLP report's χ_j = ‖J_j‖_F²/H_j (docs/gradient-flow.md) (exact, or a Hutchinson estimate for large blocks — ``chi_exact``);
    jacobian_norm: ‖J‖₂ per sample, averaged; jacobian_bound: the factor's ``norm_bound`` per
    sample, averaged (dense: max|d|·‖W‖₂; residual: 1 + |s|·Π of the inner bounds;
    normalisation: max|γ|/σ); grad_norm: ‖∂L/∂θ‖ of the block's parameters (Euclidean, all
    together; 0 for a layer without any); scale: the residual branch scale, else None; inner:
    a residual block's inner layers (``dense:tanh``, ``layernorm``), else []."""

    index: int
    kind: str
    h_in: int
    h_out: int
    chi: float
    chi_exact: bool
    jacobian_norm: float
    jacobian_bound: float
    grad_norm: float
    scale: float | None = None
    inner: list[str] = field(default_factory=list)


def finish_blocks(p: dict) -> list[BlockFlow]:
    """A ``BlockFlow`` per top-level layer from a (merged) partial of ``jacgrad.flow.block_flow``."""
    N, S = p["count"], p["norm_count"] or math.nan  # the norms' samples: all N, or the subsample
    per = N if p["loss_sum"] is not None else 1  # a mean loss's gradient: the per-sample sums over N
    rows = []
    for j, b in enumerate(p["blocks"]):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowed gradient's norm is inf (or NaN), no warning
            grad_norm = float(to_numpy(get_xp(b["grad"]).linalg.norm(b["grad"]))) / per if b["grad"].size else 0.0
        rows.append(BlockFlow(j, b["kind"], b["h_in"], b["h_out"], b["chi_sum"] / N, b["chi_exact"], b["norm_sum"] / S,
                              b["bound_sum"] / S, grad_norm, b["scale"], b["inner"]))
    return rows


def inner_kinds(layer) -> list[str]:
    """What a residual block holds: its inner layers' kinds (``dense:tanh``, ``layernorm``); a
    projection shortcut's layers after them, marked ``shortcut>conv2d``."""
    name = lambda L: f"{L.kind}:{L.activation}" if L.kind == "dense" else L.kind  # noqa: E731
    branch, short = getattr(layer, "branch", getattr(layer, "layers", ())), getattr(layer, "shortcut", None) or ()
    return [name(L) for L in branch] + [f"shortcut>{name(L)}" for L in short]


def block_hints(report) -> list[str]:
    """Advice for an unhealthy block report (empty when healthy) that knows what the net already
    has: no "add residual connections" to a net with residual blocks, no "normalise" to one
    with norm layers — those get what to change in the cure they have instead."""
    if report.verdict == "healthy":
        return []
    out: list[str] = []
    blocks = report.blocks
    finite = [b for b in blocks if math.isfinite(b.chi) and b.kind != "embedding"]  # ids in: no input Jacobian
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


def _block_what(b) -> str:
    if b.kind != "residual":
        return b.kind
    short = [n.split(">", 1)[1].split(":")[-1] for n in b.inner if n.startswith("shortcut>")]
    skip = f"[{','.join(short)}](x)" if short else "x"  # a projection shortcut p(x) + s·f(x)
    runs: list[list] = []
    for name in (n.split(":")[-1] for n in b.inner if not n.startswith("shortcut>")):  # dense:tanh -> tanh; tanh×2
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return f"{skip}+{b.scale:g}·[{','.join(n if k == 1 else f'{n}×{k}' for n, k in runs)}]"


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
    gained = sum(b.kind != "embedding" for b in report.blocks)  # ids in: an Embedding is not in Γ
    lines.append(f"χ̄ = {report.chi_bar:.4g} per block; over {gained} blocks the squared gradient norm changes by "
                 f"Γ = {g:.3g} (×{math.sqrt(g):.3g} in norm); depth scale ξ = {xi} blocks")
    lines.append(f"input-output Jacobian: ‖J‖₂ = {report.jacobian_spectral_norm:.3g}")
    spectrum = report.spectrum_verdict
    if spectrum is not None:
        lines.append(f"spectrum: {spectrum}")
    lines.append(f"verdict: {report.verdict.upper()}" + (" (the spectrum: rank-deficient)" if spectrum else ""))
    lines += [f"  - {h}" for h in report.hints]
    return "\n".join(lines)



def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass(repr=False)
class GradientFlowReport:
    """What ``gradient_flow`` found, for an MLP (a dense-layer report) or a ``Sequential`` (a
    block report); ``BlockFlowReport`` is another name of this class.

    layers: a ``LayerFlow`` per dense layer (an MLP's report; ``[]`` in a block report);
    blocks: a ``BlockFlow`` per top-level layer of a ``Sequential`` (an MLP's report has none:
    ``report.blocks`` is an ``AttributeError``, ``report.has_blocks`` says which); chi: per-row
    χ_j = ‖J_j‖_F²/H_j (list); chi_bar: their geometric mean χ̄; backward_gain: their product
    Γ = χ̄^L; depth_scale: ξ = 1/|ln χ̄| rows per e-fold of the squared gradient norm (inf at
    χ̄ = 1); verdict: "vanishing" | "exploding" | "healthy" (``_verdict.decide`` over ``chi``);
    jacobian_spectral_norm: mean ‖J‖₂ of the input-output Jacobian; jacobian_singular_values:
    ``(S, k)`` host array for the first S samples (``spectrum_samples``; ``(0, k)`` when
    skipped); spectrum_verdict: ``_verdict.spectrum_verdict`` of them (None, or the
    rank-deficiency sentence); mean_squared_singular_value: ‖J‖_F²/n_in, batch mean; hints: concrete advice for an unhealthy verdict; nonfinite: None, or
    where the values first went non-finite (``{"layer", "stage", "message"}``); has_residual,
    norms: what the net already has (False and [] for an MLP); norm_samples: how many samples
    the ‖J‖₂ and bound columns average over.

    ``str(report)`` (and ``print(report)``) is the text table; ``repr`` is one short line;
    ``to_dict()`` has the same top-level keys for both kinds, ``"schema": SCHEMA`` among them.
    """

    chi: list[float]
    chi_bar: float
    backward_gain: float
    verdict: str
    depth_scale: float
    jacobian_spectral_norm: float
    sizes: list[int]
    activations: list[str]
    batch: int
    dtype: str
    device: str
    loss: str | None
    loss_value: float | None
    layers: list = field(default_factory=list)
    block_rows: list | None = None
    hints: list[str] = field(default_factory=list)
    nonfinite: dict | None = None
    mean_squared_singular_value: float = math.nan
    mean_squared_singular_value_method: str = "not computed"
    jacobian_singular_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    spectrum_samples: int = 0
    spectrum_method: str = "not computed"
    has_residual: bool = False
    norms: list[str] = field(default_factory=list)
    label: str = ""
    meta: dict = field(default_factory=dict)
    norm_samples: int = 0

    @property
    def has_blocks(self) -> bool:
        return self.block_rows is not None

    @property
    def blocks(self) -> list:
        if self.block_rows is None:
            raise AttributeError("this report has no blocks: it is an MLP's (one row per dense layer, in .layers); "
                                 "a jacgrad.Sequential's report has .blocks")
        return self.block_rows

    @property
    def depth(self) -> int:
        return len(self.block_rows) if self.has_blocks else len(self.layers)

    @property
    def spectrum_verdict(self) -> str | None:
        sv = np.asarray(self.jacobian_singular_values)
        return spectrum_verdict(sv) if sv.size else None

    def to_dict(self) -> dict:
        """Plain Python values (lists, floats, ints, strings; non-finite floats stay floats), the
        same top-level keys for both kinds: ``schema``, ``kind`` ("layers" or "blocks"), the
        whole-net numbers, ``layers`` (a dict per dense layer), ``blocks`` (a dict per block, or
        None), ``jacobian_singular_values`` and ``spectrum_verdict``."""
        out = {"schema": SCHEMA, "kind": "blocks" if self.has_blocks else "layers"}
        out.update({name: _plain(getattr(self, name)) for name in _SCALAR_FIELDS})
        out["depth"] = self.depth
        out["layers"] = [{name: _plain(getattr(f, name)) for name in _LAYER_FIELDS} for f in self.layers]
        out["blocks"] = ([{name: _plain(getattr(b, name)) for name in _BLOCK_FIELDS} for b in self.block_rows]
                         if self.has_blocks else None)
        out["jacobian_singular_values"] = np.asarray(self.jacobian_singular_values).tolist()
        out["spectrum_verdict"] = self.spectrum_verdict
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict`` as strict JSON: inf, -inf and NaN are written as the strings "inf", "-inf", "nan"."""
        return json.dumps(_json_safe(self.to_dict()), indent=indent, allow_nan=False, ensure_ascii=False)

    def to_text(self) -> str:
        """A readable table (a row per layer or per block), the whole-net numbers, the verdict and the hints."""
        return block_text(self) if self.has_blocks else report_text(self)

    __str__ = to_text

    def __repr__(self) -> str:
        label = f"{self.label!r}, " if self.label else ""
        if self.has_blocks:
            return (f"BlockFlowReport({label}{self.depth} blocks, B={self.batch}, verdict={self.verdict!r}, "
                    f"chi_bar={self.chi_bar:.4g})")
        sizes = "-".join(str(s) for s in self.sizes) if len(self.sizes) <= 6 else f"{self.sizes[0]}-…-{self.sizes[-1]}"
        return (f"GradientFlowReport({label}sizes {sizes}, {self.depth} layers, B={self.batch}, "
                f"verdict={self.verdict!r}, chi_bar={self.chi_bar:.4g})")

    def plot(self, path, dpi: float | None = None) -> None:
        """Save the figure at ``path``, in the format its suffix names (``.png``, ``.svg``, ``.pdf``,
        …; another suffix is a ``ValueError`` listing the valid ones), at ``dpi`` (default 100):
        per-layer (or per-block) gradient and Jacobian norms with their bounds (log scale), χ per
        row against its healthy band, and the input-output Jacobian's singular-value histogram (a
        block report: its ‖J‖₂ and what the blocks are). Needs matplotlib (``jacgrad[plot]``)."""
        plot_reports([self], path, dpi=dpi)


BlockFlowReport = GradientFlowReport


def report_from_partial(p: dict, label: str = "") -> GradientFlowReport:
    """The ``GradientFlowReport`` of a (merged) partial of ``jacgrad.flow.block_flow`` (``partials``,
    ``ReportChunk``): an MLP's ``.layers`` report, or a ``.blocks`` report."""
    layers = finish_leaves(p)
    N, (n_in, n_out) = p["count"], p["io_widths"]
    nonfinite = None if p["nonfinite"] is None else {k: v for k, v in p["nonfinite"].items() if k != "key"}
    common = dict(layers=layers, sizes=p["sizes"], activations=p["activations"], batch=N, dtype=p["dtype"],
                  device=p["device"], loss=p["loss"], loss_value=None if p["loss_sum"] is None else p["loss_sum"] / N,
                  label=label, norm_samples=int(p["norm_count"]),
                  **finish_spectrum(p["spectrum"], n_in, min(n_in, n_out), p["spectrum"] is None))
    if p["blocks"] is None:  # layers only (an MLP)
        if nonfinite is not None and nonfinite["stage"] == "forward":  # the backward pass ran through the overflow
            for f in layers:
                f.grad_norm = f.bias_grad_norm = f.delta_norm = math.nan
        verdict, chi_bar, gamma, xi = decide([f.chi for f in layers], nonfinite is not None)
        report = GradientFlowReport(chi=[f.chi for f in layers], chi_bar=chi_bar, backward_gain=gamma, depth_scale=xi,
                                    verdict=verdict, nonfinite=nonfinite, **common)
        report.hints = hints(report)
        return report
    rows = finish_blocks(p)
    gains = [r.chi for r in rows if r.kind != "embedding"]  # ids in: an Embedding has no input Jacobian
    verdict, chi_bar, gamma, xi = decide(gains, not all(math.isfinite(c) for c in gains))
    common["jacobian_spectral_norm"] = p["norm_sum"] / (p["norm_count"] or math.nan)  # the blocks' own sweep's
    first = next((r for r in rows if not math.isfinite(r.chi)), None)
    report = BlockFlowReport(
        block_rows=rows, chi=[r.chi for r in rows], chi_bar=chi_bar, backward_gain=gamma, depth_scale=xi,
        verdict=verdict, has_residual=p["has_residual"], norms=p["norms"], **common,
        nonfinite=None if first is None else {"layer": first.index, "stage": "blocks",
                                              "message": f"block {first.index} ({first.kind}) went non-finite"},
    )
    report.hints = block_hints(report)
    return report
