"""One report type for an MLP and a Sequential (issue 19, item 3): the same top-level JSON keys
and schema version, a JSON round trip, the spectrum verdict in ``to_dict``, ``.blocks`` only
where the net has blocks, and ``.plot`` of both kinds."""

import json
import math

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow.block_flow import BlockFlowReport
from jacgrad.flow.diagnostics import GradientFlowReport, gradient_flow

Ly = jg.layers


def _mlp_report(sizes=(8, 8, 8, 3), **kw):
    net = jg.MLP.init(list(sizes), activation="tanh", init="xavier_normal", seed=0)
    return gradient_flow(net, np.random.default_rng(0).standard_normal((6, sizes[0])), **kw)


def _seq_report():
    rng = np.random.default_rng(1)
    net = jg.Sequential([Ly.Residual([Ly.LayerNorm(np.ones(6)), Ly.Dense(rng.standard_normal((6, 6)) / 3, None, "tanh")],
                                     scale=0.5), Ly.Dense(rng.standard_normal((6, 2)), None, "identity")])
    return gradient_flow(net, rng.standard_normal((5, 6)))


def test_one_class_and_the_same_top_level_keys_with_a_schema_version():
    mlp, seq = _mlp_report(), _seq_report()
    assert type(mlp) is type(seq) is GradientFlowReport and BlockFlowReport is GradientFlowReport
    dm, ds = mlp.to_dict(), seq.to_dict()
    assert dm.keys() == ds.keys()
    assert dm["schema"] == ds["schema"] == "jacgrad.gradient_flow/2"
    assert (dm["kind"], ds["kind"]) == ("layers", "blocks")
    assert len(dm["layers"]) == 3 and dm["blocks"] is None and dm["has_residual"] is False and dm["norms"] == []
    assert [b["kind"] for b in ds["blocks"]] == ["residual", "dense"]
    assert [r["activation"] for r in ds["layers"]] == ["layernorm", "tanh", "identity"]  # every parameterised layer
    assert ds["layers"][0].keys() == dm["layers"][0].keys() and ds["layers"][0]["chi"] is None
    assert ds["has_residual"] is True and ds["norms"] == ["layernorm"]
    assert dm["depth"] == 3 and ds["depth"] == 2


@pytest.mark.parametrize("make", [_mlp_report, _seq_report])
def test_to_json_round_trips_through_json_loads(make):
    rep = make()
    back = json.loads(rep.to_json())
    want = rep.to_dict()
    assert back.keys() == want.keys()
    for k, v in want.items():  # non-finite floats travel as the strings "inf", "-inf", "nan"
        if isinstance(v, float) and not math.isfinite(v):
            assert back[k] == ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")), k
        else:
            assert back[k] == v, k
    assert back["chi"] == pytest.approx(rep.chi, rel=0, abs=0)
    rows = back["blocks"] if rep.has_blocks else back["layers"]
    assert [r["chi"] for r in rows] == rep.chi


def test_the_spectrum_verdict_is_in_the_dict_for_a_rank_deficient_jacobian():
    # a 2-wide bottleneck of identity layers: ∂y/∂x = W0·W1 (8x8) has rank 2, so 6 of its 8
    # singular values are zero and the median is numerically zero
    rng = np.random.default_rng(3)
    W0, W1 = rng.standard_normal((8, 2)), rng.standard_normal((2, 8))
    net = jg.MLP([W0, W1], [np.zeros(2), np.zeros(8)], ["identity", "identity"])
    assert np.linalg.matrix_rank(W0 @ W1) == 2
    rep = gradient_flow(net, rng.standard_normal((4, 8)))
    d = rep.to_dict()
    assert d["spectrum_verdict"] is not None and d["spectrum_verdict"].startswith("rank-deficient")
    assert f"spectrum: {d['spectrum_verdict']}" in rep.to_text()
    assert json.loads(rep.to_json())["spectrum_verdict"] == d["spectrum_verdict"]


