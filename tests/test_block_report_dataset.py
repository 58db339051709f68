"""The block report of a Sequential over a Dask dataset equals the one-batch report: per-chunk
partials (sums) merged up a tree, the measuring method chosen by the whole batch's size, the
random cotangents drawn per sample row."""

import math

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow import block_flow
from jacgrad.flow.diagnostics import gradient_flow

da = pytest.importorskip("dask.array")
L = jg.layers


def _net(width=6, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)

    def W(a, b):
        return (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)

    return jg.Sequential([
        L.Dense(W(5, width), rng.standard_normal(width).astype(dtype), "tanh"),
        L.Residual([L.LayerNorm(1 + 0.1 * rng.standard_normal(width).astype(dtype)), L.Dense(W(width, width), None, "gelu"),
                    L.Dense(W(width, width), None, "sigmoid")], scale=0.7),
        L.RMSNorm(np.ones(width, dtype)),
        L.Dense(W(width, 3), None, "identity")])


def _same(a, b, rtol):
    assert a.verdict == b.verdict and a.batch == b.batch and a.loss == b.loss
    for ra, rb in zip(a.blocks, b.blocks, strict=True):
        assert (ra.kind, ra.h_in, ra.h_out, ra.chi_exact, ra.scale, ra.inner) == \
               (rb.kind, rb.h_in, rb.h_out, rb.chi_exact, rb.scale, rb.inner)
        for f in ("chi", "jacobian_norm", "jacobian_bound", "grad_norm"):
            assert math.isclose(getattr(ra, f), getattr(rb, f), rel_tol=rtol, abs_tol=1e-300), f
    assert math.isclose(a.chi_bar, b.chi_bar, rel_tol=rtol)
    assert math.isclose(a.jacobian_spectral_norm, b.jacobian_spectral_norm, rel_tol=rtol)
    if a.loss_value is not None:
        assert math.isclose(a.loss_value, b.loss_value, rel_tol=rtol)
    assert a.hints == b.hints


@pytest.mark.parametrize("chunks", [40, 17, (5, 30, 5)])
@pytest.mark.parametrize("with_target", [False, True])
def test_dask_block_report_equals_the_one_batch_report(chunks, with_target):
    net = _net()
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 5))
    T = rng.standard_normal((40, 3)) if with_target else None
    one = gradient_flow(net, X, T)
    Xd = da.from_array(X, chunks=(chunks, 5))
    Td = None if T is None else da.from_array(T, chunks=(chunks, 3))
    lazy = gradient_flow(net, Xd, Td)
    assert all(r.chi_exact for r in one.blocks)
    _same(one, lazy, 1e-11)
    # and the one-batch report is right: χ of each block against the dense per-sample Jacobians
    _, cache = net.forward(X)
    for r, F in zip(one.blocks, net.jacobian_chain(cache).factors):
        D = F.dense()
        assert math.isclose(r.chi, float((D * D).sum(axis=(1, 2)).mean()) / F.h_out, rel_tol=1e-12)
        assert math.isclose(r.jacobian_norm, float(np.linalg.norm(D, ord=2, axis=(1, 2)).mean()), rel_tol=1e-10)


def test_in_memory_targets_with_dask_samples_and_the_reverse():
    net = _net()
    rng = np.random.default_rng(2)
    X, T = rng.standard_normal((24, 5)), rng.standard_normal((24, 3))
    one = gradient_flow(net, X, T)
    _same(one, gradient_flow(net, X, da.from_array(T, chunks=(7, 3))), 1e-11)
    _same(one, gradient_flow(net, da.from_array(X, chunks=(7, 5)), T), 1e-11)


def test_large_batch_takes_the_estimates_in_every_chunk_alike(monkeypatch):
    monkeypatch.setattr(block_flow, "EXACT_ELEMENTS", 100)  # 6x6 blocks: exact only for <= 2 samples
    net = _net()
    X = np.random.default_rng(3).standard_normal((30, 5))
    one = gradient_flow(net, X)
    assert not any(r.chi_exact for r in one.blocks)
    lazy = gradient_flow(net, da.from_array(X, chunks=(2, 5)))  # chunks small enough to be exact alone
    assert not any(r.chi_exact for r in lazy.blocks)
    _same(one, lazy, 1e-5)  # Hutchinson sums are chunk-free; Lanczos settles to its tolerance


def test_bad_dataset_inputs_are_named():
    net = _net()
    with pytest.raises(ValueError, match=r"x has no samples \(N = 0\)"):
        gradient_flow(net, da.zeros((0, 5), chunks=(1, 5)))
    with pytest.raises(ValueError, match=r"takes \(N, 5\) inputs"):
        gradient_flow(net, da.zeros((10, 4), chunks=(5, 4)))
    with pytest.raises(ValueError, match="valid"):
        gradient_flow(net, da.zeros((10, 5), chunks=(5, 5)), da.zeros((10, 3), chunks=(5, 3)), loss="nope")


def test_partials_of_different_networks_do_not_merge():
    a = block_flow.BlockChunk("mse", 0, 4)(_net(), np.ones((2, 5)))
    b = block_flow.BlockChunk("mse", 0, 4)(_net(width=7), np.ones((2, 5)))
    with pytest.raises(ValueError, match="different networks"):
        block_flow.merge_block_partials(a, b)
