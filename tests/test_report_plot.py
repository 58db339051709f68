"""The report figure: the format its suffix names, block reports drawn, dpi, the healthy χ̄ band,
Γ, readable legends; and the spectrum verdict of a rank-deficient input-output Jacobian."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cli.main import main

pytest.importorskip("matplotlib")
SMALL = ["--depth", "3", "--width", "12", "--batch", "6"]
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}


def _dense_report(L=4):
    net = jg.MLP.init([8] + [8] * L, activation="tanh", seed=0)
    return jg.diagnostics.gradient_flow(net, np.random.default_rng(0).standard_normal((4, 8)))


def _block_report():
    Ly, rng = jg.layers, np.random.default_rng(0)
    net = jg.Sequential([Ly.Residual([Ly.LayerNorm(np.ones(6)), Ly.Dense(rng.standard_normal((6, 6)) / 3, None, "tanh")]),
                         Ly.Dense(rng.standard_normal((6, 2)))])
    return jg.diagnostics.gradient_flow(net, rng.standard_normal((5, 6)))


@pytest.mark.parametrize("suffix", ["png", "pdf", "svg"])
def test_the_file_is_in_the_format_its_suffix_names(tmp_path, suffix):
    path = tmp_path / f"flow.{suffix}"
    _dense_report().plot(path)
    assert path.read_bytes().startswith(MAGIC[suffix])


@pytest.mark.parametrize("suffix", ["pdf", "svg"])
def test_the_command_writes_the_format_its_suffix_names(tmp_path, capsys, suffix):
    path = tmp_path / f"flow.{suffix}"
    assert main(["report", *SMALL, "--activation", "tanh", "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(MAGIC[suffix])


def test_an_unknown_suffix_is_an_error_listing_the_valid_ones_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "flow.xyz"
    with pytest.raises(ValueError, match=r"\.xyz.*valid suffixes: .*\.pdf.*\.png.*\.svg"):
        _dense_report().plot(path)
    assert main(["report", *SMALL, "--plot", str(path)]) == 2
    err = capsys.readouterr().err
    assert ".xyz" in err and ".png" in err and ".svg" in err and "Traceback" not in err
    assert not path.exists()


def test_block_reports_plot(tmp_path, capsys):
    rep = _block_report()
    rep.plot(tmp_path / "blocks.png")
    assert (tmp_path / "blocks.png").read_bytes().startswith(MAGIC["png"])
    path = tmp_path / "cli.png"
    assert main(["report", *SMALL, "--activation", "sigmoid", "--residual", "1", "--norm", "layernorm",
                 "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(MAGIC["png"])


@pytest.mark.parametrize("dpi", [50, 120])
def test_dpi_sets_the_pixels_per_inch(tmp_path, dpi):
    from PIL import Image

    path = tmp_path / "flow.png"
    _dense_report().plot(path, dpi=dpi)
    with Image.open(path) as im:
        assert im.size[0] == round(13 * dpi)  # the figure is 13 inches wide


def test_bad_dpi_is_refused(tmp_path, capsys):
    for bad in (0, -3, float("nan"), "100"):
        with pytest.raises(ValueError, match="dpi"):
            _dense_report().plot(tmp_path / "f.png", dpi=bad)
    assert main(["report", *SMALL, "--plot", str(tmp_path / "f.png"), "--dpi", "0"]) == 2
    assert main(["report", *SMALL, "--dpi", "80"]) == 2
    assert "--dpi needs --plot" in capsys.readouterr().err


def _panels(rep):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from jacgrad.flow.report_plot import _plot_blocks, _plot_one

    fig, row = plt.subplots(1, 3, figsize=(13, 4.4))
    (_plot_blocks if hasattr(rep, "blocks") else _plot_one)(row, rep)
    fig.canvas.draw()
    return fig, row


@pytest.mark.parametrize("make", [_dense_report, _block_report])
def test_the_chi_panel_shades_the_healthy_band_and_the_title_gives_gamma(make):
    import matplotlib.pyplot as plt

    rep = make()
    fig, row = _panels(rep)
    try:
        L = len(rep.chi)
        lo, hi = 100 ** (-1 / L), 100 ** (1 / L)  # Γ = χ̄^L within 1/100 … 100
        spans = [p for p in row[1].patches if p.get_label().startswith("healthy")]
        assert len(spans) == 1
        ys = spans[0].get_path().transformed(spans[0].get_patch_transform()).vertices[:, 1]
        assert min(ys) == pytest.approx(lo) and max(ys) == pytest.approx(hi)
        gamma = float(np.prod(rep.chi))
        assert f"Γ = {gamma:.3g}" in row[0].get_title()
        for ax in row[:2]:
            assert all(t.get_fontsize() >= 9 for t in ax.get_legend().get_texts())
    finally:
        plt.close(fig)


def test_a_rank_deficient_jacobian_is_said_in_the_text_and_the_figure():
    import matplotlib.pyplot as plt

    # identity activations through a 2-wide bottleneck: ∂y/∂x = W0 W1 has rank 2 of 16
    rng = np.random.default_rng(0)
    net = jg.MLP([rng.standard_normal((16, 2)) / 4, rng.standard_normal((2, 16))], activations="identity")
    x = rng.standard_normal((4, 16))
    rep = jg.diagnostics.gradient_flow(net, x)
    J = net.weights[0] @ net.weights[1]
    s = np.linalg.svd(J, compute_uv=False)
    assert np.median(s) < 1e-3 * s.max()  # the reference: the spectrum really is rank-deficient
    text = rep.to_text()
    assert "spectrum: rank-deficient" in text and "(the spectrum: rank-deficient)" in text
    assert "2 of 16" in text
    fig, row = _panels(rep)
    try:
        assert "RANK-DEFICIENT" in row[2].get_title()
    finally:
        plt.close(fig)


def test_a_full_rank_jacobian_gets_no_spectrum_line():
    Q = np.linalg.qr(np.random.default_rng(1).standard_normal((16, 16)))[0]
    net = jg.MLP([Q, Q.T.copy()], activations="identity")
    rep = jg.diagnostics.gradient_flow(net, np.random.default_rng(2).standard_normal((4, 16)))
    assert np.allclose(rep.jacobian_singular_values, 1.0)
    assert "spectrum:" not in rep.to_text() and "rank-deficient" not in rep.to_text()


def test_spectrum_verdict_threshold_against_a_hand_made_spectrum():
    from jacgrad.flow.verdict import spectrum_verdict

    assert spectrum_verdict(np.array([[1.0, 0.5, 2e-3, 1e-3, 1e-4]])) is None  # median 2e-3 ≥ 1e-3
    said = spectrum_verdict(np.array([[1.0, 0.5, 5e-4, 1e-4, 1e-5]]))  # median 5e-4 < 1e-3
    assert said is not None and "0.0005 of the largest" in said and "2 of 5" in said
    assert "numerically zero" in spectrum_verdict(np.array([[1.0, 0.0, 0.0]]))
    assert spectrum_verdict(np.zeros((0, 3))) is None
