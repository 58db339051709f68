"""The gradient-flow report's figure: one row of three panels per report (matplotlib, imported
only when a plot is made). A layer report (``GradientFlowReport``): per-layer norms, χ per layer
against its healthy band, the input-output singular values. A block report (``BlockFlowReport``):
the same per block, and the whole Jacobian's ‖J‖₂ in place of the spectrum, which it does not
compute. The format is the one the path's suffix names (``.png``, ``.svg``, ``.pdf``, …)."""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np

from .verdict import GAIN_BAND, healthy_chi_band, spectrum_verdict

__all__ = ["DEFAULT_DPI", "PLOT_INSTALL_HINT", "histogram_bins", "plot_format", "plot_reports"]

PLOT_INSTALL_HINT = 'plots need matplotlib: pip install "jacgrad[plot]"'
DEFAULT_DPI = 100  # 13 inches wide: 1300 pixels, legends at 9 points readable without zooming
_LEGEND_POINTS = 9


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(PLOT_INSTALL_HINT) from exc
    return plt


def plot_format(path) -> str:
    """The file format ``path``'s suffix names (``"png"``, ``"svg"``, ``"pdf"``, …, lower case), as
    matplotlib writes it. A missing or unknown suffix is a ``ValueError`` listing the valid ones;
    no matplotlib is an ``ImportError`` with the install hint."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    valid = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in valid:
        named = f"its suffix .{suffix}" if suffix else "it has no suffix"
        raise ValueError(f"plot path {os.fspath(path)!r}: {named}, which names no format matplotlib writes; "
                         f"valid suffixes: {', '.join('.' + s for s in valid)}")
    return suffix


def check_dpi(dpi) -> float | None:
    """``dpi`` as a float (None: ``DEFAULT_DPI``); anything but a finite number > 0 is a ``ValueError``."""
    if dpi is None:
        return None
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not (math.isfinite(dpi) and dpi > 0):
        raise ValueError(f"dpi must be a finite number > 0 (dots per inch), or None for {DEFAULT_DPI}; got {dpi!r}")
    return float(dpi)


def plot_reports(reports: Sequence, path, dpi: float | None = None) -> None:
    """One row of three panels per report (layer or block reports, mixed as given), saved at
    ``path`` in the format its suffix names, at ``dpi`` dots per inch (default ``DEFAULT_DPI``).

    Raises ``ValueError`` for an unknown suffix or a bad ``dpi`` (before drawing anything),
    ``ImportError`` with the install hint when matplotlib is missing, ``OSError`` when ``path``
    cannot be written.
    """
    fmt = plot_format(path)
    dpi = check_dpi(dpi) or DEFAULT_DPI
    plt = _pyplot()
    n = len(reports)
    fig, axes = plt.subplots(n, 3, figsize=(13, 4.4 * n), squeeze=False)
    try:
        for row, rep in zip(axes, reports):
            if rep.has_blocks:
                _plot_blocks(row, rep)
            else:
                _plot_one(row, rep)
        fig.tight_layout()
        if fmt != "png":
            fig.savefig(path, dpi=dpi, format=fmt)
            return
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    # Line plots need few colours: a 256-colour palette PNG is ~4x smaller and looks the same.
    from PIL import Image  # matplotlib depends on Pillow

    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)


def _positive(values):
    a = np.asarray(values, dtype=float)
    return np.where(a > 0, a, np.nan)


def histogram_bins(count: int) -> int:
    """Bins for ``count`` values: about 2√count, at least 5 and at most 40 (6 singular values get
    5 bins, not 40 mostly empty ones)."""
    return int(min(40, max(5, math.ceil(2 * math.sqrt(max(count, 0))))))


def _legend_below(ax, ncol: int) -> None:
    """The legend under the axes, outside them, so it never covers a curve."""
    ax.legend(fontsize=_LEGEND_POINTS, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=ncol, frameon=False)


def _log_labels(axis) -> None:
    """Readable labels on a log axis: over less than two decades, plain numbers at 1, 2 and 5
    times a power of ten (every minor tick within a factor 3); otherwise the decades only."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = axis.get_view_interval()
    if not (lo > 0 and hi / lo < 100):
        axis.set_minor_formatter(NullFormatter())
        return
    every = hi / lo < 3

    def label(v, _):
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:.2g}" if every or lead in (1, 2, 5) else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def _title(rep, unit: str, extra: str = "") -> str:
    gamma = rep.backward_gain
    gain = f"Γ = {gamma:.3g}" if math.isfinite(gamma) else "Γ = inf"
    return f"{rep.label or 'network'}\n{rep.verdict.upper()}{extra}: {gain} over {len(rep.chi)} {unit}"


