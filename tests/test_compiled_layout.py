"""A compiled step is bitwise ``loss_and_grads`` for every memory layout of ``x`` and the target
(C- or Fortran-ordered, strided, reversed), not only for C-contiguous inputs (issue 9, item 10)."""

import numpy as np
import pytest

import jacgrad as jg


def _laid_out(rng, a, layout):
    """``a``'s values in another memory layout (the values are the same; only strides differ)."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":  # every other row and column of a bigger array
        big = rng.standard_normal((2 * a.shape[0], 2 * a.shape[1])).astype(a.dtype)
        big[::2, ::2] = a
        return big[::2, ::2]
    if layout == "reversed":  # negative strides
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    raise ValueError(layout)


LAYOUTS = ["C", "F", "strided", "reversed"]


@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_random_shapes_and_layouts_are_bitwise_equal(loss):
    rng = np.random.default_rng(20)
    differ = []
    for trial in range(100):
        B, n_in, H, n_out = (int(v) for v in rng.integers(1, 70, 4))
        dtype = "float32" if trial % 3 == 0 else "float64"  # float32 nets get float32 x, float64 targets
        net = jg.MLP.init([n_in, H, n_out], activation=str(rng.choice(["tanh", "gelu"])), seed=trial, bias_std=0.1,
                          dtype=dtype)
        step = net.compile(B, loss=loss)
        x = rng.standard_normal((B, n_in)).astype(dtype)
        t = rng.dirichlet(np.ones(n_out), B) if loss != "mse" else rng.standard_normal((B, n_out))
        lx, lt = LAYOUTS[trial % 4], LAYOUTS[(trial // 4) % 4]
        xl, tl = _laid_out(rng, x, lx), _laid_out(rng, t, lt)
        assert np.array_equal(xl, x) and np.array_equal(tl, t)
        got_loss, got = step(xl, tl)
        want_loss, want = net.loss_and_grads(xl, tl, loss=loss, input_grad=False)
        if not (got_loss == want_loss and np.array_equal(got.flat, want.flat)):
            differ.append((B, n_in, H, n_out, lx, lt))
    assert not differ, f"{len(differ)} of 100 shapes differ: {differ[:5]}"
