"""The NumPy training step reads a C-contiguous ``x``/target of its dtype in place (no copy, the
same bits as ``loss_and_grads``), never one that overlaps its own buffers, and never keeps the
caller's array; the bias gradient is the GEMV ``1ᵀδ`` on NumPy (``_passes.column_sums``)."""

import gc
import weakref

import numpy as np
import pytest

import jacgrad as jg
from jacgrad._passes import column_sums


def _net(dtype="float32", sizes=(6, 6, 5, 4)):
    return jg.MLP.init(list(sizes), activation="tanh", seed=3, bias_std=0.1, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_contiguous_input_of_the_step_dtype_is_read_in_place_with_the_same_bits(rng, dtype):
    net = _net(dtype)
    step = net.compile(7)
    x = rng.standard_normal((7, 6)).astype(dtype)
    t = rng.standard_normal((7, 4)).astype(dtype)
    loss, g = step(x, t)
    ref_loss, ref = net.loss_and_grads(x, t, input_grad=False)
    assert loss == ref_loss and np.array_equal(g.flat, ref.flat)
    # no copy was made: the static buffers (zeros since construction) were never written
    assert not step._x.any() and not step._target.any()
    # a float64 x for a float32 step, or a Fortran-ordered one, is copied as before
    if dtype == "float32":
        step(x.astype(np.float64), t)
        assert np.array_equal(step._x, x)
    step(np.asfortranarray(x), np.asfortranarray(t))
    assert np.array_equal(step._x, x) and np.array_equal(step._target, t)


def test_the_step_keeps_no_reference_to_the_callers_arrays(rng):
    step = _net().compile(7)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    t = rng.standard_normal((7, 4)).astype(np.float32)
    rx, rt = weakref.ref(x), weakref.ref(t)
    step(x, t)
    del x, t
    gc.collect()
    assert rx() is None and rt() is None


def test_an_input_that_overlaps_the_steps_own_buffers_is_copied_first(rng):
    # x (7, 6) taken from the step's own deltas of the first layer (7, 6): the backward pass
    # overwrites that buffer before it reads x for ∂L/∂W_0, so reading it in place would be wrong
    net = _net()
    step = net.compile(7)
    x0 = rng.standard_normal((7, 6)).astype(np.float32)
    t = rng.standard_normal((7, 4)).astype(np.float32)
    _, g = step(x0, t)
    x = g.deltas[0]
    assert x.flags.c_contiguous and x.dtype == np.float32 and x.shape == (7, 6)
    want_loss, want = net.loss_and_grads(x.copy(), t, input_grad=False)
    loss, got = step(x, t)
    assert loss == want_loss and np.array_equal(got.flat, want.flat)
    # the target may overlap too: the previous output's delta (7, 4) is the loss gradient's shape
    t2 = got.deltas[-1]
    want_loss, want = net.loss_and_grads(x0, t2.copy(), input_grad=False)
    loss, got = step(x0, t2)
    assert loss == want_loss and np.array_equal(got.flat, want.flat)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("float64", 1e-14)])
@pytest.mark.parametrize("B", [1, 2, 33, 256])
def test_bias_gradient_is_the_column_sum_of_the_deltas(rng, dtype, tol, B):
    delta = rng.standard_normal((B, 37)).astype(dtype)
    out = np.empty(37, dtype)
    got = column_sums(delta, out)
    assert got is out
    ref = delta.astype(np.float64).sum(axis=0)
    scale = np.abs(delta.astype(np.float64)).sum(axis=0)
    assert np.all(np.abs(got - ref) <= tol * scale + 1e-300)
    # and it is what a network's backward pass returns as ∂L/∂b, against torch-free float64 sums
    net = jg.MLP.init([5, 37, 3], activation="tanh", seed=1, dtype=dtype)
    x = rng.standard_normal((B, 5))
    y, cache = net.forward(x)
    g = net.backward(cache, rng.standard_normal((B, 3)).astype(dtype))
    for d, db in zip(g.deltas, g.biases):
        d64 = d.astype(np.float64)
        assert np.all(np.abs(db - d64.sum(axis=0)) <= tol * np.abs(d64).sum(axis=0) + 1e-300)
