"""The gradient-flow report: its numbers against dense float64 references, its verdicts on the
classic cases, and the theory it must reproduce with the library's own networks (deep linear
orthogonal nets, mean-field χ of tanh nets, ReLU variance preservation, the 2/3 and 4/9 of an
inactive unit). Expectations are closed forms or independent NumPy computations, never numbers
copied from the code's output.
"""

import json
import math
import tracemalloc
import warnings

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow import statistics as _flow, io_spectrum as _io_spectrum
from jacgrad.algebra.lanczos import top_eigenvalues
from jacgrad.flow.diagnostics import GAIN_BAND, decide, gradient_flow



pytestmark = pytest.mark.usefixtures("one_blas_thread")

# ---------------------------------------------------------------------------- references
def _forward_numpy(net, x):
    """Independent float64 forward: pre-activations h_j, outputs z_j and φ'_j(h_j)."""
    hs, zs, ds = [], [], []
    z = np.asarray(x, dtype=np.float64)
    for W, b, name in zip(net.weights, net.biases, net.activations):
        act = jg.activations.get(name)
        h = z @ W + b
        hs.append(h)
        ds.append(act.df(h))
        z = act.f(h)
        zs.append(z)
    return hs, zs, ds


def _dense_layer(d, W):
    return d[:, :, None] * W.T[None]  # (B, H_out, H_in): diag(d) Wᵀ per sample


def _mixed_net(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [5, 7, 4, 6, 3]
    Ws = [rng.standard_normal((a, b)) / np.sqrt(a) * 1.3 for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.standard_normal(b) * 0.3 for b in sizes[1:]]
    return jg.MLP(Ws, bs, ["tanh", "relu", "gelu", "identity"])


# ---------------------------------------------------------------------------- Lanczos
@pytest.mark.parametrize(
    "n_in, n_out, kind",
    [(64, 64, "tanh"), (64, 48, "relu"), (20, 50, "relu"), (3, 3, "one_dead"), (1, 4, "tanh"), (40, 40, "rank1"),
     (30, 30, "zero")],
)
def test_lanczos_norms_match_svd(n_in, n_out, kind):
    rng = np.random.default_rng(n_in * 100 + n_out)
    B = 9
    W = rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)
    if kind == "tanh":
        d = 1 - np.tanh(rng.standard_normal((B, n_out))) ** 2
    elif kind == "relu":
        d = (rng.standard_normal((B, n_out)) > 0) * 1.0
    elif kind == "one_dead":
        d = np.ones((B, n_out))
        d[:, 1] = 0
    elif kind == "rank1":
        d = np.zeros((B, n_out))
        d[:, 0] = rng.random(B)
    else:
        d = np.zeros((B, n_out))
    expected = np.linalg.svd(_dense_layer(d, W), compute_uv=False)[:, 0]
    n = min(n_in, n_out)

    def matvec(v, rows):
        J = jg.LayerJacobian(d[rows], W)
        return J.jvp(J.vjp(v)) if n_out <= n_in else J.vjp(J.jvp(v))

    got = np.sqrt(top_eigenvalues(matvec, B, n, xp=np, dtype=np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------- numbers vs dense references
def test_layer_numbers_match_dense_float64_references():
    net = _mixed_net()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5))
    t = rng.standard_normal((6, 3))
    rep = gradient_flow(net, x, t, loss="mse", spectrum_samples=6)
    hs, zs, ds = _forward_numpy(net, x)
    # gradients of the mean squared error by hand, backward through the independent forward
    g = 2 * (zs[-1] - t) / t.size
    grads, deltas = [None] * 4, [None] * 4
    for j in reversed(range(4)):
        delta = g * ds[j]
        deltas[j] = delta
        grads[j] = (x if j == 0 else zs[j - 1]).T @ delta
        g = delta @ net.weights[j].T
    for j, f in enumerate(rep.layers):
        W, d = net.weights[j], ds[j]
        dense = _dense_layer(d, W)
        assert f.shape == W.shape and f.activation == net.activations[j]
        assert f.grad_norm == pytest.approx(np.linalg.norm(grads[j]), rel=1e-12)
        assert f.delta_norm == pytest.approx(np.linalg.norm(deltas[j]), rel=1e-12)
        assert f.jacobian_norm == pytest.approx(np.linalg.svd(dense, compute_uv=False)[:, 0].mean(), rel=1e-10)
        w2 = np.linalg.svd(W, compute_uv=False)[0]
        assert f.weight_spectral_norm == pytest.approx(w2, rel=1e-10)
        assert f.jacobian_bound == pytest.approx((np.abs(d).max(axis=1) * w2).mean(), rel=1e-10)
        assert f.jacobian_norm <= f.jacobian_bound * (1 + 1e-12)
        fro2 = (dense**2).sum(axis=(1, 2))
        assert f.chi == pytest.approx(fro2.mean() / W.shape[1], rel=1e-12)  # ‖J_j‖_F² / H_j
        assert f.derivative_mean == pytest.approx(d.mean(), rel=1e-12)
        assert f.active_fraction == pytest.approx((d != 0).mean())
        assert f.dead_units == int((d == 0).all(axis=0).sum())
        bound = jg.activations.get(net.activations[j]).bound
        assert f.saturated_fraction == pytest.approx((np.abs(d) < 0.01 * bound).mean())
    assert rep.chi == [f.chi for f in rep.layers]
    # the input-output Jacobian as the product of the dense factors
    J = _dense_layer(ds[0], net.weights[0])
    for j in range(1, 4):
        J = _dense_layer(ds[j], net.weights[j]) @ J
    sv = np.linalg.svd(J, compute_uv=False)
    np.testing.assert_allclose(rep.jacobian_singular_values, sv, rtol=1e-10, atol=1e-14)
    assert rep.mean_squared_singular_value == pytest.approx(((J**2).sum(axis=(1, 2)) / 5).mean(), rel=1e-12)
    assert rep.jacobian_spectral_norm == pytest.approx(sv[:, 0].mean(), rel=1e-12)
    assert rep.loss == "mse" and rep.loss_value == pytest.approx(((zs[-1] - t) ** 2).mean(), rel=1e-12)


