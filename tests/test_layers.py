"""The structured factors (residual I + s·J, LayerNorm, RMSNorm) against independent references:
the adjoint identity, finite differences of the layers' own forward, dense NumPy products, the
LayerNorm closed-form spectrum, the s -> 0 limit of a deep linear residual net; and bad input."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra.factors import NormFactor
from jacgrad.algebra.residual_factor import ResidualFactor

L = jg.layers
rng = np.random.default_rng(0)


def _layer_cases():
    n = 5
    W = lambda: rng.standard_normal((n, n)) / np.sqrt(n)
    return {
        "layernorm": L.LayerNorm(1 + 0.3 * rng.standard_normal(n), 0.2 * rng.standard_normal(n), eps=1e-3),
        "rmsnorm": L.RMSNorm(1 + 0.3 * rng.standard_normal(n), eps=1e-3),
        "residual": L.Residual([L.Dense(W(), rng.standard_normal(n), "tanh"), L.LayerNorm(np.ones(n)),
                                L.Dense(W(), None, "gelu")], scale=0.6),
    }


CASES = _layer_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_factor_adjoint_and_finite_differences(name):
    layer = CASES[name]
    B, n = 4, layer.n_in
    x = rng.standard_normal((B, n)) * 2 + 0.5
    _, state = layer.forward(x)
    F = layer.factor(state)
    u, v = rng.standard_normal((B, n)), rng.standard_normal((B, n))
    Ju, JTv = F.jvp(u), F.vjp(v)
    # adjoint: <v, J u> = <Jᵀ v, u> per sample
    np.testing.assert_allclose((v * Ju).sum(1), (JTv * u).sum(1), rtol=1e-12, atol=1e-12)
    # central differences of the layer's own forward
    eps = 1e-6
    fd = (layer.forward(x + eps * u)[0] - layer.forward(x - eps * u)[0]) / (2 * eps)
    np.testing.assert_allclose(Ju, fd, rtol=1e-6, atol=1e-7)
    # the row actions and the dense form agree with the products
    D = F.dense()
    np.testing.assert_allclose(np.einsum("bij,bj->bi", D, u), Ju, atol=1e-12)
    np.testing.assert_allclose(F.dense(transposed=True), D.swapaxes(1, 2), atol=1e-15)
    stack = rng.standard_normal((B, 3, n))
    np.testing.assert_allclose(F.jvp_stack(stack.copy()), np.einsum("bij,brj->bri", D, stack), atol=1e-12)
    np.testing.assert_allclose(F.vjp_stack(stack.copy()), np.einsum("bij,bri->brj", D, stack), atol=1e-12)
    # exact singular values and the bound
    np.testing.assert_allclose(F.singular_values(), np.linalg.svd(D, compute_uv=False), atol=1e-12)
    assert (F.norm_bound() >= np.linalg.svd(D, compute_uv=False)[:, 0] - 1e-12).all()
    # rows(sel) keeps the samples' factors
    np.testing.assert_allclose(F.rows([2, 0]).dense(), D[[2, 0]], atol=1e-15)


def test_layernorm_closed_form_spectrum():
    """gamma = 1, eps = 0: n-2 singular values 1/sigma and two zeros (P is a rank n-2 projector)."""
    B, n = 3, 7
    x = rng.standard_normal((B, n)) * 3 + 1
    sigma = x.std(axis=1)  # numpy's population std: LayerNorm's sigma at eps = 0
    xhat = (x - x.mean(1, keepdims=True)) / sigma[:, None]
    F = NormFactor(np.ones(n), 1 / sigma, xhat, centered=True)
    want = np.concatenate([np.repeat(1 / sigma[:, None], n - 2, 1), np.zeros((B, 2))], axis=1)
    np.testing.assert_allclose(F.singular_values(), want, atol=1e-12)  # the closed form
    np.testing.assert_allclose(jg.Chain([F]).singular_values(), want, atol=1e-12)  # an SVD of the product
    # RMSNorm, gamma = 1, eps = 0: n-1 values 1/r and one zero
    r = np.sqrt((x * x).mean(1))
    G = NormFactor(np.ones(n), 1 / r, x / r[:, None], centered=False)
    want = np.concatenate([np.repeat(1 / r[:, None], n - 1, 1), np.zeros((B, 1))], axis=1)
    np.testing.assert_allclose(jg.Chain([G]).singular_values(), want, atol=1e-12)


def test_deep_linear_residual_net_tends_to_identity():
    n, depth = 6, 20
    Ws = [rng.standard_normal((n, n)) for _ in range(depth)]
    worst = []
    for s in (1e-1, 1e-3, 1e-6):
        net = jg.Sequential([L.Residual([L.Dense(W, None, "identity")], scale=s) for W in Ws])
        sv = net.jacobian_chain(net.forward(rng.standard_normal((2, n)))[1]).singular_values()
        worst.append(np.abs(sv - 1).max())
    assert worst[0] > 1e-2 and worst[2] < 1e-4 and worst[0] > worst[1] > worst[2]
    # the product of (I + s Wᵀ) formed densely agrees
    P = np.eye(n)
    for W in Ws:
        P = (np.eye(n) + 1e-3 * W.T) @ P
    net = jg.Sequential([L.Residual([L.Dense(W, None, "identity")], scale=1e-3) for W in Ws])
    np.testing.assert_allclose(net.jacobian_chain(net.forward(np.ones((1, n)))[1]).jacobian()[0], P, atol=1e-12)


def test_structured_plan_works_from_the_narrow_side():
    n = 4
    net = jg.Sequential([L.Dense(rng.standard_normal((50, n)), None, "tanh"), L.LayerNorm(np.ones(n)),
                         L.Dense(rng.standard_normal((n, 1)), None, "identity")])
    chain = net.jacobian_chain(net.forward(rng.standard_normal((3, 50)))[1])
    assert chain.jacobian_cost("reverse") < chain.jacobian_cost("forward")
    assert chain.bracketing("auto") == chain.bracketing("reverse")
    np.testing.assert_allclose(chain.jacobian("auto"), chain.jacobian("forward"), atol=1e-12)


@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
def test_save_load_roundtrip(tmp_path, suffix):
    if suffix == "safetensors":
        pytest.importorskip("safetensors.numpy")
    net = jg.Sequential([L.Dense(rng.standard_normal((3, 4)), rng.standard_normal(4), "tanh"),
                         L.Residual([L.RMSNorm(rng.random(4) + 0.5), L.Dense(rng.standard_normal((4, 4)))], 0.5),
                         L.LayerNorm(rng.random(4), rng.random(4), eps=1e-4)])
    path = tmp_path / f"n.{suffix}"
    net.save(path)
    back = jg.Sequential.load(path)
    x = rng.standard_normal((2, 3))
    np.testing.assert_array_equal(back(x), net(x))
    assert repr(back) == repr(net)
    relu = jg.Sequential.load(path, activations=["relu", "identity"])
    assert relu.layers[0].activation == "relu"


# ---------------------------------------------------------------------------- bad input
def test_residual_must_map_h_to_h():
    with pytest.raises(ValueError, match=r"inner layer 1 must output 4"):
        L.Residual([L.Dense(np.ones((4, 3))), L.Dense(np.ones((3, 2)))])
    with pytest.raises(ValueError, match=r"Residual: inner layer 1 .* takes 5 features but inner layer 0 .*outputs 3"):
        L.Residual([L.Dense(np.ones((4, 3))), L.Dense(np.ones((5, 4)))])


def test_gamma_of_the_wrong_length_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 1 \(LayerNorm\(5.*takes 5 features but layer 0"):
        jg.Sequential([L.Dense(np.ones((3, 4))), L.LayerNorm(np.ones(5))])
    with pytest.raises(ValueError, match=r"LayerNorm: beta is \(4,\).*gamma is \(5,\)"):
        L.LayerNorm(np.ones(5), np.zeros(4))
    with pytest.raises(ValueError, match=r"gamma must be 1-D"):
        L.RMSNorm(np.ones((2, 2)))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        L.LayerNorm(np.ones(3), eps=eps)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        L.RMSNorm(np.ones(3), eps=eps)


def test_unknown_norm_name(tmp_path):
    with pytest.raises(KeyError, match="unknown norm 'batchnorm'; valid names: layernorm, rmsnorm"):
        L.make_norm("batchnorm", 4)
    assert isinstance(L.make_norm("rmsnorm", 4), L.RMSNorm)
    np.savez(tmp_path / "bad.npz", spec=np.array('[{"kind": "dense", "activation": "tanh"}, {"kind": "batchnorm"}]'),
             **{"0.W": np.ones((2, 2)), "0.b": np.zeros(2)})
    with pytest.raises(KeyError, match=r"layer 1: unknown layer kind 'batchnorm'"):
        jg.Sequential.load(tmp_path / "bad.npz")


def test_layer_settings_are_read_only():
    with pytest.raises(AttributeError):
        L.LayerNorm(np.ones(3)).eps = 0.0
    with pytest.raises(AttributeError):
        L.Residual([L.Dense(np.ones((2, 2)))]).scale = 2.0
    with pytest.raises(AttributeError):
        L.Dense(np.ones((2, 2))).W = np.zeros((2, 2))


def test_mixed_dtypes_and_foreign_layers_name_the_layer():
    with pytest.raises(TypeError, match="layer 1: a parameter has dtype float32"):
        jg.Sequential([L.Dense(np.ones((2, 2))), L.Dense(np.ones((2, 2), np.float32))])
    with pytest.raises(TypeError, match="layer 0 is a str"):
        jg.Sequential(["dense"])


def test_chain_rejects_a_non_factor():
    with pytest.raises(TypeError, match="factor 0 is a int, not a LayerJacobian nor a structured factor"):
        jg.Chain([3])
