"""The im2col GEMMs of the convolutions go through ``jacgrad.cuda.gemm.matmul`` (recordable in a CUDA
graph: direct cuBLAS, strided-batched over the groups, while a compiled step captures), on device
arrays (the fake CuPy of tests/fake_cupy_transfers.py) with NumPy's numbers; each stack they form is
one the strided-batched plan reads in place (``gemm_batched_plan`` is not None for its layout)."""

import numpy as np
import pytest

from jacgrad.conv import im2col
from jacgrad.cuda import gemm
from fake_cupy_transfers import install
from test_conv_device import _cnn, _run

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _recording(monkeypatch):
    """Every product of ``im2col`` (``matmul`` and ``matmul_into``): module, operand shapes and
    strides, the output's shape (and its strides: ``matmul_into`` writes a view in place)."""
    seen = []
    real, real_into = gemm.matmul, gemm.matmul_into

    def record(a, b):
        out = real(a, b)
        seen.append((type(a).__module__, a.shape, a.strides, b.shape, b.strides, out.shape, a.dtype.itemsize,
                     _c_strides(out.shape, a.dtype.itemsize)))
        return out

    def record_into(a, b, out):
        real_into(a, b, out)
        seen.append((type(a).__module__, a.shape, a.strides, b.shape, b.strides, out.shape, a.dtype.itemsize,
                     out.strides))
        return out

    monkeypatch.setattr(im2col, "matmul", record)
    monkeypatch.setattr(im2col, "matmul_into", record_into)
    return seen


def _c_strides(shape, itemsize):
    return tuple(int(np.prod(shape[k + 1:], dtype=np.int64)) * itemsize for k in range(len(shape)))


def test_cnn_products_route_their_gemms_through_gemm_matmul(monkeypatch):
    fake = install(monkeypatch)
    seen = _recording(monkeypatch)
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 3))
    u, v = rng.standard_normal((2, 192)), rng.standard_normal((2, 3))
    ref = _run(_cnn(np.asarray), x, g, u, v)
    host_calls = len(seen)
    assert host_calls > 0 and all(m == "numpy" for m, *_ in seen)  # NumPy: the same function, NumPy operands
    del seen[:]
    out = _run(_cnn(fake.asarray), *(fake.asarray(a) for a in (x, g, u, v)))
    for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-12)
    # two convolutions: forward, input gradient, weight gradient, JVP and VJP each (at least)
    assert len(seen) == host_calls >= 2 * 5 and all(m == "cupy" for m, *_ in seen)
    for _, a_shape, a_strides, b_shape, b_strides, o_shape, item, o_strides in seen:
        assert len(o_shape) == 3, (a_shape, b_shape)  # a stack (over the samples or groups): one strided-batched call
        plan = gemm.gemm_batched_plan(a_shape, a_strides, b_shape, b_strides, o_shape, o_strides, item)
        assert plan is not None, f"{a_shape} {a_strides} @ {b_shape} {b_strides}: no in-place batched plan"


@pytest.mark.parametrize("groups", [1, 2])
def test_per_sample_norms_are_one_batched_gemm_per_chunk(monkeypatch, groups):
    """``per_sample_sq_norms``: one (n·G)-stack product per chunk, equal to each sample's own weight
    gradient's squared norm (``weight_grad`` on that sample alone)."""
    install(monkeypatch)
    seen = _recording(monkeypatch)
    rng = np.random.default_rng(2)
    N, C, Cout = 3, 4, 6
    geo = im2col.Geometry.make("Conv2d", (C, 6, 5), (Cout, 3, 2), (1, 2), 1, (1, 1), groups)
    x = rng.standard_normal((N, C, 6, 5))
    delta = rng.standard_normal((N, Cout) + geo.out_hw)
    want = []
    for b in range(N):
        w = np.empty((groups, Cout // groups, (C // groups) * 6))
        im2col.weight_grad(x[b:b + 1], delta[b:b + 1], geo, groups, w)
        want.append((w * w).sum())
    del seen[:]
    got = im2col.per_sample_sq_norms(x, delta, geo, groups)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    (_, a_shape, a_strides, b_shape, b_strides, o_shape, item, o_strides), = seen
    assert o_shape == (N * groups, Cout // groups, (C // groups) * 6)
    assert gemm.gemm_batched_plan(a_shape, a_strides, b_shape, b_strides, o_shape, o_strides, item) is not None
