"""On CuPy arrays the normalisation layers and factors launch kernels/norm.cu — not NumPy.

A fake CuPy (CuPy-typed NumPy arrays, tests/fake_cupy_transfers.py) carries a Sequential with
LayerNorm and RMSNorm layers; norm.cu's kernels run on the host build of kernels/norm.cuh
(tests/norm_host_kernels.py), so each launch is recorded AND computes. Every result is compared
with the same net on NumPy (the reference path, which launches nothing); the dense layers'
steps stay on NumPy here (the fake routes them), the norm layers' cannot: a NumPy fallback
inside them would show as a missing launch, and their kernels refuse NumPy input.
"""

from __future__ import annotations

import numpy as np
import pytest

import jacgrad as jg
import norm_host_kernels as host
from jacgrad.cuda import norm_kernels
from jacgrad.algebra.factors import NormFactor

L = jg.layers


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    for compiler in host.COMMANDS:  # either build will do: the numbers are test_kernels_norm_host.py's
        lib = host.build(compiler, tmp_path_factory.mktemp("norm_wiring"))
        if isinstance(lib, BaseException):
            raise lib
        if lib is not None:
            return lib
    pytest.skip("neither g++ nor nvcc is on PATH")


@pytest.fixture
def device(library, monkeypatch):
    fake, arrays = host.install(monkeypatch, library)
    fake.arrays = arrays  # counts the device-to-host transfers
    yield fake, arrays.asarray
    host.clear_caches()


