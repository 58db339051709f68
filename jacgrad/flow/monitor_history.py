"""A training run's history as a ``jg.Monitor`` wrote it (``read_log``'s rows): a text summary
(``history_text``) and a figure (``plot_history``: one panel per column — ‖∂L/∂W‖, χ, ‖J‖₂, dead
fraction — against the step, one line per layer; matplotlib imported only here)."""

from __future__ import annotations

import math
import os

from .report_plot import _pyplot, plot_format
from .verdict import healthy_chi_band

__all__ = ["COLUMNS", "history_text", "plot_history"]

COLUMNS = (("grad_norm", "‖∂L/∂W_j‖", True), ("chi", "χ_j", True), ("spectral_norm", "‖J_j‖₂ (mean)", True),
           ("dead_fraction", "dead fraction", False))


def _name(row: dict) -> str:
    return row["module"] if row.get("module") is not None else str(row["index"])


def _g(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def series(rows: list, column: str) -> dict:
    """layer name -> ``(steps, values)`` of ``column`` (None values left out)."""
    out: dict = {}
    for row in rows:
        for L in row["layers"]:
            if L.get(column) is not None:
                steps, values = out.setdefault(_name(L), ([], []))
                steps.append(row["step"])
                values.append(L[column])
    return out


def history_text(rows: list, path: str = "") -> str:
    """What happened over the run: its rows and steps, the verdict at each change, and per layer
    the first and last value of each column."""
    if not rows:
        return f"{path}: no rows"
    first, last = rows[0], rows[-1]
    lines = [f"== {os.path.basename(path) or 'run'}: {len(rows)} reports, steps {first['step']} … {last['step']}, "
             f"{last['rows']} ({len(last['layers'])}) ==",
             "verdict: " + " → ".join(f"{r['verdict']} (step {r['step']})" for i, r in enumerate(rows)
                                      if i == 0 or r["verdict"] != rows[i - 1]["verdict"])]
    lines.append(f"χ̄: {_g(first.get('chi_bar'))} → {_g(last.get('chi_bar'))};  ‖J‖₂ of the network: "
                 f"{_g(first.get('jacobian_spectral_norm'))} → {_g(last.get('jacobian_spectral_norm'))}")
    head = "".join(f"{label:>26}" for _, label, _ in COLUMNS)
    lines.append(f"{'layer':<12}{head}   (first → last)")
    by_name = {_name(L): [L, None] for L in first["layers"]}
    for L in last["layers"]:
        by_name.setdefault(_name(L), [None, None])[1] = L
    for name, (a, b) in by_name.items():
        cells = "".join(f"{_g(a and a.get(c)) + ' → ' + _g(b and b.get(c)):>26}" for c, _, _ in COLUMNS)
        lines.append(f"{name:<12}{cells}")
    seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
    if seconds:
        lines.append(f"report time: {sum(seconds) / len(seconds) * 1e3:.3g} ms on average")
    return "\n".join(lines)


def plot_history(rows: list, path, dpi: float | None = None) -> None:
    """Write the run's figure to ``path`` (format by suffix; ``ImportError`` without matplotlib,
    ``ValueError`` for an unknown suffix)."""
    fmt = plot_format(path)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(16, 4), dpi=dpi or 100)
    try:
        for ax, (column, label, log) in zip(axes, COLUMNS):
            for name, (steps, values) in series(rows, column).items():
                ax.plot(steps, values, marker=".", label=name)
            if column == "chi":
                depth = max(len(rows[-1]["layers"]), 1)
                lo, hi = healthy_chi_band(depth)
                ax.axhspan(lo, hi, color="green", alpha=0.08, label="healthy χ̄")
            if log and any(v > 0 and math.isfinite(v) for _, vs in series(rows, column).values() for v in vs):
                ax.set_yscale("log")
            ax.set_title(label)
            ax.set_xlabel("step")
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=max(1, len(labels) // 12 + 1))
        changes = [r for i, r in enumerate(rows) if i and r["verdict"] != rows[i - 1]["verdict"]]
        for ax in axes:
            for r in changes:
                ax.axvline(r["step"], color="gray", lw=0.6, ls=":")
        fig.suptitle(f"gradient flow over training ({len(rows)} reports; verdict now {rows[-1]['verdict']})")
        fig.tight_layout(rect=(0, 0, 0.92, 0.95))
        fig.savefig(os.fspath(path), format=fmt)
    finally:
        plt.close(fig)
