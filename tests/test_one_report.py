"""One report (issue 19): a Sequential's ``gradient_flow`` report has a ``.layers`` row for every
parameterised layer (residual blocks opened), with an MLP row's fields where they apply and None
where they don't, beside its ``.blocks``; references: dense float64 Jacobians and torch autograd."""

import json

import numpy as np
import pytest

import jacgrad as jg

L = jg.layers


def _net(rng):
    W = lambda a, b: rng.standard_normal((a, b)) / np.sqrt(a)
    return jg.Sequential([L.Dense(W(4, 6), 0.1 * rng.standard_normal(6), "tanh"),
                          L.Residual([L.LayerNorm(1 + 0.2 * rng.standard_normal(6), 0.1 * rng.standard_normal(6)),
                                      L.Dense(W(6, 6), 0.1 * rng.standard_normal(6), "gelu")], scale=0.5),
                          L.RMSNorm(1 + 0.2 * rng.standard_normal(6)),
                          L.Dense(W(6, 3), None, "identity")])


def test_every_parameterised_layer_has_a_row_checked_against_torch_and_dense_jacobians(rng):
    torch = pytest.importorskip("torch")
    net = _net(rng)
    x, t = rng.standard_normal((7, 4)), rng.standard_normal((7, 3))
    rep = jg.gradient_flow(net, x, t)
    assert [r.activation for r in rep.layers] == ["tanh", "layernorm", "gelu", "rmsnorm", "identity"]
    assert [r.index for r in rep.layers] == list(range(5)) and len(rep.blocks) == 4

    model = net.to_torch()  # the gradient norms: torch autograd of the same mean loss
    ((model(torch.tensor(x)) - torch.tensor(t)) ** 2).mean().backward()
    mods = [model[0], model[2].inner[0], model[2].inner[1], model[3], model[4]]
    for row, m in zip(rep.layers, mods):
        assert row.grad_norm == pytest.approx(float(m.weight.grad.norm()), rel=1e-10)
        if getattr(m, "bias", None) is not None:
            assert row.bias_grad_norm == pytest.approx(float(m.bias.grad.norm()), rel=1e-10)
    assert rep.layers[3].bias_grad_norm is None  # RMSNorm has no β

    # the inner Dense's χ and ‖J‖₂ from its dense per-sample Jacobian diag(φ'(h))·Wᵀ, formed here
    res = net.layers[1]
    z0 = np.tanh(x @ net.layers[0].W + net.layers[0].b)
    ln = res.layers[0]
    xh = (z0 - z0.mean(1, keepdims=True)) / np.sqrt(z0.var(1, keepdims=True) + ln.eps)
    h = (ln.gamma * xh + ln.beta) @ res.layers[1].W + res.layers[1].b
    d = jg.activations.get("gelu").df(h)
    J = d[:, :, None] * res.layers[1].W.T[None]
    row = rep.layers[2]
    assert row.chi == pytest.approx((J ** 2).sum(axis=(1, 2)).mean() / 6, rel=1e-12)
    assert row.jacobian_norm == pytest.approx(np.linalg.norm(J, 2, axis=(1, 2)).mean(), rel=1e-6)
    assert row.delta_norm is None  # an inner layer's δ is not kept
    assert rep.layers[0].delta_norm is not None and rep.layers[1].chi is None  # a norm row: no dense fields


def test_a_dense_only_sequential_reports_the_rows_of_the_mlp_report(rng):
    mlp = jg.MLP.init([5, 7, 4, 3], activation="relu", seed=1, bias_std=0.1)
    seq = jg.Sequential([L.Dense(W, b, a) for W, b, a in zip(mlp.weights, mlp.biases, mlp.activations)])
    x, t = rng.standard_normal((9, 5)), rng.standard_normal((9, 3))
    a, b = jg.gradient_flow(mlp, x, t), jg.gradient_flow(seq, x, t)
    assert [vars(r) for r in a.layers] == [vars(r) for r in b.layers]


def test_rows_survive_json_chunks_and_the_plot(rng, tmp_path):
    pytest.importorskip("matplotlib")
    net = _net(rng)
    x, t = rng.standard_normal((12, 4)), rng.standard_normal((12, 3))
    rep = jg.gradient_flow(net, x, t)
    back = json.loads(rep.to_json())["layers"]
    assert [r["activation"] for r in back] == [r.activation for r in rep.layers] and back[1]["jacobian_norm"] is None
    chunked = jg.gradient_flow(net, x, t, max_memory=4 * jg.block_flow.block_report_bytes(net))  # 4 samples a chunk
    for r, c in zip(rep.layers, chunked.layers):
        assert c.grad_norm == pytest.approx(r.grad_norm, rel=1e-10)
        assert (c.chi is None) == (r.chi is None) and (c.chi is None or c.chi == pytest.approx(r.chi, rel=1e-10))
    rep.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
