"""``kernels.bias_activation_forward``: a dense layer's ``h += b; z = φ(h)`` in one GPU kernel (the eager
step launched two). On NumPy the two steps as before (bitwise); on the fake CuPy the eager step
dispatches it once per layer and gives the NumPy numbers; where a GPU is lent, the kernel against
float64 NumPy for every activation, ``out`` aliasing ``h`` included. Its source is compiled by the
NVRTC and nvcc tests with every other instantiation (``tests/test_kernels_nvrtc.py``,
``tests/test_kernels_host.py``)."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cuda import kernels
from jacgrad.elementwise import activations


@pytest.mark.parametrize("name", ["tanh", "relu", "gelu", "sigmoid", "identity"])
def test_numpy_is_the_two_steps_bitwise_and_h_holds_h_plus_b(name, rng):
    h, b = rng.standard_normal((5, 7)), rng.standard_normal(7)
    want_h = h + b
    want = activations.get(name).f(want_h)
    got_h = h.copy()
    z = kernels.bias_activation_forward(got_h, b, name)
    np.testing.assert_array_equal(got_h, want_h)
    np.testing.assert_array_equal(z, want)
    same = h.copy()
    assert kernels.bias_activation_forward(same, b, name, out=same) is same
    np.testing.assert_array_equal(same, want)


def test_the_eager_step_dispatches_it_once_per_layer_on_a_fake_cupy(monkeypatch, rng):
    from fake_cupy_transfers import install
    from jacgrad.protocol import passes

    fake = install(monkeypatch)
    calls = []
    routed = passes.bias_activation_forward

    def spy(*args, **kwargs):
        calls.append(args[2])
        return routed(*args, **kwargs)

    monkeypatch.setattr(passes, "bias_activation_forward", spy)
    sizes = [6, 8, 8, 3]
    W = [rng.standard_normal((m, n)) / np.sqrt(m) for m, n in zip(sizes, sizes[1:])]
    b = [rng.standard_normal(n) for n in sizes[1:]]
    acts = ["tanh", "gelu", "identity"]
    host, dev = jg.MLP(W, b, acts), jg.MLP([fake.asarray(w) for w in W], [fake.asarray(c) for c in b], acts)
    x, t = rng.standard_normal((4, 6)), rng.standard_normal((4, 3))
    loss, g = dev.loss_and_grads(fake.asarray(x), fake.asarray(t))
    ref_loss, ref = host.loss_and_grads(x, t)
    assert len(calls) == 3 and [getattr(a, "name", a) for a in calls] == acts
    # not bitwise: ∂b is a GEMV on NumPy and CuPy's column sum on the (fake) GPU (passes.column_sums)
    np.testing.assert_allclose(np.asarray(g.flat.view(np.ndarray)), ref.flat, rtol=1e-13, atol=1e-15)
    assert float(loss) == float(ref_loss)  # the forward pass: the same additions and φ, bitwise
    host.loss_and_grads(x, t)
    assert len(calls) == 3  # NumPy keeps its two steps


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("name", activations.names())
def test_gpu_kernel_matches_float64_numpy(name, dtype, tol, rng):
    import cupy as cp

    act = activations.get(name)
    h, b = rng.normal(0, 3, (6, 67)).astype(dtype), rng.normal(0, 1, 67).astype(dtype)
    want_h = h.astype(np.float64) + b.astype(np.float64)
    gh = cp.asarray(h)
    z = kernels.bias_activation_forward(gh, cp.asarray(b), name)
    np.testing.assert_allclose(cp.asnumpy(gh), want_h, rtol=tol, atol=tol)
    np.testing.assert_allclose(cp.asnumpy(z), act.f(cp.asnumpy(gh).astype(np.float64)), rtol=tol, atol=tol)
    gh = cp.asarray(h)
    assert kernels.bias_activation_forward(gh, cp.asarray(b), name, out=gh) is gh  # y aliasing h
    np.testing.assert_allclose(cp.asnumpy(gh), cp.asnumpy(z), rtol=0, atol=0)