def test_a_full_rank_spectrum_and_a_block_report_have_no_spectrum_verdict():
    Q = np.linalg.qr(np.random.default_rng(4).standard_normal((8, 8)))[0]  # orthogonal: all σ = 1
    net = jg.MLP([Q, Q], [np.zeros(8), np.zeros(8)], ["identity", "identity"])
    d = gradient_flow(net, np.random.default_rng(5).standard_normal((3, 8))).to_dict()
    assert d["spectrum_verdict"] is None and np.allclose(d["jacobian_singular_values"], 1.0)
    seq = gradient_flow(jg.Sequential([Ly.Dense(Q, None, "identity"), Ly.Dense(Q, None, "identity")]),
                        np.random.default_rng(5).standard_normal((3, 8))).to_dict()
    assert seq["spectrum_verdict"] is None and np.allclose(seq["jacobian_singular_values"], 1.0)


def test_a_block_report_has_the_singular_values_and_the_spectrum_verdict():
    # the same bottleneck as a Sequential: ∂y/∂x = (W0·W1)ᵀ for every sample, whose singular
    # values NumPy gives (float64 SVD of the product, not the library's chain)
    rng = np.random.default_rng(3)
    W0, W1 = rng.standard_normal((8, 2)), rng.standard_normal((2, 8))
    net = jg.Sequential([Ly.Dense(W0, np.zeros(2), "identity"), Ly.Dense(W1, np.zeros(8), "identity")])
    rep = gradient_flow(net, rng.standard_normal((4, 8)))
    want = np.linalg.svd(W0 @ W1, compute_uv=False)
    got = np.sort(rep.jacobian_singular_values, axis=1)[:, ::-1]
    assert got.shape == (4, 8) and np.allclose(got, want[None], atol=1e-10 * want[0])
    assert rep.spectrum_method == gradient_flow(jg.MLP([W0, W1], [np.zeros(2), np.zeros(8)], ["identity"] * 2),
                                                rng.standard_normal((4, 8))).spectrum_method
    d = rep.to_dict()
    assert d["spectrum_verdict"].startswith("rank-deficient") and f"spectrum: {d['spectrum_verdict']}" in rep.to_text()
    assert "verdict: " in rep.to_text() and "(the spectrum: rank-deficient)" in rep.to_text()
    assert gradient_flow(net, rng.standard_normal((4, 8)), spectrum_samples=2).jacobian_singular_values.shape == (2, 8)


def test_blocks_only_where_the_net_has_blocks():
    mlp, seq = _mlp_report(), _seq_report()
    assert not mlp.has_blocks and seq.has_blocks and seq.blocks[0].kind == "residual"
    assert not hasattr(mlp, "blocks")
    with pytest.raises(AttributeError, match=r"no blocks.*\.layers"):
        mlp.blocks
    assert repr(mlp).startswith("GradientFlowReport(") and repr(seq).startswith("BlockFlowReport(")


def test_an_overflowing_block_report_names_the_block_in_nonfinite():
    rng = np.random.default_rng(6)
    net = jg.Sequential([Ly.Dense(rng.standard_normal((4, 4)) * 1e200, None, "identity"),
                         Ly.Dense(rng.standard_normal((4, 4)) * 1e200, None, "identity")])
    rep = gradient_flow(net, rng.standard_normal((3, 4)))
    assert rep.verdict == "exploding"
    first = next(b.index for b in rep.blocks if not math.isfinite(b.chi))
    assert rep.nonfinite["layer"] == first and f"block {first}" in rep.to_dict()["nonfinite"]["message"]


@pytest.mark.parametrize("make", [_mlp_report, _seq_report])
def test_plot_of_both_kinds(tmp_path, make):
    pytest.importorskip("matplotlib")
    path = tmp_path / "flow.png"
    make().plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_block_plot_draws_the_singular_values_and_flags_a_rank_deficient_spectrum():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from jacgrad.flow.report_plot import _plot_blocks

    rng = np.random.default_rng(3)
    W0, W1 = rng.standard_normal((8, 2)), rng.standard_normal((2, 8))
    net = jg.Sequential([Ly.Dense(W0, None, "identity"), Ly.Dense(W1, None, "identity")])
    rep = gradient_flow(net, rng.standard_normal((4, 8)))
    fig, row = plt.subplots(1, 3)
    try:
        _plot_blocks(row, rep)
        assert "RANK-DEFICIENT" in row[2].get_title()
        # 2 nonzero singular values per sample, 4 samples: 8 counted in the histogram's bars
        assert sum(p.get_height() for p in row[2].patches) == 8
    finally:
        plt.close(fig)
