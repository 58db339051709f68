"""jg.asarray and the public entry points fed with torch, JAX and other DLPack arrays: the
memory is shared (np.shares_memory, buffer pointers), results equal those from NumPy input
bit for bit, and what cannot be read (bfloat16, CUDA without CuPy, other devices) is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.core import backend

torch = pytest.importorskip("torch")


class DLPackOnly:
    """An array that speaks only DLPack (like many small frameworks): wraps a NumPy array."""

    def __init__(self, a, device=(1, 0)):
        self._a, self._device = a, device

    def __dlpack__(self, stream=None, **kwargs):
        return self._a.__dlpack__()

    def __dlpack_device__(self):
        return self._device


def test_numpy_and_lists():
    x = np.ones((2, 3))
    assert jg.asarray(x) is x
    got = jg.asarray([[1.0, 2.0]])
    assert isinstance(got, np.ndarray) and got.shape == (1, 2)


def test_cpu_tensor_is_a_view_and_requires_grad_is_detached():
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    a = jg.asarray(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == (4, 3)
    assert a.ctypes.data == t.data_ptr()
    with torch.no_grad():
        t[0, 0] = 42.0  # a later in-place change in torch is seen: the same memory
    assert a[0, 0] == 42.0
    f32 = jg.asarray(torch.zeros(2, dtype=torch.float32))
    assert f32.dtype == np.float32
    strided = torch.arange(12.0, dtype=torch.float64).reshape(3, 4).T  # a transposed view stays one
    s = jg.asarray(strided)
    assert s.ctypes.data == strided.data_ptr() and np.array_equal(s, strided.numpy())


def test_jax_array_is_read_without_a_copy():
    jnp = pytest.importorskip("jax.numpy")
    j = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)
    a = jg.asarray(j)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    assert a.ctypes.data == j.unsafe_buffer_pointer()
    np.testing.assert_array_equal(a, np.arange(6.0, dtype=np.float32).reshape(2, 3))


def test_any_dlpack_array():
    base = np.arange(6.0).reshape(2, 3)
    a = jg.asarray(DLPackOnly(base))
    assert np.shares_memory(a, base)


def test_what_cannot_be_read_says_why():
    with pytest.raises(TypeError, match="bfloat16.*cast it first"):
        jg.asarray(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="device meta"):
        jg.asarray(torch.empty(2, device="meta"))
    with pytest.raises(TypeError, match="DLPack device type 4"):
        jg.asarray(DLPackOnly(np.ones(2), device=(4, 0)))
    net = jg.MLP.init([3, 2], seed=0)
    with pytest.raises(TypeError, match="float16"):  # read, then refused by the dtype check
        net(torch.ones(1, 3, dtype=torch.float16))


@pytest.mark.skipif(backend.gpu_available(), reason="CuPy is usable here: the CUDA path is tested instead")
def test_a_cuda_array_without_cupy_is_a_clear_error():
    cuda = DLPackOnly(np.ones((2, 3)), device=(2, 0))
    with pytest.raises(RuntimeError, match="CUDA array .* through CuPy"):
        jg.asarray(cuda)
    net = jg.MLP.init([3, 2], seed=0)
    with pytest.raises(TypeError, match="different devices"):  # a CPU network, a CUDA input
        net(cuda)
    with pytest.raises(RuntimeError, match="CuPy"):
        jg.LayerJacobian(cuda, cuda)


class FakeCudaTensor:
    """Stands in for a CUDA torch tensor on a machine whose torch has no CUDA: what asarray reads."""

    dtype, device = torch.float32, torch.device("cuda", 0)

    def detach(self):
        return self

    def is_conj(self):
        return False

    def is_neg(self):
        return False

    def __dlpack_device__(self):
        return (2, 0)


FakeCudaTensor.__module__ = "torch"


@pytest.mark.skipif(backend.gpu_available(), reason="CuPy is usable here: the CUDA path is tested instead")
def test_a_cuda_tensor_without_cupy_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"CUDA array was given.*CuPy.*\.cpu\(\)"):
        jg.asarray(FakeCudaTensor())
    with pytest.raises(RuntimeError, match="CuPy"):
        jg.get_xp(FakeCudaTensor())


def t64(a):
    return torch.tensor(a, dtype=torch.float64 if a.dtype == np.float64 else torch.float32, requires_grad=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_entry_points_take_torch_tensors(dtype, rng):
    net = jg.MLP.init([4, 6, 3], activation="tanh", seed=1, dtype=np.dtype(dtype).name)
    x = rng.standard_normal((5, 4)).astype(dtype)
    t = rng.standard_normal((5, 3)).astype(dtype)
    labels = rng.integers(0, 3, 5)
    y_np, cache_np = net.forward(x)
    y_t, cache_t = net.forward(t64(x))
    np.testing.assert_array_equal(y_t, y_np)
    for loss, target, torch_target in [("mse", t, t64(t)), ("softmax_cross_entropy", labels, torch.tensor(labels)),
                                       ("sigmoid_bce", np.abs(t) / 4, t64(np.abs(t) / 4))]:
        v_np, g_np = net.loss_and_grads(x, target, loss=loss)
        v_t, g_t = net.loss_and_grads(t64(x), torch_target, loss=loss)
        assert v_t == v_np
        np.testing.assert_array_equal(g_t.flat, g_np.flat)
        np.testing.assert_array_equal(g_t.input, g_np.input)
    gy = rng.standard_normal((5, 3)).astype(dtype)
    np.testing.assert_array_equal(net.backward(cache_t, t64(gy)).flat, net.backward(cache_np, gy).flat)
    r_np = jg.diagnostics.gradient_flow(net, x, target=t)
    r_t = jg.diagnostics.gradient_flow(net, t64(x), target=t64(t))
    assert r_t.to_dict() == r_np.to_dict()


def test_factors_and_chains_take_torch_tensors(rng):
    d, W = rng.uniform(0.5, 1.0, 3), rng.standard_normal((4, 3))
    v, u = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
    J_np = jg.LayerJacobian(d, W)
    J_t = jg.LayerJacobian(torch.tensor(d), torch.tensor(W, requires_grad=True))
    np.testing.assert_array_equal(J_t.dense(), J_np.dense())
    C_np, C_t = jg.Chain([J_np]), jg.Chain([J_t])
    np.testing.assert_array_equal(C_t.vjp(torch.tensor(v)), C_np.vjp(v))
    np.testing.assert_array_equal(C_t.jvp(torch.tensor(u)), C_np.jvp(u))
    np.testing.assert_array_equal(J_t.vjp(torch.tensor(v)), J_np.vjp(v))


def test_jax_input_to_forward(rng):
    jnp = pytest.importorskip("jax.numpy")
    net = jg.MLP.init([4, 3], seed=2, dtype="float32")
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(net(jnp.asarray(x)), net(x))


@pytest.mark.gpu
def test_cuda_tensor_becomes_a_cupy_view():
    import cupy as cp

    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    t = torch.randn(4, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    a = jg.asarray(t)
    assert isinstance(a, cp.ndarray) and a.data.ptr == t.data_ptr()
    net = jg.MLP.init([3, 2], seed=0, device="gpu")
    cp.testing.assert_allclose(net(t), net(cp.asarray(t.detach().cpu().numpy())), rtol=1e-12)
