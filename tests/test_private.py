"""``clipped_grad`` (DP-SGD's clipped, noised mean gradient) against torch.func: with the noise
off it equals ``Σ_i clip_C(g_i) / B`` built from ``vmap(grad)`` per-sample gradients of the
float64 torch model the network was read from (1e-10 in float64, 1e-5 in float32), on every layer
kind (dense, LayerNorm, RMSNorm, residual blocks, nested ones), every loss, C below, at and above
the norms, B = 1 and samples whose gradient is exactly zero. The noise: mean 0 and standard
deviation σC/B per coordinate (a two-sided z-test and a χ² test at a fixed seed), reproducible
from a seed, fresh from one Generator across calls. Bad arguments are loud."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
tf = torch.func

from test_param_space import LOSSES, torch_loss_i, torch_target  # noqa: E402 (tests/ is on sys.path)
from test_sequential_param_space import MODELS, _case, _f  # noqa: E402

pytestmark = pytest.mark.torch
TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= tol, err


def _psg(m, x, t, loss, n_out):
    """``(B, P)`` float64 per-sample gradients of ℓ_i by torch.func in ``flat`` order."""
    theta, f = _f(m)
    ell = torch_loss_i(loss)
    X, T = torch.tensor(x.astype(np.float64)), torch_target(t, n_out)
    return tf.vmap(tf.grad(lambda th, xi, ti: ell(f(th, xi[None])[0], ti)), in_dims=(None, 0, 0))(theta, X, T).numpy()


def _clipped_mean(psg, C):
    n = np.linalg.norm(psg, axis=1)
    with np.errstate(over="ignore"):  # C / tiny may overflow to inf; min(1, inf) = 1
        c = np.minimum(1.0, C / np.maximum(n, np.finfo(np.float64).tiny))
    return (c[:, None] * psg).sum(axis=0) / psg.shape[0], n


def _levels(n):
    """C below every norm, at one sample's norm (the others on either side), above every norm."""
    return {"below": 0.5 * n.min(), "at": float(np.sort(n)[len(n) // 2]), "above": 10.0 * n.max()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model,loss", [(m, loss) for m in MODELS for loss in LOSSES])
def test_blocks_match_torch_func_clipped_sum(model, loss, dtype):
    m, net, x, t = _case(model, loss, dtype)
    psg = _psg(m, x, t, loss, net.n_out)
    n = np.linalg.norm(psg, axis=1)
    for where, C in _levels(n).items():
        want, _ = _clipped_mean(psg, C)
        r = net.clipped_grad(x, t, loss=loss, max_norm=C)
        assert r.flat.shape == (net.n_params,) and r.flat.dtype == dtype and r.norms.dtype == dtype
        _close(r.flat, want, TOL[dtype])
        _close(r.norms, n, TOL[dtype])
        frac = {"below": 1.0, "above": 0.0}.get(where)
        if frac is not None:
            assert float(r.clipped_fraction) == frac
        assert r.noise_std == 0.0
        first = r.grads.layers[0] if isinstance(r.grads.layers[0], dict) else r.grads.layers[0][0]
        assert all(np.shares_memory(v, r.flat) for v in first.values())


def _mlp_case(loss, dtype, sizes=(4, 7, 6, 3), B=6, seed=0):
    net = jg.MLP.init(list(sizes), activation=["tanh", "relu"][: len(sizes) - 2] or "tanh", seed=seed,
                      bias_std=0.3, dtype="float64")
    m = net.to_torch().double()
    net = jg.MLP([W.astype(dtype) for W in net.weights], [b.astype(dtype) for b in net.biases], net.activations)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((B, sizes[0])).astype(dtype)
    t = {"mse": lambda: rng.standard_normal((B, sizes[-1])).astype(dtype),
         "sigmoid_bce": lambda: rng.uniform(0, 1, (B, sizes[-1])).astype(dtype),
         "softmax_cross_entropy": lambda: rng.integers(0, sizes[-1], B)}[loss]()
    return m, net, x, t


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("B", [1, 6])
def test_mlp_matches_torch_func_clipped_sum(loss, dtype, B):
    m, net, x, t = _mlp_case(loss, dtype, B=B)
    psg = _psg(m, x, t, loss, net.sizes[-1])
    for C in _levels(np.linalg.norm(psg, axis=1)).values():
        want, n = _clipped_mean(psg, C)
        r = net.clipped_grad(x, t, loss=loss, max_norm=C)
        _close(r.flat, want, TOL[dtype])
        _close(r.norms, n, TOL[dtype])
        for j, (W, dW) in enumerate(zip(net.weights, r.grads.weights)):
            assert dW.shape == W.shape and np.shares_memory(dW, r.flat)
        assert r.grads.input is None and r.grads.deltas is None


@pytest.mark.parametrize("kind", ["mlp", "blocks"])
def test_samples_with_zero_gradient_keep_factor_one_and_no_nan(kind):
    """mse with the target equal to the output for samples 0 and 2: their δ is exactly 0, so
    ‖g_i‖ = 0 and c_i = C / max(0, C) = 1 (no 0/0). C tiny clips every other sample."""
    if kind == "mlp":
        m, net, x, _ = _mlp_case("mse", np.float64)
    else:
        m, net, x, _ = _case("deep", "mse", np.float64)
    t = np.random.default_rng(3).standard_normal(net(x).shape)
    t[[0, 2]] = net(x)[[0, 2]]
    psg = _psg(m, x, t, "mse", t.shape[1])
    assert np.abs(psg[[0, 2]]).max() < 1e-12  # torch's own forward rounds differently: its zero is ~1e-16
    psg[[0, 2]] = 0.0
    for C in (1e-300, 1e-3, 1e3):
        r = net.clipped_grad(x, t, loss="mse", max_norm=C)
        assert np.isfinite(r.flat).all() and r.norms[0] == 0.0 and r.norms[2] == 0.0
        _close(r.flat, _clipped_mean(psg, C)[0], TOL[np.float64])


def test_all_zero_batch_in_float32_does_not_warn():
    """Every gradient zero, float32, a C near float32's largest: no overflow, no NaN (pyproject
    turns RuntimeWarnings into errors)."""
    net = jg.MLP.init([3, 4, 2], seed=0, dtype="float32")
    x = np.ones((3, 3), np.float32)
    r = net.clipped_grad(x, net(x), loss="mse", max_norm=3e38)
    assert not r.flat.any() and not r.norms.any() and float(r.clipped_fraction) == 0.0


# ---------------------------------------------------------------------- the noise
def _noise(net, x, t, C, sigma, **kw):
    return net.clipped_grad(x, t, max_norm=C, noise_multiplier=sigma, **kw).flat - \
        net.clipped_grad(x, t, max_norm=C).flat


def test_noise_has_mean_zero_and_std_sigma_c_over_b():
    """P ≈ 20k coordinates of N(0, (σC/B)²): the sample mean's z-score and the variance's χ²
    statistic (normal approximation, df = P) each stay within 4.5 standard errors — a false
    failure once in ~1.5e5 runs per statistic for a correct sampler; the seed is fixed, so the
    test is deterministic. σC/B = 1.1·0.5/8."""
    net = jg.MLP.init([50, 200, 50], seed=0)
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((8, 50)), rng.standard_normal((8, 50))
    r = net.clipped_grad(x, t, max_norm=0.5, noise_multiplier=1.1, seed=123)
    e = r.flat - net.clipped_grad(x, t, max_norm=0.5).flat
    std, P = 1.1 * 0.5 / 8, e.size
    assert r.noise_std == pytest.approx(std, rel=1e-15)
    assert abs(e.mean()) / (std / np.sqrt(P)) < 4.5
    chi2 = (e ** 2).sum() / std ** 2
    assert abs(chi2 - P) / np.sqrt(2 * P) < 4.5


def test_noise_is_reproducible_from_a_seed_and_fresh_from_one_generator():
    net = jg.MLP.init([4, 6, 3], seed=0)
    x, t = np.ones((5, 4)), np.zeros((5, 3))
    a, b = _noise(net, x, t, 1.0, 1.0, seed=7), _noise(net, x, t, 1.0, 1.0, seed=7)
    assert np.array_equal(a, b) and a.any()
    assert not np.array_equal(a, _noise(net, x, t, 1.0, 1.0, seed=8))
    g = np.random.default_rng(7)
    assert not np.array_equal(_noise(net, x, t, 1.0, 1.0, seed=g), _noise(net, x, t, 1.0, 1.0, seed=g))
    assert not np.array_equal(_noise(net, x, t, 1.0, 1.0), _noise(net, x, t, 1.0, 1.0))  # None: OS entropy


def test_expected_batch_size_divides_instead_of_b():
    net = jg.MLP.init([4, 6, 3], seed=0)
    x, t = np.ones((5, 4)), np.zeros((5, 3))
    r, s = net.clipped_grad(x, t, max_norm=0.1), net.clipped_grad(x, t, max_norm=0.1, expected_batch_size=8)
    np.testing.assert_allclose(s.flat * 8, r.flat * 5, rtol=1e-14)
    assert net.clipped_grad(x, t, max_norm=0.1, noise_multiplier=2.0, expected_batch_size=8).noise_std == 0.2 / 8


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(max_norm=0.0), "max_norm"), (dict(max_norm=-1.0), "max_norm"), (dict(max_norm=float("inf")), "max_norm"),
    (dict(max_norm=float("nan")), "max_norm"), (dict(max_norm="1"), "max_norm"), (dict(max_norm=True), "max_norm"),
    (dict(max_norm=1.0, noise_multiplier=-0.1), "noise_multiplier"),
    (dict(max_norm=1.0, noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(max_norm=1.0, expected_batch_size=0), "expected_batch_size"),
    (dict(max_norm=1.0, loss="sum_squares"), "mean over the batch of per-sample losses"),
    (dict(max_norm=1.0, loss=lambda y, t: ((y - t) ** 2).sum()), "mean over the batch of per-sample losses"),
])
@pytest.mark.parametrize("kind", ["mlp", "blocks"])
def test_bad_arguments_are_clear_errors(kw, match, kind):
    net = jg.MLP.init([3, 4, 2], seed=0) if kind == "mlp" else \
        jg.Sequential([jg.layers.Dense(np.ones((3, 4))), jg.layers.LayerNorm(np.ones(4)), jg.layers.Dense(np.ones((4, 2)))])
    with pytest.raises(ValueError, match=match):
        net.clipped_grad(np.ones((2, 3)), np.zeros((2, 2)), **kw)


def test_max_norm_is_required():
    with pytest.raises(TypeError, match="max_norm"):
        jg.MLP.init([3, 4, 2], seed=0).clipped_grad(np.ones((2, 3)), np.zeros((2, 2)))


def test_trainable_flags_are_checked():
    net = jg.MLP.init([3, 4, 2], seed=0)
    with pytest.raises(ValueError, match="trainable has 3 flags but the network has 4 parameter arrays"):
        net.clipped_grad(np.ones((2, 3)), np.zeros((2, 2)), max_norm=1.0, trainable=[True] * 3)
    with pytest.raises(ValueError, match="no parameter is trainable"):
        net.clipped_grad(np.ones((2, 3)), np.zeros((2, 2)), max_norm=1.0, trainable=[False] * 4)


@pytest.mark.parametrize("loss", LOSSES)
def test_blocks_with_one_sample(loss):
    m, net, x, t = _case("nested", loss, np.float64, B=1)
    psg = _psg(m, x, t, loss, net.n_out)
    n = float(np.linalg.norm(psg))
    for C in (0.5 * n, n, 2 * n):
        r = net.clipped_grad(x, t, loss=loss, max_norm=C)
        _close(r.flat, _clipped_mean(psg, C)[0], TOL[np.float64])


def test_torch_loss_aliases_name_the_same_private_gradient():
    net = jg.MLP.init([5, 4, 3], activation="tanh", seed=2)
    rng = np.random.default_rng(5)
    x, labels = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    ce = net.clipped_grad(x, labels, loss="softmax_cross_entropy", max_norm=0.3)
    alias = jg.clipped_grad(net, x, labels, loss="cross_entropy", max_norm=0.3)
    assert np.array_equal(ce.flat, alias.flat) and np.array_equal(ce.norms, alias.norms)
    with pytest.raises(ValueError, match="mean over the batch of per-sample losses"):
        net.clipped_grad(x, labels, loss="nll", max_norm=0.3)
