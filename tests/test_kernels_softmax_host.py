"""The softmax Jacobian's fused kernel (kernels/softmax.cu, math in kernels/softmax.cuh) against float64
NumPy: the header built for the host by g++ and nvcc (tests/norm_host_kernels.py runs every thread of
the grid on host threads, with the device's thread partition), launched by
``jacgrad.cuda.softmax_kernels.softmax_jvp`` as on CuPy; and the attention layer calling it on device
arrays (the fake CuPy), with the same numbers as on NumPy."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cuda import norm_kernels, softmax_kernels

from norm_host_kernels import host_device, host_libraries  # noqa: F401 (fixtures)
from test_attention_device import _attention, _attention_run, B, T, d

EPS = {np.float32: np.finfo(np.float32).eps, np.float64: np.finfo(np.float64).eps}


def probabilities(rng, shape, dtype):
    s = rng.standard_normal(shape) * 3
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(dtype)


def reference(P, v):
    """Every row's dense (diag(p) − ppᵀ) v in float64."""
    P64 = np.broadcast_to(P.astype(np.float64), v.shape)
    J = np.einsum("...i,ij->...ij", P64, np.eye(v.shape[-1])) - P64[..., :, None] * P64[..., None, :]
    return np.einsum("...ij,...j->...i", J, v.astype(np.float64))


def check(got, P, v, dtype, what):
    want = reference(P, v)
    tol = 64 * EPS[dtype] * np.abs(v.astype(np.float64)).max(axis=-1, keepdims=True)
    err = np.abs(np.asarray(got, dtype=np.float64) - want)
    assert (err <= tol).all(), f"{what}: max error {err.max():.3g} above {tol.max():.3g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_jvp_matches_float64(host_device, rng, dtype, monkeypatch):
    """Rows of every width class (a lane group, a block, several packs per thread, longer than the
    registers hold: n = 5000), aligned and not, P tiled over a stack, in place, few blocks."""
    fake, arrays = host_device
    monkeypatch.setattr(norm_kernels, "_MAX_GRID", 3)  # fewer blocks than rows: the row loop
    for n in (1, 2, 3, 4, 5, 17, 64, 100, 257, 1027, 5000):
        B_ = 4
        P, v = probabilities(rng, (B_, n), dtype), rng.standard_normal((B_, n)).astype(dtype)
        check(softmax_kernels.softmax_jvp(arrays.asarray(P), arrays.asarray(v)), P, v, dtype, f"n={n}")
        stack = rng.standard_normal((3, B_, n)).astype(dtype)  # one P for a stack of 3 tangents
        check(softmax_kernels.softmax_jvp(arrays.asarray(P), arrays.asarray(stack)), P, stack, dtype, f"stack n={n}")
        mid = rng.standard_normal((B_, 2, n)).astype(dtype)  # P (B, 1, n) over a stack (B, 2, n): the middle axis
        check(softmax_kernels.softmax_jvp(arrays.asarray(P)[:, None], arrays.asarray(mid)), P[:, None], mid, dtype,
              f"middle n={n}")
        inplace = arrays.asarray(v)
        got = softmax_kernels.softmax_jvp(arrays.asarray(P)[None], inplace, out=inplace)
        assert got is inplace
        check(inplace, P, v, dtype, f"in place n={n}")
        buf = arrays.asarray(np.zeros((B_, n + 1), dtype))  # off the 16-byte grid: the single-element path
        pv = buf[:, 1:]
        pv[...] = v
        check(softmax_kernels.softmax_jvp(arrays.asarray(P), pv), P, v, dtype, f"unaligned n={n}")
    assert {e for e, _, _ in fake.launches} == {f"jacgrad::softmax_jvp<{'float' if dtype == np.float32 else 'double'}>"}


def test_softmax_jvp_says_what_is_wrong(host_device, rng):
    _, arrays = host_device
    P, v = probabilities(rng, (2, 5), np.float64), rng.standard_normal((2, 5))
    with pytest.raises(TypeError, match="CuPy arrays"):
        softmax_kernels.softmax_jvp(P, v)
    with pytest.raises(TypeError, match="float32 but v is float64"):
        softmax_kernels.softmax_jvp(arrays.asarray(P.astype(np.float32)), arrays.asarray(v))
    with pytest.raises(ValueError, match=r"P \(3, 5\) must broadcast to v's shape \(2, 5\)"):
        softmax_kernels.softmax_jvp(arrays.asarray(np.ones((3, 5))), arrays.asarray(v))
    with pytest.raises(ValueError, match="one run of consecutive"):  # two separate runs of broadcast axes
        softmax_kernels.softmax_jvp(arrays.asarray(np.ones((1, 2, 1, 5))), arrays.asarray(np.ones((3, 2, 4, 5))))
    for bad in (np.zeros((2, 5), np.float32), np.zeros((2, 4))):  # out of another dtype or shape: refused, not cast
        with pytest.raises(ValueError, match=r"softmax_jvp: out is \(2, [45]\) float(32|64) but v is \(2, 5\) float64"):
            softmax_kernels.softmax_jvp(arrays.asarray(P), arrays.asarray(v), out=arrays.asarray(bad))


def test_attention_launches_the_kernel_and_matches_numpy(host_device):
    """MultiHeadAttention's forward, backward, factor products and parameter stacks on device arrays:
    the softmax Jacobian goes through the host build of the kernel, the numbers are NumPy's."""
    fake, arrays = host_device
    rng = np.random.default_rng(1)
    x, g, S = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, d)), rng.standard_normal((B, 2, T, d))
    mask = np.zeros((B, T), dtype=bool)
    mask[2, :] = True  # a sample whose every key is masked: P's rows of zeros
    want = _attention_run(_attention(np.asarray), x, mask, g, S)
    got = _attention_run(_attention(arrays.asarray), *(arrays.asarray(a) for a in (x, mask, g, S)))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-11, atol=1e-13)
    assert [e for e, _, _ in fake.launches].count("jacgrad::softmax_jvp<double>") >= 3  # backward, jvp, vjp, stacks


def test_attention_calls_the_fused_kernel_on_device(monkeypatch):
    """On device arrays (the fake CuPy, kernels on NumPy) every softmax-Jacobian product of the
    attention layer goes through softmax_kernels.softmax_jvp, in place into its scratch."""
    from fake_cupy_transfers import install

    fake = install(monkeypatch)
    calls = []
    routed = softmax_kernels.softmax_jvp

    def record(P, v, out=None):
        calls.append((tuple(P.shape), tuple(v.shape), out is v))
        return routed(P, v, out=out)

    monkeypatch.setattr(softmax_kernels, "softmax_jvp", record)
    rng = np.random.default_rng(2)
    x, g, S = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, d)), rng.standard_normal((B, 2, T, d))
    L = _attention(fake.asarray)
    _attention_run(L, fake.asarray(x), fake.asarray(np.zeros((B, T), bool)), fake.asarray(g), fake.asarray(S))
    assert len(calls) >= 3 and all(inplace for _, _, inplace in calls)
    assert all(v[-2:] == (T, T) for _, v, _ in calls)
    calls.clear()
    _attention_run(_attention(np.asarray), x, np.zeros((B, T), bool), g, S)
    assert calls == []  # NumPy arrays: the reference expression, no kernel
    assert jg.backend.is_gpu_array(fake.asarray(x))
