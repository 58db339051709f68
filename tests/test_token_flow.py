"""``jg.gradient_flow`` on token batches: a small pre-norm transformer block (LayerNorm → attention,
residual; LayerNorm → Dense-ReLU-Dense, residual; Dense head) on ``(B, T, d)``, every number
against torch: autograd for the gradient norms, ``vmap(jacrev)`` for each block's and each layer's
Jacobians (χ per token row, ‖J‖₂, the input-output spectrum), the pre-activations for dead units;
and an ``Embedding`` first (its spectrum is of the embedded input)."""

import math

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow.verdict import decide
from test_token_jacobian import _torch_forward  # noqa: E402 - tests/ is on sys.path

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

B, T, d, F, O, V = 3, 4, 6, 8, 5, 9


def _block(embedding: bool):
    from jacgrad.io.interop.torch_blocks import Residual

    nn = torch.nn
    torch.manual_seed(3)
    mods = [nn.Embedding(V, d)] if embedding else []
    mods += [Residual(nn.Sequential(nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True))),
             Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, F), nn.ReLU(), nn.Linear(F, d))),
             nn.Linear(d, O)]
    m = nn.Sequential(*mods).double()
    with torch.no_grad():
        m[-2].inner[1].bias[2] = -50.0  # unit 2 of the ReLU never fires: one dead unit over every token
    return m