def test_without_target_each_sample_backpropagates_a_unit_cotangent():
    net = _mixed_net()
    x = np.random.default_rng(2).standard_normal((7, 5))
    rep = gradient_flow(net, x, seed=3)
    # the output layer is identity, so its delta rows are the cotangents themselves: B unit rows
    assert rep.layers[-1].delta_norm == pytest.approx(math.sqrt(7), rel=1e-12)
    assert rep.loss is None and rep.loss_value is None
    assert gradient_flow(net, x, seed=3).layers[0].grad_norm == rep.layers[0].grad_norm  # seeded


def test_matrix_free_path_when_the_jacobian_is_too_big(monkeypatch):
    net = jg.MLP.init([16, 24, 24, 12], activation="tanh", init="xavier_normal", seed=4)
    x = np.random.default_rng(5).standard_normal((32, 16))
    exact = gradient_flow(net, x)
    monkeypatch.setattr(_io_spectrum, "MAX_SPECTRUM_ELEMENTS", 24 * 16 - 1)  # not even one sample fits
    free = gradient_flow(net, x)
    assert free.spectrum_samples == 0 and free.jacobian_singular_values.shape == (0, 12)
    assert exact.spectrum_samples == 32
    assert free.jacobian_spectral_norm == pytest.approx(exact.jacobian_spectral_norm, rel=1e-9)
    # Hutchinson with 16 Gaussian probes per sample: per-sample relative std ≤ √(2/16) ≈ 0.35 even
    # for a rank-one J; averaged over 32 samples ≈ 0.06, so 25% is a 4σ bound
    assert free.mean_squared_singular_value == pytest.approx(exact.mean_squared_singular_value, rel=0.25)
    assert "estimated" in free.mean_squared_singular_value_method