def _chi_panel(ax, idx, rep, unit: str) -> None:
    """χ per layer (or block), the healthy band of χ̄ for this depth shaded, χ̄ and χ = 1 drawn."""
    lo, hi = healthy_chi_band(len(rep.chi))
    ax.axhspan(lo, hi, color="tab:green", alpha=0.15, lw=0,
               label=f"healthy χ̄ ({lo:.3g}–{hi:.3g}: Γ within 1/{GAIN_BAND:g}…{GAIN_BAND:g})")
    ax.plot(idx, _positive(rep.chi), marker="o", ms=3, label=rf"$\chi_j$ per {unit[:-1]}")
    if math.isfinite(rep.chi_bar) and rep.chi_bar > 0:
        ax.axhline(rep.chi_bar, color="tab:red", lw=1.0, ls=":", label=f"χ̄ = {rep.chi_bar:.3g}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label=r"$\chi = 1$")
    ax.set_yscale("log")
    ax.set_xlabel(f"{unit[:-1]} j")
    ax.set_ylabel(r"$\chi_j = \|J_j\|_F^2 / H_j$")
    ax.set_title(f"χ per {unit[:-1]}: χ̄ = {rep.chi_bar:.3g}", fontsize=10)
    _legend_below(ax, ncol=2)


def _integer_axes(row, count: int) -> None:
    from matplotlib.ticker import MaxNLocator

    for a in row[:2]:
        a.set_xlim(-0.5, max(count - 0.5, 0.5))
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        _log_labels(a.yaxis)


def _plot_one(row, rep) -> None:
    idx = [f.index for f in rep.layers]
    ax = row[0]
    for name, label in (
        ("grad_norm", r"$\|\partial L/\partial W_j\|_F$"),
        ("delta_norm", r"$\|\delta_j\|_F$"),
        ("jacobian_norm", r"$\|J_j\|_2$"),
        ("jacobian_bound", r"$\max|\varphi'|\,\|W_j\|_2$"),
    ):
        ax.plot(idx, _positive([getattr(f, name) for f in rep.layers]), marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer j")
    ax.set_ylabel("norm (log scale)")
    where = f" (non-finite from layer {rep.nonfinite['layer']})" if rep.nonfinite else ""
    ax.set_title(_title(rep, "layers", where), fontsize=10)
    _legend_below(ax, ncol=2)
    _chi_panel(row[1], idx, rep, "layers")
    _integer_axes(row, len(idx))
    _spectrum_panel(row[2], rep)


def _spectrum_panel(ax, rep) -> None:
    """The histogram of the input-output Jacobian's singular values (or why there is none)."""
    from matplotlib.ticker import MaxNLocator

    sv = np.asarray(rep.jacobian_singular_values, dtype=float)
    spectrum = spectrum_verdict(sv) if sv.size else None
    if sv.size:
        # below max(m, n)·eps·σ_max a singular value is rounding noise of a rank-deficient J
        noise = max(sv.shape[1], 1) * np.finfo(float).eps * sv[:, :1]
        zero = int((sv <= noise).sum())
        shown = sv[(sv > noise) & np.isfinite(sv)]
    else:
        shown = sv
    if shown.size:
        lo, hi = np.log10(shown.min()), np.log10(shown.max())
        if hi - lo < 1e-3:  # all (nearly) equal: one decade around them
            lo, hi = lo - 0.5, hi + 0.5
        ax.hist(shown, bins=np.logspace(lo, hi, histogram_bins(shown.size) + 1))
        ax.set_xscale("log")
        median = float(np.median(sv))
        if median > 0:
            ax.axvline(median, color="tab:red", lw=1.0, ls=":")
        title = f"singular values of ∂y/∂x ({rep.spectrum_samples} samples)\n" + (
            "RANK-DEFICIENT: the median (dotted) ≪ the largest" if spectrum else f"median {median:.2g} (dotted)")
        ax.set_title(title, fontsize=10, color="tab:red" if spectrum else "black")
        _log_labels(ax.xaxis)
        ax.set_xlabel(f"σ ({zero} numerically zero, not shown)" if zero else "σ")
    else:
        ax.text(0.5, 0.5, f"spectrum {rep.spectrum_method}", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_title("singular values of ∂y/∂x", fontsize=10)
        ax.set_xlabel("σ")
    ax.set_ylabel("count")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_blocks(row, rep) -> None:
    """A block report: per block ‖∂L/∂θ‖, ‖J‖₂ and its bound; χ per block; the input-output
    singular values as for a layer report, or (spectrum skipped) the whole Jacobian's ‖J‖₂ and
    what the blocks are, in words."""
    idx = [b.index for b in rep.blocks]
    ax = row[0]
    for name, label in (
        ("grad_norm", r"$\|\partial L/\partial\theta_j\|$"),
        ("jacobian_norm", r"$\|J_j\|_2$"),
        ("jacobian_bound", "bound of $\\|J_j\\|_2$"),
    ):
        ax.plot(idx, _positive([getattr(b, name) for b in rep.blocks]), marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("block j")
    ax.set_ylabel("norm (log scale)")
    ax.set_title(_title(rep, "blocks"), fontsize=10)
    _legend_below(ax, ncol=3)
    _chi_panel(row[1], idx, rep, "blocks")
    _integer_axes(row, len(idx))
    ax = row[2]
    if np.asarray(rep.jacobian_singular_values).size:
        _spectrum_panel(ax, rep)
        return
    kinds: dict[str, int] = {}
    for b in rep.blocks:
        kinds[b.kind] = kinds.get(b.kind, 0) + 1
    lines = [f"input-output ‖J‖₂ = {rep.jacobian_spectral_norm:.3g} (mean over {rep.batch} samples)",
             "blocks: " + ", ".join(f"{n} {k}" for k, n in kinds.items()),
             f"χ̄ = {rep.chi_bar:.3g} per block, Γ = {rep.backward_gain:.3g}",
             f"verdict: {rep.verdict.upper()}"]
    ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", transform=ax.transAxes, fontsize=_LEGEND_POINTS + 1)
    ax.set_title("the whole network", fontsize=10)
    ax.set_axis_off()
