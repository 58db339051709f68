"""gradient_flow of a jacgrad.Sequential: rows per block against dense float64 NumPy per-block
Jacobians built here from the layer formulas (not from the library's factors), the verdict
against Γ computed here, and hints that know what the net already has."""

import math

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow.block_flow import BlockFlowReport

L = jg.layers
ACT = {"tanh": (np.tanh, lambda h: 1 - np.tanh(h) ** 2),
       "sigmoid": (lambda h: 1 / (1 + np.exp(-h)), lambda h: np.exp(-h) / (1 + np.exp(-h)) ** 2),
       "identity": (lambda h: h, lambda h: np.ones_like(h))}


def _dense(rng, n, m, act, scale=1.0):
    return L.Dense(rng.standard_normal((n, m)) * scale / np.sqrt(n), rng.standard_normal(m) * 0.1, act)


def _forward_jac(layer, x):
    """(y, J (B, n_out, n_in), bound (B,)) of one layer, from its formula."""
    B = x.shape[0]
    if layer.kind == "dense":
        f, df = ACT[layer.activation]
        h = x @ layer.W + layer.b
        d = df(h)
        J = d[:, :, None] * layer.W.T[None]
        return f(h), J, np.abs(d).max(axis=1) * np.linalg.norm(layer.W, 2)
    if layer.kind == "layernorm":
        n = x.shape[1]
        mu = x.mean(axis=1, keepdims=True)
        sig = np.sqrt(((x - mu) ** 2).mean(axis=1, keepdims=True) + layer.eps)
        xh = (x - mu) / sig
        P = np.eye(n)[None] - 1.0 / n - xh[:, :, None] * xh[:, None, :] / n
        J = (layer.gamma[None, :, None] / sig[:, :, None]) * P
        beta = 0.0 if layer.beta is None else layer.beta
        return layer.gamma * xh + beta, J, np.abs(layer.gamma).max() / sig[:, 0]
    assert layer.kind == "residual"
    z, Jf, bound = x, np.broadcast_to(np.eye(x.shape[1]), (B, x.shape[1], x.shape[1])), np.ones(B)
    for inner in layer.layers:
        z, Ji, bi = _forward_jac(inner, z)
        Jf, bound = Ji @ Jf, bound * bi
    return x + layer.scale * z, np.eye(x.shape[1])[None] + layer.scale * Jf, 1 + abs(layer.scale) * bound


def _residual_ln_net(rng, H=12, blocks=3, s=0.7):
    layers = [_dense(rng, 5, H, "tanh")]
    for _ in range(blocks):
        layers.append(L.Residual([L.LayerNorm(1 + 0.3 * rng.standard_normal(H), 0.1 * rng.standard_normal(H)),
                                  _dense(rng, H, H, "tanh", 1.5), _dense(rng, H, H, "sigmoid")], scale=s))
    layers += [L.LayerNorm(np.ones(H)), _dense(rng, H, 3, "identity")]
    return jg.Sequential(layers)


def test_rows_match_dense_per_block_jacobians():
    rng = np.random.default_rng(3)
    net = _residual_ln_net(rng)
    x = rng.standard_normal((7, 5))
    rep = jg.diagnostics.gradient_flow(net, x)
    assert isinstance(rep, BlockFlowReport) and rep.depth == len(net.layers)
    z, chis = x, []
    for layer, row in zip(net.layers, rep.blocks):
        z_next, J, bound = _forward_jac(layer, z)
        chi = float(((J ** 2).sum(axis=(1, 2))).mean() / J.shape[1])  # / H_out, as the MLP report
        norm = float(np.linalg.norm(J, 2, axis=(1, 2)).mean())
        assert row.kind == layer.kind and (row.h_in, row.h_out) == (J.shape[2], J.shape[1])
        assert row.chi == pytest.approx(chi, rel=1e-10)
        assert row.jacobian_norm == pytest.approx(norm, rel=1e-8)
        assert row.jacobian_bound == pytest.approx(float(bound.mean()), rel=1e-10)
        assert row.jacobian_norm <= row.jacobian_bound * (1 + 1e-12)
        chis.append(chi)
        z = z_next
    np.testing.assert_allclose(net(x), z, rtol=1e-12)  # the reference forward is the net's
    log_gamma = sum(math.log(c) for c in chis)
    expected = "vanishing" if log_gamma < -math.log(100) else "exploding" if log_gamma > math.log(100) else "healthy"
    assert rep.verdict == expected
    assert rep.backward_gain == pytest.approx(math.exp(log_gamma), rel=1e-9)
    assert rep.chi_bar == pytest.approx(math.exp(log_gamma / len(chis)), rel=1e-9)
    # the whole input-output Jacobian's ‖J‖₂: the product of the per-block ones
    Js = []
    z = x
    for layer in net.layers:
        z, J, _ = _forward_jac(layer, z)
        Js.append(J)
    Jio = Js[0]
    for J in Js[1:]:
        Jio = J @ Jio
    assert rep.jacobian_spectral_norm == pytest.approx(float(np.linalg.norm(Jio, 2, axis=(1, 2)).mean()), rel=1e-8)
    text = rep.to_text()
    assert "x+0.7·[layernorm,tanh,sigmoid]" in text and f"verdict: {rep.verdict.upper()}" in text
    d = rep.to_dict()
    assert [b["kind"] for b in d["blocks"]] == [l.kind for l in net.layers] and rep.to_json().startswith("{")