def test_a_4096_wide_layer_builds_nothing_bigger_than_its_jacobians():
    B = 8
    net = jg.MLP.init([64, 4096, 64], activation="relu", init="he_normal", seed=6)
    x = np.random.default_rng(7).standard_normal((B, 64))
    weights_bytes = sum(W.nbytes for W in net.weights)
    own_jacobians = B * 4096 * 64 * 8  # the B per-sample Jacobians of the wide layer: 16 MiB
    tracemalloc.start()
    try:
        rep = gradient_flow(net, x, spectrum_samples=B)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the whole-net spectrum is accumulated a few samples at a time, the layer norms matrix-free
    assert peak < weights_bytes + own_jacobians, f"peak {peak / 2**20:.1f} MiB"
    assert rep.layers[0].shape == (64, 4096) and rep.jacobian_singular_values.shape == (B, 64)


def test_float32_report_agrees_with_float64():
    net64 = _mixed_net()
    net32 = jg.MLP([W.astype(np.float32) for W in net64.weights], [b.astype(np.float32) for b in net64.biases],
                   net64.activations)
    x = np.random.default_rng(8).standard_normal((6, 5))
    r64, r32 = gradient_flow(net64, x), gradient_flow(net32, x.astype(np.float32))
    assert r32.dtype == "float32"
    for a, b in zip(r32.layers, r64.layers):
        for name in ("grad_norm", "jacobian_norm", "chi", "weight_spectral_norm"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-4)


def test_softmax_cross_entropy_target():
    net = jg.MLP.init([6, 8, 4], activation="tanh", seed=9)
    x = np.random.default_rng(9).standard_normal((5, 6))
    rep = gradient_flow(net, x, np.array([0, 1, 2, 3, 0]), loss="softmax_cross_entropy")
    value, g = net.loss_and_grads(x, np.array([0, 1, 2, 3, 0]), loss="softmax_cross_entropy")
    assert rep.loss_value == pytest.approx(float(value))
    assert rep.layers[0].grad_norm == pytest.approx(np.linalg.norm(g.weights[0]), rel=1e-12)


