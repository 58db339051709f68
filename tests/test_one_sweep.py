"""One sweep for every report (issue 19): ``jacgrad.flow.block_flow.partials`` builds an MLP's
``.layers`` report (layers-only mode) and a ``Sequential``'s ``.blocks`` report; the layers-only
mode reads nothing MLP-specific (a Sequential of Dense layers swept that way gives the MLP's
report field for field), and its rows are checked against torch autograd and dense Jacobians."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow import block_flow

L = jg.layers


def _pair(rng):
    mlp = jg.MLP.init([5, 9, 7, 3], activation=["tanh", "relu"], seed=2, bias_std=0.1)
    seq = jg.Sequential([L.Dense(W, b, a) for W, b, a in zip(mlp.weights, mlp.biases, mlp.activations)])
    return mlp, seq


@pytest.mark.parametrize("loss", [None, "mse"])
def test_the_layers_only_sweep_of_a_dense_sequential_is_the_mlp_report(rng, loss):
    mlp, seq = _pair(rng)
    x, t = rng.standard_normal((11, 5)), (None if loss is None else rng.standard_normal((11, 3)))
    kw = {} if loss is None else {"loss": loss}
    want = jg.gradient_flow(mlp, x, t, spectrum_samples=4, **kw).to_dict()
    p = block_flow.partials(seq, x, t, seed=0, spectrum_samples=4, blocks=False, **kw)
    got = block_flow.report_from_partial(p).to_dict()
    assert want["kind"] == got["kind"] == "layers" and got["blocks"] is None
    assert got == want  # the same sweep: bit for bit
    assert jg.gradient_flow(seq, x, t, **kw).has_blocks  # a Sequential's default stays the block report


def test_layers_only_rows_against_torch_and_dense_jacobians(rng):
    torch = pytest.importorskip("torch")
    mlp, _ = _pair(rng)
    x, t = rng.standard_normal((6, 5)), rng.standard_normal((6, 3))
    rep = jg.gradient_flow(mlp, x, t)
    model = mlp.to_torch()
    ((model(torch.tensor(x)) - torch.tensor(t)) ** 2).mean().backward()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    z = x
    for row, m, W, b, act in zip(rep.layers, linears, mlp.weights, mlp.biases, mlp.activations):
        assert row.grad_norm == pytest.approx(float(m.weight.grad.norm()), rel=1e-10)
        assert row.bias_grad_norm == pytest.approx(float(m.bias.grad.norm()), rel=1e-10)
        h = z @ W + b
        d = jg.activations.get(act).df(h)
        J = d[:, :, None] * W.T[None]  # (B, H_out, H_in) per-sample factor, formed densely
        assert row.chi == pytest.approx((J ** 2).sum(axis=(1, 2)).mean() / W.shape[1], rel=1e-12)
        assert row.jacobian_norm == pytest.approx(np.linalg.norm(J, 2, axis=(1, 2)).mean(), rel=1e-6)
        z = jg.activations.get(act).f(h)


def test_a_forward_overflow_is_found_by_the_one_sweep_and_survives_chunks(rng):
    W = [np.eye(3) * 1e200, np.eye(3) * 1e200, np.eye(3)]
    net = jg.MLP(W, None, "identity")
    x = np.ones((4, 3))
    whole = jg.gradient_flow(net, x)
    p = block_flow.merge(block_flow.partials(net, x[:1], start=0, total=4),
                         block_flow.partials(net, x[1:], start=1, total=4))
    merged = block_flow.report_from_partial(p)
    assert whole.nonfinite["stage"] == merged.nonfinite["stage"] == "forward" and whole.nonfinite["layer"] == 1
    assert whole.verdict == merged.verdict == "exploding"
    assert all(np.isnan(r.grad_norm) for r in merged.layers)
