"""Every parameter-space product of a network holding a ``MultiHeadAttention`` (causal) — per-sample
gradient norms (all three methods, per layer), per-sample gradients, the NTK (trace and full),
``ggn_vp``, ``ggn_diagonal`` and ``clipped_grad`` — against ``torch.func`` on the same torch modules,
float64 to 1e-10. The products read the layer only through the layer protocol (its factor's
``param_vjp_stack``/``param_jvp`` and its four ``TokenDenseLeaf`` leaves)."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")


def _tb():
    """The torch mapping of the token layers (jacgrad.io.interop.torch_blocks; torch is imported)."""
    from jacgrad.io.interop import torch_blocks

    return torch_blocks
pytestmark = pytest.mark.torch

B, T, d, O = 3, 5, 8, 4


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)  # forward AD and vmap: the math kernel


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    nn = torch.nn
    mha = nn.MultiheadAttention(d, 2, batch_first=True, dtype=torch.float64)
    ln = nn.LayerNorm(d, dtype=torch.float64)
    lin = nn.Linear(d, O, dtype=torch.float64)
    with torch.no_grad():
        for p in (mha.in_proj_bias, mha.out_proj.bias, ln.weight, ln.bias):
            p.add_(0.3 * torch.randn_like(p))
    cm = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    mods = {"mha": mha, "ln": ln, "lin": lin}

    def f(p, x):  # one sample: (T, d) -> (T, O)
        sub = lambda name: {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith(name + ".")}  # noqa: E731
        z = x[None]
        y = torch.func.functional_call(mha, sub("mha"), (z, z, z), dict(attn_mask=cm, need_weights=False))[0]
        y = torch.func.functional_call(ln, sub("ln"), (y,))
        return torch.tanh(torch.func.functional_call(lin, sub("lin"), (y,)))[0]

    params = {f"{n}.{k}": v.detach() for n, m in mods.items() for k, v in m.named_parameters()}
    L = jg.layers
    net = jg.Sequential([_tb().attention_from_torch(mha, causal=True),
                         L.LayerNorm(ln.weight.detach().numpy().copy(), ln.bias.detach().numpy().copy()),
                         L.Dense(lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy(), "tanh")])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, O, generator=g, dtype=torch.float64)
    return f, params, net, x, t


def _ours(J):
    """torch's per-parameter arrays ``(…, *torch shape)`` in jacgrad's flat order and layout."""
    gw, gb = J["mha.in_proj_weight"], J["mha.in_proj_bias"]
    lead = gb.shape[:-1]
    parts = []
    for i in range(3):
        parts += [gw[..., i * d:(i + 1) * d, :].transpose(-1, -2).reshape(*lead, -1), gb[..., i * d:(i + 1) * d]]
    parts += [J["mha.out_proj.weight"].transpose(-1, -2).reshape(*lead, -1), J["mha.out_proj.bias"],
              J["ln.weight"], J["ln.bias"], J["lin.weight"].transpose(-1, -2).reshape(*lead, -1), J["lin.bias"]]
    return torch.cat(parts, -1).numpy()


def _per_sample(setup):
    f, params, net, x, t = setup
    loss = lambda p, xi, ti: ((f(p, xi) - ti) ** 2).mean()  # noqa: E731  jacgrad's mse: mean over the sample
    with _math_sdpa():
        return _ours(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, t))


def _jacobians(setup, n=B):
    f, params, net, x, t = setup
    with _math_sdpa():
        J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, x[:n])
    return _ours(J).reshape(n, T * O, -1)


def test_the_layers_are_registered():
    from jacgrad.protocol.layer import layer_class

    assert layer_class("multihead_attention") is jg.layers.MultiHeadAttention
    assert layer_class("embedding") is jg.layers.Embedding


@pytest.mark.parametrize("method", ["auto", "gram", "instantiate"])
def test_per_sample_grad_norms(setup, method):
    f, params, net, x, t = setup
    ref = _per_sample(setup)
    got = net.per_sample_grad_norms(x.numpy(), t.numpy(), method=method)
    np.testing.assert_allclose(got, np.linalg.norm(ref, axis=1), rtol=1e-10)
    per_layer = net.per_sample_grad_norms(x.numpy(), t.numpy(), method=method, per_layer=True)
    n_att = sum(p.size for p in net.layers[0].params)
    np.testing.assert_allclose(per_layer[:, 0], np.linalg.norm(ref[:, :n_att], axis=1), rtol=1e-10)


def test_per_sample_grads_and_clipped_grad(setup):
    f, params, net, x, t = setup
    ref = _per_sample(setup)
    np.testing.assert_allclose(net.per_sample_grads(x.numpy(), t.numpy()).flat, ref, rtol=1e-10, atol=1e-12)
    C = 0.5 * np.median(np.linalg.norm(ref, axis=1))
    clip = np.minimum(1.0, C / np.linalg.norm(ref, axis=1))
    got = net.clipped_grad(x.numpy(), t.numpy(), max_norm=C).flat
    np.testing.assert_allclose(got, (clip[:, None] * ref).sum(axis=0) / B, rtol=1e-10, atol=1e-12)


def test_ntk_trace_and_full(setup):
    f, params, net, x, t = setup
    J = _jacobians(setup, 2)
    np.testing.assert_allclose(jg.ntk(net, x.numpy()[:2], trace=True), np.einsum("iop,jop->ij", J, J), rtol=1e-10)
    full = jg.ntk(net, x.numpy()[:2])  # (N1, N2, n_out, n_out), the T·O outputs of a sample flattened
    np.testing.assert_allclose(full, np.einsum("iop,jqp->ijoq", J, J), rtol=1e-10, atol=1e-10)


def test_ggn_vp_and_diagonal(setup):
    f, params, net, x, t = setup
    J = _jacobians(setup)
    v = np.random.default_rng(2).standard_normal(net.n_params)
    scale = 2.0 / (B * T * O)  # the mse's Hessian over the batch mean of per-sample means
    np.testing.assert_allclose(net.ggn_vp(x.numpy(), v), scale * np.einsum("bop,boq,q->p", J, J, v),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(net.ggn_diagonal(x.numpy(), t.numpy()).flat, scale * np.einsum("bop,bop->p", J, J),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load_round_trip(setup, tmp_path, suffix):
    """The layer's ``spec`` (``heads``, ``causal``: a JSON bool) and its eight arrays through a file."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    f, params, net, x, t = setup
    path = tmp_path / f"net{suffix}"
    net.save(path)
    back = jg.Sequential.load(path)
    assert back.layers[0].causal is True and back.layers[0].heads == 2
    np.testing.assert_array_equal(back(x.numpy()), net(x.numpy()))