def build(put, n, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    W = [rng.standard_normal((n, n)) / np.sqrt(n) for _ in range(3)]
    g = [1 + 0.3 * rng.standard_normal(n) for _ in range(2)]
    beta = 0.2 * rng.standard_normal(n)
    return jg.Sequential([
        L.Dense(put(W[0]), put(0.1 * np.arange(n)), "tanh"),
        L.LayerNorm(put(g[0]), put(beta), eps=1e-3),
        L.Residual([L.Dense(put(W[1]), None, "gelu"), L.RMSNorm(put(g[1]), eps=1e-4)], scale=0.5),
        L.Dense(put(W[2]), None, "identity"),
    ])


def kernel_names(fake) -> list[str]:
    return [e.split("::")[1].split("<")[0] for e, _, _ in fake.launches]


def host_of(a):
    return np.array(a.view(np.ndarray)) if isinstance(a, np.ndarray) else a


@pytest.mark.parametrize("n", [5, 8])
def test_sequential_forward_backward_and_jacobians_launch_the_norm_kernels(device, n):
    fake, put = device
    rng = np.random.default_rng(1)
    x, gy = rng.standard_normal((6, n)), rng.standard_normal((6, n))
    cpu = build(lambda a: a, n)
    y_ref, cache_ref = cpu.forward(x)
    g_ref = cpu.backward(cache_ref, gy)
    C_ref = cpu.jacobian_chain(cache_ref)
    assert fake.launches == []  # NumPy arrays: the reference path, no kernel

    gpu = build(put, n)
    y, cache = gpu.forward(put(x))
    assert kernel_names(fake) == ["norm_forward", "norm_forward"]  # the LayerNorm and the inner RMSNorm
    np.testing.assert_allclose(host_of(y), y_ref, rtol=1e-12, atol=1e-12)

    del fake.launches[:]
    g = gpu.backward(cache, put(gy))
    # one kernel per layer: the rows fit the registers, the column sums are fused (norm_kernels.row_fits)
    assert kernel_names(fake) == ["norm_backward", "norm_backward"]
    np.testing.assert_allclose(host_of(g.flat), g_ref.flat, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(host_of(g.input), g_ref.input, rtol=1e-11, atol=1e-12)

    C = gpu.jacobian_chain(cache)
    u, v = rng.standard_normal((6, n)), rng.standard_normal((6, n))
    for order in ("forward", "reverse", "auto"):
        del fake.launches[:]
        J = C.jacobian(order=order)
        np.testing.assert_allclose(host_of(J), C_ref.jacobian(order=order), rtol=1e-11, atol=1e-12)
        assert "norm_product" in kernel_names(fake), f"order={order}: no norm kernel"
    del fake.launches[:]
    np.testing.assert_allclose(host_of(C.jvp(put(u))), C_ref.jvp(u), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(host_of(C.vjp(put(v))), C_ref.vjp(v), rtol=1e-11, atol=1e-12)
    assert kernel_names(fake) == ["norm_product"] * 4  # C.jvp and C.vjp through the two norm factors


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_the_layer_backward_adds_per_sample_squared_norms_in_its_row_kernel(device, kind):
    """``backward(..., sq=)``: each sample's ‖g⊙x̂‖² (+ ‖g‖²) added by norm_backward, into a
    contiguous sq and into a column of a (B, L) array (the Sequential's per-layer layout)."""
    fake, put = device
    rng = np.random.default_rng(2)
    B, n = 7, 5
    gamma, beta = rng.standard_normal(n), rng.standard_normal(n)
    x, g = rng.standard_normal((B, n)), rng.standard_normal((B, n))
    make = (lambda p: L.LayerNorm(p(gamma), p(beta))) if kind == "layernorm" else (lambda p: L.RMSNorm(p(gamma)))
    cpu = make(lambda a: a)
    _, st = cpu.forward(x)
    want_sq = np.ones((B, 3))
    want_g = [np.empty(n) for _ in cpu.params]
    want_dx, _ = cpu.backward(st, g, want_g, sq=want_sq[:, 1])
    gpu = make(put)
    _, dst = gpu.forward(put(x))
    for sq in (put(np.ones(B)), put(np.ones((B, 3)))[:, 1]):
        del fake.launches[:]
        got_g = [put(np.empty(n)) for _ in gpu.params]
        dx, _ = gpu.backward(dst, put(g), got_g, sq=sq)
        assert kernel_names(fake) == ["norm_backward"]  # the column sums fused
        np.testing.assert_allclose(host_of(sq), want_sq[:, 1], rtol=1e-12)
        np.testing.assert_allclose(host_of(dx), want_dx, rtol=1e-12, atol=1e-13)
        for a, b in zip(got_g, want_g):
            np.testing.assert_allclose(host_of(a), b, rtol=1e-12, atol=1e-13)


def test_per_sample_grad_norms_of_a_norm_net_on_the_device(device):
    fake, put = device
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    ref = build(lambda a: a, 5).per_sample_grad_norms(x, t)
    got = build(put, 5).per_sample_grad_norms(put(x), put(t))
    np.testing.assert_allclose(host_of(got), ref, rtol=1e-11)
    assert {"norm_forward"} <= set(kernel_names(fake))


@pytest.mark.parametrize("shared", [False, True])
def test_norm_factor_products_on_the_device(device, shared):
    fake, put = device
    rng = np.random.default_rng(3)
    B, n = 4, 6
    xhat = rng.standard_normal(n if shared else (B, n))
    inv = np.asarray(1.7) if shared else rng.uniform(0.5, 2, B)
    gamma = rng.standard_normal(n)
    for centered in (True, False):
        F_ref = NormFactor(gamma, inv, xhat, centered)
        F = NormFactor(put(gamma), put(inv), put(xhat), centered)
        a, s = rng.standard_normal((B, n)), rng.standard_normal((B, 3, n))
        del fake.launches[:]
        for method, arg in (("jvp", a), ("vjp", a), ("jvp_stack", s), ("vjp_stack", s), ("jvp_stack", s[0])):
            got = getattr(F, method)(put(arg))
            np.testing.assert_allclose(host_of(got), getattr(F_ref, method)(arg), rtol=1e-12, atol=1e-13,
                                       err_msg=f"{method} {arg.shape} centered={centered} shared={shared}")
        assert kernel_names(fake) == ["norm_product"] * 5


def test_float32_layers_run_float_kernels(device):
    fake, put = device
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
    y, (xhat, inv) = L.LayerNorm(put(gamma), put(beta)).forward(put(x))
    assert y.dtype == xhat.dtype == inv.dtype == np.float32
    assert [e for e, _, _ in fake.launches] == ["jacgrad::norm_forward<float>"]
    y_ref, _ = L.LayerNorm(gamma, beta).forward(x)
    np.testing.assert_allclose(host_of(y), y_ref, rtol=1e-5, atol=1e-6)


def test_the_norm_steps_never_wait_on_the_device(device):
    """No host transfer (a sync on a real GPU) in the forward, the backward or the products."""
    fake, put = device
    rng = np.random.default_rng(5)
    layer = L.LayerNorm(put(rng.standard_normal(16)), put(rng.standard_normal(16)))
    x, g = put(rng.standard_normal((300, 16))), put(rng.standard_normal((300, 16)))  # 300 rows: partial sums
    fake.arrays.reset()
    y, state = layer.forward(x)
    grads = [put(np.empty(16)), put(np.empty(16))]
    sq = put(np.zeros(300))
    layer.backward(state, g, grads, sq=sq)
    F = layer.factor(state)
    F.jvp(g), F.vjp(g), F.jvp_stack(put(rng.standard_normal((300, 2, 16))))
    assert fake.arrays.transfers == 0, dict(fake.arrays.where)
    assert sorted(set(kernel_names(fake))) == ["norm_backward", "norm_forward", "norm_product"]


def test_a_gamma_of_another_dtype_is_named(device):
    _, put = device
    layer = L.RMSNorm(put(np.ones(4)))
    with pytest.raises(TypeError, match="x is float32 but gamma is float64"):
        layer.forward(put(np.ones((2, 4), np.float32)))


def test_the_kernels_refuse_numpy_arrays():
    x = np.ones((2, 3))
    with pytest.raises(TypeError, match="runs on CuPy arrays"):
        norm_kernels.forward(x, np.ones(3), None, 1e-5, False)
    with pytest.raises(TypeError, match="runs on CuPy arrays"):
        norm_kernels.project(x, x, np.ones(3), np.ones(2), True, True)
    with pytest.raises(TypeError, match="runs on CuPy arrays"):
        norm_kernels.backward(x, x, np.ones(2), np.ones(3), True, np.empty(3))


def test_the_transfer_counting_fake_runs_norm_nets_on_the_numpy_reference(monkeypatch):
    """tests/fake_cupy_transfers.py routes the norm steps to NumPy too, so whole computations on a
    Sequential with norm layers run there (and count their transfers) without a kernel build."""
    import fake_cupy_transfers

    arrays = fake_cupy_transfers.install(monkeypatch)
    monkeypatch.setattr(jg.backend, "cupy", lambda: pytest.fail("a kernel was built"))
    rng = np.random.default_rng(6)
    x, t = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    ref_loss, ref = build(lambda a: a, 6).loss_and_grads(x, t)
    loss, g = build(arrays.asarray, 6).loss_and_grads(arrays.asarray(x), arrays.asarray(t))
    np.testing.assert_allclose(host_of(g.flat), ref.flat, rtol=1e-12, atol=1e-14)
    assert float(host_of(loss)) == pytest.approx(float(ref_loss), rel=1e-12)


def test_compiled_step_writes_the_norm_kernels_results_into_its_own_buffers(device):
    """Sequential.compile on the device: the norm layers' kernels write y, x̂, inv and ∂L/∂x into
    the step's buffers (forward out= / backward dx_out=), and the step equals the NumPy net."""
    fake, put = device
    n, B = 8, 6
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((B, n)), rng.standard_normal((B, n))
    ref_loss, ref = build(lambda a: a, n).loss_and_grads(x, t)
    step = build(put, n).compile(B, capture=False)
    for _ in range(2):  # the second call reuses every buffer
        del fake.launches[:]
        loss, g = step(put(x), put(t))
        names = kernel_names(fake)
        assert names.count("norm_forward") == 2 and names.count("norm_backward") == 2
        np.testing.assert_allclose(float(host_of(loss)), ref_loss, rtol=1e-12)
        np.testing.assert_allclose(host_of(g.flat), ref.flat, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(host_of(g.input), ref.input, rtol=1e-10, atol=1e-12)


def test_the_factor_vjp_kernel_writes_into_the_out_buffer_it_is_given(device):
    fake, put = device
    rng = np.random.default_rng(6)
    B, n = 5, 7
    ln = L.LayerNorm(rng.standard_normal(n), rng.standard_normal(n))
    x, v = rng.standard_normal((B, n)), rng.standard_normal((B, n))
    want = ln.factor(ln.forward(x)[1]).vjp(v)
    F = L.LayerNorm(put(ln.gamma), put(ln.beta)).factor(L.LayerNorm(put(ln.gamma), put(ln.beta)).forward(put(x))[1])
    out = put(np.empty((B, n)))
    del fake.launches[:]
    got = F.vjp(put(v), out=out)
    assert got is out and kernel_names(fake) == ["norm_product"]  # written by the kernel, no copy
    np.testing.assert_allclose(host_of(out), want, rtol=1e-12, atol=1e-13)
    strided = put(np.empty((n, B))).T  # not C-contiguous: the result is copied into it
    np.testing.assert_allclose(host_of(F.vjp(put(v), out=strided)), want, rtol=1e-12, atol=1e-13)
