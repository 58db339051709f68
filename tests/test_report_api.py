"""The report's one χ definition (the summary derivable from the table), its input checks, its
str/repr, its plot, and the import direction diagnostics -> report."""

import ast
import importlib.util
import math
import pathlib
import re

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow import diagnostics as diagnostics_module
from jacgrad.flow import report as report_module
from jacgrad.flow.diagnostics import gradient_flow



def _tapering_net(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [40, 24, 24, 16, 5]  # a small 784,256x4,10: χ over H_j and over H_{j-1} differ here
    Ws = [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]
    return jg.MLP(Ws, [rng.standard_normal(b) * 0.1 for b in sizes[1:]], ["tanh", "relu", "tanh", "identity"])


def test_chi_bar_is_the_geometric_mean_of_the_chi_column_on_a_non_square_net():
    net = _tapering_net()
    x = np.random.default_rng(1).standard_normal((12, 40))
    rep = gradient_flow(net, x)
    # independent: χ_j = mean over samples of ‖J_j‖_F² / H_j from the dense per-sample Jacobians
    z, chi = x, []
    for W, b, name in zip(net.weights, net.biases, net.activations):
        act = jg.activations.get(name)
        h = z @ W + b
        J = act.df(h)[:, :, None] * W.T[None]  # (B, H_j, H_{j-1})
        chi.append((J**2).sum(axis=(1, 2)).mean() / W.shape[1])
        z = act.f(h)
    np.testing.assert_allclose(rep.chi, chi, rtol=1e-12)
    assert [f.chi for f in rep.layers] == rep.chi
    assert rep.chi_bar == pytest.approx(math.exp(np.log(chi).mean()), rel=1e-12)
    assert rep.backward_gain == pytest.approx(np.prod(chi), rel=1e-12)
    # and from the printed table: the χ column's geometric mean is the printed χ̄ (3 digits)
    text = str(rep)
    rows = [line.split() for line in text.splitlines() if re.match(r"\s+\d+\s+\d+x\d+", line)]
    column = [float(r[-1]) for r in rows]
    printed = float(re.search(r"χ̄ = ([0-9.e+-]+)", text).group(1))
    assert len(column) == 4 and math.exp(np.log(column).mean()) == pytest.approx(printed, rel=5e-3)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.float16, np.complex128])
def test_x_of_a_dtype_forward_rejects_is_rejected_with_forwards_error(dtype):
    net = _tapering_net()
    x = np.ones((3, 40), dtype=dtype)
    with pytest.raises(TypeError) as forward_error:
        net.forward(x)
    with pytest.raises(TypeError) as report_error:
        gradient_flow(net, x)
    assert str(report_error.value) == str(forward_error.value)
    assert str(np.dtype(dtype)) in str(report_error.value)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "4"])
def test_spectrum_samples_must_be_none_or_a_non_negative_int(bad):
    net = _tapering_net()
    with pytest.raises(ValueError, match="spectrum_samples"):
        gradient_flow(net, np.ones((3, 40)), spectrum_samples=bad)


def test_str_is_the_table_and_repr_is_one_short_line(capsys):
    rep = gradient_flow(_tapering_net(), np.random.default_rng(2).standard_normal((4, 40)), label="tiny")
    print(rep)
    assert capsys.readouterr().out == rep.to_text() + "\n"
    r = repr(rep)
    assert "\n" not in r and len(r) < 160 and rep.verdict in r and "tiny" in r
    assert "LayerFlow" not in r and "array" not in r


def test_plot_has_labelled_axes_integer_layer_ticks_outside_legends_and_few_bins():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from jacgrad.flow.report_plot import _plot_one, histogram_bins

    net = jg.MLP.init([6, 7, 7, 3], activation="tanh", seed=3)
    rep = gradient_flow(net, np.random.default_rng(3).standard_normal((2, 6)))  # 2 x 3 = 6 singular values
    fig, row = plt.subplots(1, 3)
    try:
        _plot_one(row, rep)
        fig.canvas.draw()
        for ax in row:
            assert ax.get_ylabel() and ax.get_xlabel()
        for ax in row[:2]:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)
            legend = ax.get_legend()
            assert legend is not None
            # the legend's box lies below the axes' box: it cannot cover a curve
            assert legend.get_window_extent().y1 <= ax.get_window_extent().y0 + 1
        bars = [p for p in row[2].patches]
        assert len(bars) == histogram_bins(6) <= 6
    finally:
        plt.close(fig)
    assert histogram_bins(6) == 5 and histogram_bins(10_000) == 40


def _imports(module) -> set[str]:
    """Every module a module's file imports (full names, relative ones resolved), at the top or
    inside a function: the same check in the flat and the regrouped layout."""
    out = set()
    for node in ast.walk(ast.parse(pathlib.Path(module.__file__).read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_report_does_not_import_diagnostics():
    # diagnostics (computes) -> report (renders): one way, not even lazily back
    assert diagnostics_module.__name__ not in _imports(report_module)
    assert report_module.__name__ in _imports(diagnostics_module)
