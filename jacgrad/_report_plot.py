"""The gradient-flow report's figure: one row of three panels per report (matplotlib, imported
only when a plot is made): per-layer norms, χ per layer, the input-output singular values."""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

__all__ = ["PLOT_INSTALL_HINT", "histogram_bins", "plot_reports"]

PLOT_INSTALL_HINT = 'plots need matplotlib: pip install "jacgrad[plot]"'


def plot_reports(reports: Sequence, path) -> None:
    """One row of three panels per report, saved as a PNG at ``path`` (matplotlib, Agg backend).

    Raises ``ImportError`` with the install hint when matplotlib is missing, ``OSError`` when
    ``path`` cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(PLOT_INSTALL_HINT) from exc
    n = len(reports)
    fig, axes = plt.subplots(n, 3, figsize=(13, 3.8 * n), squeeze=False)
    try:
        for row, rep in zip(axes, reports):
            _plot_one(row, rep)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=80, format="png")
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
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


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


def _plot_one(row, rep) -> None:
    from matplotlib.ticker import MaxNLocator

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
    ax.set_title(f"{rep.label or 'network'}: {rep.verdict}{where}", fontsize=10)
    _legend_below(ax, ncol=4)
    ax = row[1]
    ax.plot(idx, _positive(rep.chi), marker="o", ms=3, label=r"$\chi_j$")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label=r"$\chi = 1$")
    ax.set_yscale("log")
    ax.set_xlabel("layer j")
    ax.set_ylabel(r"$\chi_j = \|J_j\|_F^2 / H_j$")
    ax.set_title(f"χ per layer (χ̄ = {rep.chi_bar:.3g})", fontsize=10)
    _legend_below(ax, ncol=2)
    for a in row[:2]:
        a.set_xlim(-0.5, max(len(idx) - 0.5, 0.5))
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        _log_labels(a.yaxis)
    ax = row[2]
    sv = np.asarray(rep.jacobian_singular_values, dtype=float)
    if sv.size:
        # below max(m, n)·eps·σ_max a singular value is rounding noise of a rank-deficient J
        noise = max(sv.shape[1], 1) * np.finfo(float).eps * sv[:, :1]
        zero = int((sv <= noise).sum())
        sv = sv[(sv > noise) & np.isfinite(sv)]
    if sv.size:
        lo, hi = np.log10(sv.min()), np.log10(sv.max())
        if hi - lo < 1e-3:  # all (nearly) equal: one decade around them
            lo, hi = lo - 0.5, hi + 0.5
        ax.hist(sv, bins=np.logspace(lo, hi, histogram_bins(sv.size) + 1))
        ax.set_xscale("log")
        ax.set_title(f"singular values of ∂y/∂x ({rep.spectrum_samples} samples)", fontsize=10)
        _log_labels(ax.xaxis)
        ax.set_xlabel(f"σ ({zero} numerically zero, not shown)" if zero else "σ")
    else:
        ax.text(0.5, 0.5, f"spectrum {rep.spectrum_method}", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_title("singular values of ∂y/∂x", fontsize=10)
        ax.set_xlabel("σ")
    ax.set_ylabel("count")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