def test_grad_norms_with_a_target_match_finite_differences_of_the_loss():
    rng = np.random.default_rng(5)
    net = _residual_ln_net(rng, H=6, blocks=1)
    x, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    rep = jg.diagnostics.gradient_flow(net, x, t)
    assert rep.loss == "mse" and rep.loss_value == pytest.approx(float(((net(x) - t) ** 2).mean()), rel=1e-12)
    value = lambda: jg.losses.get("mse")(net(x), t)[0]  # noqa: E731
    for layer, row in zip(net.layers, rep.blocks):
        g2 = 0.0
        for p in layer.params:
            flat = p.reshape(-1)
            for i in range(flat.size):
                old = flat[i]
                flat[i] = old + 1e-6
                up = float(value())
                flat[i] = old - 1e-6
                down = float(value())
                flat[i] = old
                g2 += ((up - down) / 2e-6) ** 2
        assert row.grad_norm == pytest.approx(math.sqrt(g2), rel=1e-6, abs=1e-9)


def _vanishing_net(rng, H=16, residual=False, norm=False):
    layers = [_dense(rng, H, H, "sigmoid") for _ in range(12)]
    if residual:
        layers.append(L.Residual([_dense(rng, H, H, "tanh")], scale=0.5))
    if norm:
        layers.append(L.LayerNorm(np.ones(H)))
    return jg.Sequential(layers + [_dense(rng, H, H, "identity")])


@pytest.mark.parametrize("residual,norm", [(False, False), (True, False), (False, True), (True, True)])
def test_hints_know_what_the_net_already_has(residual, norm):
    rng = np.random.default_rng(0)
    net = _vanishing_net(rng, residual=residual, norm=norm)
    rep = jg.diagnostics.gradient_flow(net, rng.standard_normal((8, 16)))
    assert rep.verdict == "vanishing" and rep.has_residual == residual and rep.norms == (["layernorm"] if norm else [])
    text = " ".join(rep.hints)
    assert ("add the identity to every block Jacobian" in text) == (not residual)
    assert ("residual blocks are already there" in text) == residual
    assert ("normalisation (LayerNorm/RMSNorm) keeps" in text) == (not norm)
    assert "sigmoid passes at most 1/4" in text


def test_bad_input_is_named():
    rng = np.random.default_rng(0)
    net = _residual_ln_net(rng)
    with pytest.raises(ValueError, match=r"takes \(B, 5\)"):
        jg.diagnostics.gradient_flow(net, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no samples"):
        jg.diagnostics.gradient_flow(net, np.zeros((0, 5)))


def test_exploding_residual_net_is_told_to_scale_its_branches_not_to_add_them():
    rng = np.random.default_rng(1)
    H = 8
    net = jg.Sequential([L.Residual([_dense(rng, H, H, "identity", 2.0)], scale=3.0) for _ in range(6)]
                        + [_dense(rng, H, H, "identity")])
    rep = jg.diagnostics.gradient_flow(net, rng.standard_normal((4, H)))
    assert rep.verdict == "exploding" and rep.backward_gain > 100
    text = " ".join(rep.hints)
    assert "the 6 residual blocks add up" in text and "1/√6" in text and "now 3" in text
    assert "add the identity" not in text and "normalisation (LayerNorm/RMSNorm) re-scales" in text
