"""Attacks on the block report of a ``Sequential`` (one batch and Dask datasets) and on the torch
table of ``interop.torch_blocks``: non-finite inputs and parameters get an error naming them, an
overflow inside the net is the verdict "exploding" (as for an MLP), never an SVD that does not
converge; a NumPy batch with Dask targets of another length is named; ``layers_to_torch`` takes
any NumPy array a layer holds."""

import warnings

import numpy as np
import pytest

import jacgrad as jg

da = pytest.importorskip("dask.array")
L = jg.layers


def _net(W_last=None):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 3)) if W_last is None else W_last
    return jg.Sequential([L.LayerNorm(np.ones(4)),
                          L.Residual([L.Dense(rng.standard_normal((4, 4)) / 2, None, "tanh"),
                                      L.Residual([L.Dense(np.eye(4) * 0.3, None, "tanh")], 0.5)], 0.7),
                          L.Dense(W), L.RMSNorm(np.ones(3))])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dask", [False, True], ids=["batch", "dask"])
def test_non_finite_inputs_are_named(bad, dask):
    x = np.random.default_rng(1).standard_normal((10, 4))
    x[7, 2] = bad
    X = da.from_array(x, chunks=(3, -1)) if dask else x
    with pytest.raises(ValueError, match=r"x has non-finite values \(inf or NaN\) in 1 rows \(first: sample 7\)"):
        jg.diagnostics.gradient_flow(_net(), X)


def test_non_finite_parameters_name_the_layer_inside_nested_blocks():
    net = _net()
    x = np.random.default_rng(1).standard_normal((6, 4))
    inner = net.layers[1].layers[1].layers[0]
    inner.W[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"layer 1, inner layer 1, inner layer 0: W has non-finite values"):
        jg.diagnostics.gradient_flow(net, x)
    with pytest.raises(ValueError, match=r"layer 1, inner layer 1, inner layer 0: W has non-finite"):
        jg.diagnostics.gradient_flow(net, da.from_array(x, chunks=(2, -1)))
    inner.W[0, 0] = 0.3
    net.layers[3].gamma[1] = np.inf
    with pytest.raises(ValueError, match=r"layer 3: gamma has non-finite values"):
        jg.diagnostics.gradient_flow(net, x)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "estimated"])
def test_an_overflow_inside_the_net_is_exploding(exact, monkeypatch):
    """Finite x and weights whose forward overflows into the LayerNorm: the MLP report says
    "exploding" for such a net; the block report raised LinAlgError("SVD did not converge")."""
    if not exact:
        monkeypatch.setattr(jg.block_flow, "EXACT_ELEMENTS", 0)
    net = jg.Sequential([L.Dense(np.full((4, 4), 1e200)), L.Dense(np.full((4, 4), 1e200)), L.LayerNorm(np.ones(4))])
    x = np.random.default_rng(1).standard_normal((6, 4))
    with np.errstate(all="ignore"):
        for X in (x, da.from_array(x, chunks=(2, -1))):
            r = jg.diagnostics.gradient_flow(net, X)
            assert r.verdict == "exploding" and r.chi_bar == np.inf
            assert r.blocks[2].chi == np.inf and r.jacobian_spectral_norm == np.inf


def test_a_healthy_net_keeps_its_measures():
    """The overflow guard changes nothing for a finite net: its rows against dense float64 ones."""
    net = _net()
    x = np.random.default_rng(2).standard_normal((5, 4))
    r = jg.diagnostics.gradient_flow(net, x)
    chain = net.jacobian_chain(net.forward(x)[1])
    for row, F in zip(r.blocks, chain.factors):
        D = F.dense()
        assert row.chi == pytest.approx((D ** 2).sum() / 5 / F.h_out, rel=1e-12)
        assert row.jacobian_norm == pytest.approx(np.linalg.norm(D, 2, axis=(1, 2)).mean(), rel=1e-12)
    J = chain.jacobian()
    assert r.jacobian_spectral_norm == pytest.approx(np.linalg.norm(J, 2, axis=(1, 2)).mean(), rel=1e-12)


def test_a_numpy_batch_with_dask_targets_of_another_length_is_named():
    x = np.random.default_rng(1).standard_normal((7, 4))
    T = da.from_array(np.zeros((10, 3)), chunks=(3, -1))
    with pytest.raises(ValueError, match=r"x has shape \(7, 4\) but the target has 10 samples"):
        jg.diagnostics.gradient_flow(_net(), x, T)


# ---------------------------------------------------------------------------- layers_to_torch
torch = pytest.importorskip("torch")