def test_bad_inputs_are_value_errors_that_name_the_problem():
    net = _mixed_net()
    with pytest.raises(ValueError, match="shape"):
        gradient_flow(net, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        gradient_flow(net, np.full((3, 5), np.nan))
    bad = jg.MLP([W.copy() for W in net.weights], net.biases, net.activations)
    bad.weights[2][0, 0] = np.inf
    with pytest.raises(ValueError, match="layer 2"):
        gradient_flow(bad, np.zeros((3, 5)))


# ---------------------------------------------------------------------------- non-finite
def test_forward_overflow_is_reported_by_layer_not_raised():
    net = jg.MLP.init([16] * 13, activation="relu", init="he_normal", gain=1e40, seed=10)
    x = np.random.default_rng(10).standard_normal((4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may escape
        rep = gradient_flow(net, x)
    # independent: the first layer whose float64 forward output overflows
    _, zs, _ = _forward_numpy_quiet(net, x)
    first = next(j for j, z in enumerate(zs) if not np.isfinite(z).all())
    assert rep.nonfinite["layer"] == first and rep.nonfinite["stage"] == "forward"
    assert rep.verdict == "exploding"
    assert f"layer {first} went non-finite" in rep.to_text()
    assert all(not f.finite for f in rep.layers[first:]) and all(f.finite for f in rep.layers[:first])
    json.loads(rep.to_json())  # strict JSON despite the NaNs


def _forward_numpy_quiet(net, x):
    with np.errstate(all="ignore"):
        return _forward_numpy(net, x)


def test_backward_overflow_names_the_layer():
    # identity layers W = 1e100·I on a tiny input: the forward stays finite (1e-300 → 1e200),
    # the backward of a unit cotangent grows 1e100 per layer and overflows below layer 1
    W = 1e100 * np.eye(3)
    net = jg.MLP([W.copy() for _ in range(5)], None, "identity")  # five layers, five parameters (one array five times is one tied parameter)
    rep = gradient_flow(net, np.full((2, 3), 1e-300))
    assert rep.nonfinite == {
        "layer": 0,
        "stage": "backward",
        "message": rep.nonfinite["message"],
    } and "backward" in rep.nonfinite["message"]
    assert rep.verdict == "exploding"


# ---------------------------------------------------------------------------- the verdict
def test_decide_thresholds():
    assert decide([1.0] * 20) == ("healthy", 1.0, 1.0, math.inf)
    verdict, chi_bar, gamma, xi = decide([0.5] * 10)
    assert verdict == "vanishing" and chi_bar == pytest.approx(0.5) and gamma == pytest.approx(0.5**10)
    assert xi == pytest.approx(1 / math.log(2))
    assert decide([2.0] * 10)[0] == "exploding" and decide([2.0] * 10)[3] == pytest.approx(1 / math.log(2))
    edge = GAIN_BAND ** (1 / 8)
    assert decide([edge * 0.999] * 8)[0] == "healthy" and decide([edge * 1.001] * 8)[0] == "exploding"
    assert decide([1 / (edge * 1.001)] * 8)[0] == "vanishing"
    assert decide([1.0, 0.0, 1.0])[:3] == ("vanishing", 0.0, 0.0)
    assert decide([1.0], nonfinite=True)[0] == "exploding"
    assert decide([1e300] * 3)[2] == math.inf  # no overflow error


@pytest.mark.parametrize(
    "activation, init, gain, verdict",
    [("sigmoid", "xavier_normal", 1.0, "vanishing"), ("relu", "he_normal", 1.0, "healthy"),
     ("relu", "he_normal", 1.6, "exploding"), ("relu", "normal", 1.0, "vanishing")],
)
def test_verdicts_on_the_classic_20_layer_256_wide_nets(activation, init, gain, verdict):
    net = jg.MLP.init([256] * 21, activation=activation, init=init, gain=gain, seed=11)
    x = np.random.default_rng(11).standard_normal((16, 256))
    rep = gradient_flow(net, x, spectrum_samples=0)
    assert rep.verdict == verdict
    assert bool(rep.hints) == (verdict != "healthy")
    if activation == "sigmoid":
        assert any("1/4" in h for h in rep.hints)


# ---------------------------------------------------------------------------- theory
@pytest.mark.parametrize("sizes, gain", [([32] * 11, 1.1), ([32] * 11, 0.8), ([64, 48, 40, 32, 16], 1.3)])
def test_deep_linear_orthogonal_nets_have_every_singular_value_gain_to_the_L(sizes, gain):
    # every factor is gain · (a matrix with orthonormal rows); a product of those has orthonormal
    # rows too, so all its singular values are exactly gain^L
    L = len(sizes) - 1
    net = jg.MLP.init(sizes, activation="identity", init="orthogonal", gain=gain, seed=12)
    rep = gradient_flow(net, np.random.default_rng(12).standard_normal((3, sizes[0])))
    np.testing.assert_allclose(rep.jacobian_singular_values, gain**L, rtol=1e-10)
    for f in rep.layers:
        assert f.jacobian_norm == pytest.approx(gain, rel=1e-10)
        assert f.chi == pytest.approx(gain**2, rel=1e-10)
    assert rep.chi_bar == pytest.approx(gain**2, rel=1e-10)
    assert rep.mean_squared_singular_value == pytest.approx(gain ** (2 * L) * sizes[-1] / sizes[0], rel=1e-10)


def _gauss(f, n=101):
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return float((w * f(z)).sum() / w.sum())  # E f(Z), Z ~ N(0, 1)


def test_tanh_mean_squared_singular_value_follows_chi_to_the_L():
    # Mean-field theory (Poole et al. 2016, Schoenholz et al. 2017): for W ~ N(0, σ_w²/N) the
    # pre-activation variance obeys q ← σ_w² E[tanh(√q Z)²]; at its fixed point q* every layer
    # has χ = σ_w² E[tanh'(√q* Z)²] and the input-output Jacobian's mean squared singular value
    # is χ^L. Inputs are drawn with variance q*/σ_w² so the first layer already sits at q*.
    N, L, sw, B = 256, 6, 1.5, 16
    q = 1.0
    for _ in range(200):
        q = sw**2 * _gauss(lambda z: np.tanh(np.sqrt(q) * z) ** 2)
    chi_star = sw**2 * _gauss(lambda z: np.cosh(np.sqrt(q) * z) ** -4)
    net = jg.MLP.init([N] * (L + 1), activation="tanh", output_activation="tanh", init="normal", gain=sw, seed=13)
    x = np.random.default_rng(13).standard_normal((B, N)) * np.sqrt(q) / sw
    rep = gradient_flow(net, x, spectrum_samples=B)
    hs, _, _ = _forward_numpy(net, x)
    chi = np.array(rep.chi)
    # (1) χ_j against σ_w²·E[φ'(h)²] over the independently computed h of that layer: they
    # differ only by the column norms ‖W[:, i]‖² = σ_w²(1 ± √(2/N)), averaged over N columns,
    # i.e. O(√2/N) = 0.55%; 4σ is 2.2%
    empirical = np.array([sw**2 * np.mean(np.cosh(h) ** -4) for h in hs])
    np.testing.assert_allclose(chi, empirical, rtol=4 * np.sqrt(2) / N)
    # (2) χ_j against the closed-form χ*: each sample's q is q*(1 ± √(2/N)) (9%), averaged
    # over B = 16 samples ≈ 2.2%, plus the Monte-Carlo mean of φ'² over B·N = 4096 values ≈ 1%:
    # ~2.5% in all, 3σ = 8%
    np.testing.assert_allclose(chi, chi_star, rtol=0.08)
    # (3) the measured mean squared singular value against the product of the measured χ_j
    # (the product treats each layer as acting on isotropic directions: O(1/√(N·B)) per layer,
    # ~1% here) and against the closed form χ*^L (the per-layer 2.5% compounded over 6 layers)
    assert rep.mean_squared_singular_value == pytest.approx(np.prod(chi), rel=0.06)
    assert rep.mean_squared_singular_value == pytest.approx(chi_star**L, rel=0.2)
    assert rep.depth_scale == pytest.approx(1 / abs(math.log(chi_star)), rel=0.15)


@pytest.mark.parametrize("init, expected", [("he_normal", 1.0), ("normal", 0.5)])
def test_relu_he_keeps_the_backward_variance_and_fan_in_std_halves_it(init, expected):
    # ReLU passes half of the units (E[relu'(h)²] = 1/2), so the backward squared norm changes by
    # σ_w²/2 per layer: 1 with he_normal (σ_w² = 2), 1/2 with std 1/√N (σ_w² = 1).
    N, L, B = 512, 8, 32
    net = jg.MLP.init([N] * (L + 1), activation="relu", output_activation="relu", init=init, seed=14)
    rep = gradient_flow(net, np.random.default_rng(14).standard_normal((B, N)), spectrum_samples=0)
    delta = np.array([f.delta_norm for f in rep.layers])
    ratios = (delta[:-1] / delta[1:]) ** 2
    # the active fraction of a layer is 1/2 ± 1/(2√N) = ±2.2% (deep ReLU samples are correlated,
    # so the batch hardly averages it); the geometric mean over 7 layer pairs ≈ ±1.2%; 5σ = 6%
    assert np.exp(np.log(ratios).mean()) == pytest.approx(expected, rel=0.06)
    assert np.exp(np.log(rep.chi).mean()) == pytest.approx(expected, rel=0.06)


def test_one_inactive_unit_of_a_3_wide_net_attenuates_by_two_thirds_and_four_ninths():
    # "Grokking gradients": a 3-wide net whose layers mix their inputs equally (all weights equal),
    # every unit active, the error Ŷ − Y proportional to the output (Y = 0, MSE). Switching off one
    # unit of layer k zeroes that unit's column of ∂L/∂W_k and row of ∂L/∂W_{k+1} and scales the
    # rest of those two layers by 2/3; every other layer is scaled by (2/3)·(2/3) = 4/9 (one 2/3
    # from the output error, one from the forward or the backward path through layer k).
    L, k = 6, 2
    W = np.full((3, 3), 1 / 3)
    x = np.array([[1.0, 2.0, 3.0], [0.5, 0.1, 2.0]])
    target = np.zeros((2, 3))
    on = jg.MLP([W.copy() for _ in range(L)], None, ["relu"] * (L - 1) + ["identity"])  # untied: one array per layer
    biases = [np.zeros(3) for _ in range(L)]
    biases[k] = np.array([0.0, 0.0, -1e3])  # unit 2 of layer k never fires: relu' = 0
    off = jg.MLP([W.copy() for _ in range(L)], biases, on.activations)
    r_on = gradient_flow(on, x, target, loss="mse")
    r_off = gradient_flow(off, x, target, loss="mse")
    _, g_on = on.loss_and_grads(x, target)
    _, g_off = off.loss_and_grads(x, target)
    for j in range(L):
        if j == k:
            np.testing.assert_allclose(g_off.weights[j][:, 2], 0.0)
            np.testing.assert_allclose(g_off.weights[j][:, :2], 2 / 3 * g_on.weights[j][:, :2], rtol=1e-12)
            ratio = (2 / 3) * math.sqrt(6 / 9)  # 6 of 9 entries left, each at 2/3
        elif j == k + 1:
            np.testing.assert_allclose(g_off.weights[j][2, :], 0.0)
            np.testing.assert_allclose(g_off.weights[j][:2, :], 2 / 3 * g_on.weights[j][:2, :], rtol=1e-12)
            ratio = (2 / 3) * math.sqrt(6 / 9)
        else:
            np.testing.assert_allclose(g_off.weights[j], 4 / 9 * g_on.weights[j], rtol=1e-12)
            ratio = 4 / 9
        assert r_off.layers[j].grad_norm / r_on.layers[j].grad_norm == pytest.approx(ratio, rel=1e-12)
    assert r_off.layers[k].dead_units == 1 and r_off.layers[k].active_fraction == pytest.approx(2 / 3)
    assert sum(f.dead_units for f in r_on.layers) == 0


# ---------------------------------------------------------------------------- rendering
def test_text_json_dict_and_plot(tmp_path):
    net = jg.MLP.init([8, 8, 8, 3], activation="sigmoid", seed=15)
    rep = gradient_flow(net, np.random.default_rng(15).standard_normal((4, 8)), label="tiny sigmoid")
    text = rep.to_text()
    assert "tiny sigmoid" in text and f"verdict: {rep.verdict.upper()}" in text
    assert len([line for line in text.splitlines() if line.lstrip()[:1].isdigit()]) == 3  # one row per layer
    d = json.loads(rep.to_json())
    assert d["verdict"] == rep.verdict and len(d["layers"]) == 3 and d["chi"] == pytest.approx(rep.chi)
    assert np.array(d["jacobian_singular_values"]).shape == rep.jacobian_singular_values.shape
    assert rep.to_dict()["layers"][1]["shape"] == [8, 8]
    pytest.importorskip("matplotlib")
    rep.plot(tmp_path / "flow.png")
    assert (tmp_path / "flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_gpu_report_matches_numpy():
    cp = pytest.importorskip("cupy")
    net = _mixed_net()
    x = np.random.default_rng(16).standard_normal((6, 5))
    ref = gradient_flow(net, x)
    rep = gradient_flow(net.to("gpu"), cp.asarray(x))
    assert rep.device == "gpu"
    for a, b in zip(rep.layers, ref.layers):
        for name in ("grad_norm", "delta_norm", "jacobian_norm", "jacobian_bound", "chi", "weight_spectral_norm"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-9)
    np.testing.assert_allclose(rep.jacobian_singular_values, ref.jacobian_singular_values, rtol=1e-9, atol=1e-14)