def _jac(f, z):
    """Per sample ``(T·n_out, T·n_in)`` of ``f: (1, T, n_in) -> (1, T, n_out)`` at ``z: (B, T, n_in)``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        J = torch.func.vmap(torch.func.jacrev(lambda zi: f(zi[None])[0]))(z)
    return J.reshape(z.shape[0], T * J.shape[2], -1).numpy()


def _chi_norm(J):
    """χ = mean_i ‖J_i‖_F²/rows, and the mean of ‖J_i‖₂."""
    return float(((J * J).sum(axis=(1, 2)) / J.shape[1]).mean()), float(np.linalg.norm(J, 2, axis=(1, 2)).mean())


@pytest.fixture(scope="module")
def case():
    m = _block(False)
    net = jg.Sequential.from_torch(m)
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, O))
    return m, net, x, t, jg.gradient_flow(net, x, t)


def test_block_rows_match_torch(case):
    m, net, x, t, r = case
    xt = torch.from_numpy(x).requires_grad_(False)
    f = _torch_forward(m)
    loss = ((f(xt) - torch.from_numpy(t)) ** 2).mean()
    grads = torch.autograd.grad(loss, list(m.parameters()))
    z, chis = xt, []
    for j, (block, row) in enumerate(zip(m, r.blocks)):
        g = [gr for p, gr in zip(m.parameters(), grads) if any(p is q for q in block.parameters())]
        assert row.grad_norm == pytest.approx(math.sqrt(sum(float((a * a).sum()) for a in g)), rel=1e-10)
        J = _jac(_torch_forward(block), z)
        chi, norm = _chi_norm(J)
        assert (row.h_in, row.h_out) == (J.shape[2], J.shape[1])
        assert row.chi == pytest.approx(chi, rel=1e-10) and row.chi_exact
        assert row.jacobian_norm == pytest.approx(norm, rel=1e-9)
        chis.append(chi)
        with torch.no_grad():
            z = _torch_forward(block)(z)
    assert r.verdict == decide(chis)[0] and r.chi_bar == pytest.approx(decide(chis)[1], rel=1e-10)
    s = np.linalg.svd(_jac(f, xt), compute_uv=False)
    np.testing.assert_allclose(r.jacobian_singular_values, s, rtol=0, atol=1e-10 * s.max())
    assert r.jacobian_spectral_norm == pytest.approx(s[:, 0].mean(), rel=1e-9)


def test_layer_rows_match_torch_per_token_row(case):
    m, net, x, t, r = case
    ln1, mha = m[0].inner
    ln2, l1, relu, l2 = m[1].inner
    with torch.no_grad():
        z0 = torch.from_numpy(x)
        z1 = _torch_forward(m[0])(z0)
        a1 = ln2(z1)
        a2 = relu(l1(a1))
    rows = r.layers
    assert [lf.activation for lf in rows] == ["layernorm", "multihead_attention", "layernorm", "relu", "identity",
                                              "identity"]
    # χ of a per-token layer: its token rows' ‖J_{i,t}‖_F²/n_out, averaged; of attention: per sample over T·d
    for row, f, z in ((rows[0], ln1, z0), (rows[1], lambda u: mha(u, u, u, need_weights=False)[0], ln1(z0).detach()),
                      (rows[2], ln2, z1), (rows[3], lambda u: relu(l1(u)), a1), (rows[4], l2, a2), (rows[5], m[2], m[1](z1).detach())):
        J = _jac(f, z)
        chi, norm = _chi_norm(J)
        assert row.chi == pytest.approx(chi, rel=1e-10)
        if row.activation != "multihead_attention":  # block-diagonal: ‖J‖₂ per token row, averaged
            per_row = np.linalg.norm(np.stack([J[:, i * J.shape[1] // T:(i + 1) * J.shape[1] // T,
                                                  i * J.shape[2] // T:(i + 1) * J.shape[2] // T] for i in range(T)], 1),
                                     2, axis=(2, 3)).mean()
            assert row.jacobian_norm == pytest.approx(per_row, rel=1e-9)
        else:
            assert row.jacobian_norm == pytest.approx(norm, rel=1e-9)
    with torch.no_grad():
        dead = int((l1(a1) <= 0).reshape(-1, F).all(axis=0).sum())
    assert dead == 1 and rows[3].dead_units == dead
    assert rows[3].active_fraction == pytest.approx(float((l1(a1) > 0).double().mean()), rel=1e-12)
    # gradient norms of each layer's parameters, weights and biases apart (attention: its four of each)
    xt = torch.from_numpy(x)
    loss = ((_torch_forward(m)(xt) - torch.from_numpy(t)) ** 2).mean()
    for row, mod in zip(rows, (ln1, mha, ln2, l1, l2, m[2])):
        named = dict(mod.named_parameters())
        g = dict(zip(named, torch.autograd.grad(loss, list(named.values()), retain_graph=True)))
        w = [v for k, v in g.items() if "weight" in k]
        b = [v for k, v in g.items() if "bias" in k]
        assert row.grad_norm == pytest.approx(math.sqrt(sum(float((a * a).sum()) for a in w)), rel=1e-10)
        assert row.bias_grad_norm == pytest.approx(math.sqrt(sum(float((a * a).sum()) for a in b)), rel=1e-10)


def test_embedding_input_reports_the_embedded_spectrum():
    m = _block(True)
    net = jg.Sequential.from_torch(m)
    tok = np.random.default_rng(5).integers(0, V, (B, T))
    r = jg.gradient_flow(net, tok)
    emb = r.blocks[0]
    assert (emb.kind, emb.h_in, emb.h_out, emb.chi) == ("embedding", 0, T * d, 0.0)
    assert len(r.blocks) == 4
    with torch.no_grad():
        z = m[0](torch.from_numpy(tok))
    s = np.linalg.svd(_jac(_torch_forward(m[1:]), z), compute_uv=False)
    np.testing.assert_allclose(r.jacobian_singular_values, s, rtol=0, atol=1e-10 * s.max())
    chis = [b.chi for b in r.blocks[1:]]
    assert r.chi_bar == pytest.approx(decide(chis)[1], rel=1e-12) and r.verdict == decide(chis)[0]


def test_chunked_and_subsampled_token_reports_agree(case):
    """Under a small ``max_memory`` the batch is measured a chunk of samples at a time: the same
    numbers; ``norm_samples`` measures ‖J‖₂ over a subsample of samples (all of each one's tokens)."""
    m, net, x, t, r = case
    chunked = jg.gradient_flow(net, x, t, max_memory=net_bytes(net, x))
    for a, b in zip(r.blocks + r.layers, chunked.blocks + chunked.layers):
        for f in ("chi", "jacobian_norm", "grad_norm"):
            assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-10), (a, f)
    np.testing.assert_allclose(chunked.jacobian_singular_values, r.jacobian_singular_values, rtol=1e-10)
    sub = jg.gradient_flow(net, x, t, norm_samples=1)
    assert sub.norm_samples == 1
    norms = np.linalg.norm(_jac(_torch_forward(m[0]), torch.from_numpy(x)), 2, axis=(1, 2))  # one per sample
    assert sum(sub.blocks[0].jacobian_norm == pytest.approx(n, rel=1e-9) for n in norms) == 1


def net_bytes(net, x):
    """A ``max_memory`` that fits one sample of ``x`` at a time (``block_report_bytes`` times T)."""
    from jacgrad.flow.block_flow import block_report_bytes

    return x.shape[1] * block_report_bytes(net) + 1