def test_layers_to_torch_takes_reversed_and_read_only_arrays():
    from jacgrad.io.interop.torch_blocks import layers_from_torch, layers_to_torch

    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 3))[::-1]  # negative strides: torch cannot view them
    gamma = rng.standard_normal(3)
    gamma.flags.writeable = False  # read-only: a view would be a torch tensor writing into it
    layers = [L.Dense(W, None, "tanh"), L.LayerNorm(gamma)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = layers_to_torch(layers)
    back = layers_from_torch(m)
    np.testing.assert_array_equal(back[0].W, W)
    np.testing.assert_array_equal(back[1].gamma, gamma)
    x = rng.standard_normal((2, 4))
    np.testing.assert_allclose(m(torch.tensor(x)).detach().numpy(), jg.Sequential(layers)(x), rtol=1e-13, atol=1e-14)


def test_a_sequential_goes_back_to_torch_as_an_mlp_does():
    net = _net()
    m = net.to_torch()
    x = np.random.default_rng(4).standard_normal((3, 4))
    np.testing.assert_allclose(m(torch.tensor(x)).detach().numpy(), net(x), rtol=1e-13)


# ---------------------------------------------------------------------------- a large in-memory batch
ENTRIES = {"block_report": lambda net, x, *t, **kw: jg.block_flow.block_report(net, x, *t, **kw),
           "gradient_flow": lambda net, x, *t, **kw: jg.diagnostics.gradient_flow(net, x, *t, **kw)}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_an_in_memory_batch_above_max_memory_is_reported_a_chunk_at_a_time(monkeypatch, entry):
    """``gradient_flow(sequential, x, max_memory=...)`` ignored max_memory for a NumPy batch (the
    MLP report chunks it): a batch too large for memory was measured whole, and a bad max_memory
    passed silently. Now the chunks' partials are merged: the same report."""
    net, rng = _net(), np.random.default_rng(6)
    x, t = rng.standard_normal((50, 4)), rng.standard_normal((50, 3))
    report = ENTRIES[entry]
    whole = [report(net, x, t), report(net, x)]
    sizes, call = [], jg.block_flow.BlockChunk.__call__

    def spy(self, net, x, *rest, **kw):
        sizes.append(x.shape[0])
        return call(self, net, x, *rest, **kw)

    monkeypatch.setattr(jg.block_flow.BlockChunk, "__call__", spy)
    budget = 7 * jg.block_flow.block_report_bytes(net)
    chunked = [report(net, x, t, max_memory=budget), report(net, x, max_memory=budget)]
    assert max(sizes) <= 7 and sum(sizes) == 100
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(b.chi, a.chi, rtol=1e-12)
        np.testing.assert_allclose([r.grad_norm for r in b.blocks], [r.grad_norm for r in a.blocks], rtol=1e-12)
        np.testing.assert_allclose([r.jacobian_norm for r in b.blocks], [r.jacobian_norm for r in a.blocks], rtol=1e-12)
        assert b.jacobian_spectral_norm == pytest.approx(a.jacobian_spectral_norm, rel=1e-12)
        assert b.verdict == a.verdict and b.batch == 50
    assert chunked[0].loss_value == pytest.approx(whole[0].loss_value, rel=1e-12)
    with pytest.raises(ValueError, match="max_memory must be a number of bytes > 0, or None for the default budget; got -1"):
        report(net, x, max_memory=-1)


def test_partials_of_different_measurements_are_not_merged(monkeypatch):
    """merge_block_partials checked only the network: a loss partial merged with a cotangent one
    gave a TypeError (None + float) or, the other way round, silently dropped the loss; chunks of
    batches of different sizes could mix exact and estimated measures."""
    net = _net()
    x = np.random.default_rng(7).standard_normal((6, 4))
    f, merge = jg.block_flow.BlockChunk, jg.block_flow.merge_block_partials
    with_loss, without = f("mse", 0, 6)(net, x[:3], np.zeros((3, 3))), f("mse", 0, 6)(net, x[3:], start=3)
    for a, b in ((with_loss, without), (without, with_loss)):
        with pytest.raises(ValueError, match="partials of different losses cannot be merged"):
            merge(a, b)
    ce = f("softmax_cross_entropy", 0, 6)(net, x[3:], np.zeros(3, dtype=int), start=3)
    with pytest.raises(ValueError, match="different losses"):
        merge(with_loss, ce)
    assert merge(with_loss, f("mse", 0, 6)(net, x[3:], np.zeros((3, 3)), start=3))["count"] == 6
    monkeypatch.setattr(jg.block_flow, "EXACT_ELEMENTS", 30)  # 3 x 4 x 4 = 48 > 30 for a batch of 3
    small, big = f("mse", 0, 1)(net, x[:1]), f("mse", 0, 3)(net, x[1:4], start=1)
    with pytest.raises(ValueError, match=r"different methods \(exact / estimated"):
        merge(small, big)
