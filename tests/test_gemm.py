"""_gemm: the row-major → column-major cuBLAS mapping, checked on the CPU against a column-major
GEMM emulated from the BLAS definition; on a GPU, the direct cuBLAS path against cupy.matmul,
eagerly and replayed from a captured CUDA graph."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cuda import gemm as _gemm
from jacgrad.cuda.gemm import OP_N, OP_T, gemm_plan


def _memory(x):
    """(the 1-D buffer that owns x's memory, x's first element's offset in it)."""
    owner = x
    while owner.base is not None:
        owner = owner.base
    flat = owner.reshape(-1)
    offset = (x.__array_interface__["data"][0] - flat.__array_interface__["data"][0]) // x.itemsize
    return flat, offset


def _colmajor(mem, offset, rows, cols, ld):
    """The column-major matrix (rows × cols, leading dimension ld) starting at mem[offset]."""
    s = mem.itemsize
    return np.lib.stride_tricks.as_strided(mem[offset:], shape=(rows, cols), strides=(s, ld * s))


def _reference_gemm(p, A, B, C):
    """C := op(A)·op(B) by the BLAS definition (alpha 1, beta 0), on (buffer, offset) pairs."""
    opA = _colmajor(*A, p.m, p.k, p.lda) if p.transa == OP_N else _colmajor(*A, p.k, p.m, p.lda).T
    opB = _colmajor(*B, p.k, p.n, p.ldb) if p.transb == OP_N else _colmajor(*B, p.n, p.k, p.ldb).T
    c = _colmajor(*C, p.m, p.n, p.ldc)
    for i in range(p.m):  # element by element: no library GEMM in the reference
        for j in range(p.n):
            c[i, j] = sum(opA[i, l] * opB[l, j] for l in range(p.k))


def _operand(rng, rows, cols, kind):
    """A (rows × cols) float64 matrix in one of the layouts jacgrad hands to a GEMM."""
    if kind == "c":
        return rng.standard_normal((rows, cols))
    if kind == "t":  # the transposed view of a C-contiguous array (W.T, z.T)
        return rng.standard_normal((cols, rows)).T
    if kind == "rows":  # a column slice of a wider row-major array: leading dimension > cols
        return rng.standard_normal((rows, cols + 3))[:, 1 : cols + 1]
    return rng.standard_normal((cols + 2, rows))[1 : cols + 1].T  # "trows": transposed, ld > rows


KINDS = ["c", "t", "rows", "trows"]


@pytest.mark.parametrize("M,K,N", [(3, 4, 5), (1, 4, 5), (3, 1, 5), (3, 4, 1), (1, 1, 1), (6, 2, 3)])
@pytest.mark.parametrize("ka", KINDS)
@pytest.mark.parametrize("kb", KINDS)
def test_plan_computes_the_row_major_product(rng, M, K, N, ka, kb):
    a, b = _operand(rng, M, K, ka), _operand(rng, K, N, kb)
    out_owner = np.full((M, N + 2), np.nan)
    out = out_owner[:, 1 : N + 1]  # a row-major output with leading dimension N + 2
    p = gemm_plan(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, 8)
    assert p is not None
    _reference_gemm(p, _memory(b), _memory(a), _memory(out))
    np.testing.assert_allclose(out, a @ b, rtol=1e-13, atol=1e-13)
    assert np.isnan(out_owner[:, 0]).all() and np.isnan(out_owner[:, -1]).all()  # nothing outside out


def test_plan_flags_for_the_training_step_layouts(rng):
    z, W, delta = np.zeros((8, 5)), np.zeros((5, 7)), np.zeros((8, 7))
    forward = gemm_plan(z.shape, z.strides, W.shape, W.strides, (8, 7), (56, 8), 8)  # h = z @ W
    assert (forward.transa, forward.transb, forward.m, forward.n, forward.k) == (OP_N, OP_N, 7, 8, 5)
    assert (forward.lda, forward.ldb, forward.ldc) == (7, 5, 7)
    grad = gemm_plan(z.T.shape, z.T.strides, delta.shape, delta.strides, (5, 7), (56, 8), 8)  # dW = zᵀ δ
    assert (grad.transa, grad.transb, grad.m, grad.n, grad.k, grad.ldb) == (OP_N, OP_T, 7, 5, 8, 5)
    back = gemm_plan(delta.shape, delta.strides, W.T.shape, W.T.strides, (8, 5), (40, 8), 8)  # g = δ Wᵀ
    assert (back.transa, back.transb, back.lda) == (OP_T, OP_N, 7)


def test_unreadable_layouts_get_no_plan(rng):
    a = rng.standard_normal((6, 8))
    b = rng.standard_normal((4, 3))
    assert gemm_plan(a[::2, ::2].shape, a[::2, ::2].strides, b.shape, b.strides, (3, 3), (24, 8), 8) is None
    assert gemm_plan(a[:, ::-1][:, :4].shape, a[:, ::-1][:, :4].strides, b.shape, b.strides, (6, 3), (24, 8), 8) is None
    out_t = np.zeros((3, 6)).T  # a column-major output: cuBLAS would write its transpose
    assert gemm_plan((6, 4), (32, 8), b.shape, b.strides, out_t.shape, out_t.strides, 8) is None
    with pytest.raises(ValueError, match="do not match"):
        gemm_plan((6, 4), (32, 8), (5, 3), (24, 8), (6, 3), (24, 8), 8)


def test_numpy_products_never_take_the_cublas_path(rng):
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    out = np.empty((4, 2))
    with _gemm.direct_cublas():
        assert _gemm.matmul_into(a, b, out) is out
    np.testing.assert_array_equal(out, a @ b)
    assert _gemm._direct == []


def test_loaded_library_lookup_names_what_is_missing():
    """Holds wherever torch-CUDA (or CuPy) has loaded a libcublas: the name asked for is one that
    no process loads. (The old test asked for "libcublas.so" and failed there.)"""
    assert hasattr(_gemm.open_loaded("libc.so.6"), "malloc")
    with pytest.raises(RuntimeError, match=r"libcublas\.so\.999 is not loaded"):
        _gemm.open_loaded("libcublas.so.999")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ka,kb", [("c", "c"), ("t", "c"), ("c", "t"), ("rows", "trows")])
def test_gpu_direct_cublas_matches_cupy_matmul(rng, dtype, ka, kb):
    cp = pytest.importorskip("cupy")
    a = cp.asarray(_operand(rng, 33, 17, ka).astype(dtype))
    b = cp.asarray(_operand(rng, 17, 9, kb).astype(dtype))
    a, b = (cp.asarray(x) if x.flags.c_contiguous else x for x in (a, b))  # cp.asarray keeps views' strides
    out = cp.full((33, 9), cp.nan, dtype=dtype)
    with _gemm.direct_cublas():
        _gemm.matmul_into(a, b, out)
    tol = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(cp.asnumpy(out), cp.asnumpy(a) @ cp.asnumpy(b), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_direct_cublas_records_into_a_cuda_graph_and_replays(rng):
    cp = pytest.importorskip("cupy")
    from jacgrad.cuda.graphs import GraphCache

    a = cp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    W = cp.asarray(rng.standard_normal((48, 32)).astype(np.float32))
    out = cp.zeros((64, 48), dtype=np.float32)
    graphs = GraphCache()
    for call in range(3):  # call 0: eager through cupy.matmul, then captured; later: replays
        a[...] = cp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
        graphs.run("k", lambda: _gemm.matmul_into(a, W.T, out))
        np.testing.assert_allclose(cp.asnumpy(out), cp.asnumpy(a) @ cp.asnumpy(W).T, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    jg.backend.cupy().cuda.Device().synchronize()


# ----------------------------------------------------------------------------- batched (stacks)
def _stack(rng, n, rows, cols, kind):
    """(n, rows, cols) in a layout the Jacobian stacks take: C-contiguous, per-matrix transposed
    (a swapaxes view), or one 2-D matrix shared by the stack (kind "shared": returned 2-D)."""
    if kind == "shared":
        return _operand(rng, rows, cols, "c")
    if kind == "c":
        return rng.standard_normal((n, rows, cols))
    return rng.standard_normal((n, cols, rows)).swapaxes(-1, -2)


@pytest.mark.parametrize("n,M,K,N", [(3, 4, 2, 5), (1, 3, 3, 3), (4, 1, 6, 2), (2, 5, 1, 4)])
@pytest.mark.parametrize("ka,kb", [("c", "c"), ("t", "c"), ("c", "t"), ("t", "t"), ("shared", "c"), ("c", "shared"),
                                   ("t", "shared")])
def test_batched_plan_computes_every_product_of_the_stack(rng, n, M, K, N, ka, kb):
    a, b = _stack(rng, n, M, K, ka), _stack(rng, n, K, N, kb)
    out = np.full((n, M, N), np.nan)
    p, bp = _gemm.gemm_batched_plan(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, 8)
    assert bp.count == n and (bp.stride_b == 0) == (a.ndim == 2) and (bp.stride_a == 0) == (b.ndim == 2)
    (A, oa), (B, ob), (C, oc) = _memory(b), _memory(a), _memory(out)
    for i in range(n):  # product i reads A, B, C at i × their strides, by the BLAS definition
        _reference_gemm(p, (A, oa + i * bp.stride_a), (B, ob + i * bp.stride_b), (C, oc + i * bp.stride_c))
    np.testing.assert_allclose(out, a @ b, rtol=1e-13, atol=1e-13)


def test_batched_plan_refuses_what_it_cannot_do_in_place(rng):
    a, b = rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 2, 5))
    with pytest.raises(ValueError, match=r"batches of \(3, 4, 2\) @ \(2, 2, 5\) -> \(3, 4, 5\) do not match"):
        _gemm.gemm_batched_plan(a.shape, a.strides, (2, 2, 5), b.strides, (3, 4, 5), (160, 40, 8), 8)
    with pytest.raises(ValueError, match="needs a 3-D output"):
        _gemm.gemm_batched_plan(a.shape, a.strides, b.shape, b.strides, (4, 5), (40, 8), 8)
    overlapping = (3, 4, 5), (0, 40, 8)  # every product written to the same matrix
    assert _gemm.gemm_batched_plan(a.shape, a.strides, b.shape, b.strides, *overlapping, 8) is None
    neg = a[::-1]  # a negative batch stride
    assert _gemm.gemm_batched_plan(neg.shape, neg.strides, b.shape, b.strides, (3, 4, 5), (160, 40, 8), 8) is None


def test_matmul_is_the_plain_product_outside_a_capture(rng):
    a, b = rng.standard_normal((3, 4, 2)), rng.standard_normal((2, 5))
    np.testing.assert_array_equal(_gemm.matmul(a, b), a @ b)
    with _gemm.direct_cublas():  # NumPy operands never take the cuBLAS path
        np.testing.assert_array_equal(_gemm.matmul(a, b), a @ b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ka,kb", [("c", "c"), ("t", "c"), ("shared", "t"), ("c", "shared")])
def test_gpu_direct_batched_cublas_matches_cupy_matmul(rng, dtype, ka, kb):
    cp = pytest.importorskip("cupy")
    a, b = _stack(rng, 7, 33, 8, ka).astype(dtype), _stack(rng, 7, 8, 21, kb).astype(dtype)
    da, db = cp.asarray(np.ascontiguousarray(a)), cp.asarray(np.ascontiguousarray(b))
    if ka == "t":
        da = cp.ascontiguousarray(da.swapaxes(-1, -2)).swapaxes(-1, -2)  # the same transposed layout on the GPU
    with _gemm.direct_cublas():
        got = _gemm.matmul(da, db)
    tol = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(cp.asnumpy(got), a @ b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------- any ranks, on the fake CuPy
@pytest.fixture
def host_cublas(monkeypatch):
    """The fake CuPy, with jacgrad's cuBLAS calls carried out on the host (the BLAS definition)."""
    import types

    from fake_cupy_transfers import FakeArray, install
    from fake_capture import HostCublas

    fake = install(monkeypatch)
    fake.host = HostCublas()
    monkeypatch.setattr(_gemm._Cublas, "get", classmethod(lambda cls: fake.host))
    monkeypatch.setattr(FakeArray, "data", property(lambda a: types.SimpleNamespace(ptr=a.__array_interface__["data"][0])),
                        raising=False)
    return fake


ND_CASES = [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)), ((2, 3, 4), (2, 4, 5)),
            ((2, 1, 3, 4), (2, 6, 4, 5)), ((6, 1, 3, 4), (5, 4, 2)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
            ((2, 3, 4), (4,)), ((1, 3, 4), (2, 4, 5)), ((2, 3, 0), (2, 0, 5)), ((2, 0, 4), (2, 4, 5))]


@pytest.mark.parametrize("a_shape,b_shape", ND_CASES)
@pytest.mark.parametrize("layout", ["C", "transposed", "batch last"])
def test_direct_cublas_takes_any_ranks_and_strides(host_cublas, rng, a_shape, b_shape, layout):
    """Inside ``direct_cublas()`` (what a graph records), ``matmul`` and ``matmul_into`` are NumPy's
    matmul for any ranks (1-D operands, broadcast batches) and any strides (transposed matrices, a
    batch axis stored last, an F-ordered output): strided-batched calls where the batch collapses,
    loops over the rest, contiguous copies of what cuBLAS cannot read."""
    def make(shape):
        x = rng.standard_normal(shape)
        dev = host_cublas.asarray
        if layout == "transposed" and x.ndim >= 2:
            return dev(np.ascontiguousarray(x.swapaxes(-1, -2))).swapaxes(-1, -2), x
        if layout == "batch last" and x.ndim >= 3:
            return np.moveaxis(dev(np.ascontiguousarray(np.moveaxis(x, 0, -1))), -1, 0), x
        return dev(x), x

    (A, a), (Bm, b) = make(a_shape), make(b_shape)
    want = a @ b
    out = host_cublas.asarray(np.asfortranarray(np.zeros(want.shape)) if want.ndim >= 2 else np.zeros(want.shape))
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        got = _gemm.matmul(A, Bm)
        assert _gemm.matmul_into(A, Bm, out) is out
    for r in (got, out):
        assert r.shape == want.shape
        np.testing.assert_allclose(np.asarray(r.view(np.ndarray)), want, rtol=1e-13, atol=1e-13)
    assert host_cublas.host.calls or want.size == 0 or a.shape[-1] == 0


def test_direct_cublas_names_mismatched_shapes(host_cublas):
    a, b = host_cublas.asarray(np.ones((2, 3, 4))), host_cublas.asarray(np.ones((2, 5, 6)))
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3, 4\) @ \(2, 5, 6\) do not match"):
            _gemm.matmul(a, b)
        with pytest.raises(ValueError, match=r"matmul: out has shape \(2, 3\)"):
            _gemm.matmul_into(host_cublas.asarray(np.ones((2, 3, 4))), host_cublas.asarray(np.ones((4, 6))),
                             host_cublas.asarray(np.ones((2, 3))))


def test_a_stack_times_one_matrix_is_one_gemm(host_cublas, rng):
    """``(B, T, d) @ (d, e)`` with rows that fold: ONE ``cublasGemmEx`` over the ``B·T`` rows, not a batch
    of B; a stack whose rows do not fold (a transposed batch) takes the strided batch, same numbers."""
    a, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((5, 2))
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        got = _gemm.matmul(host_cublas.asarray(a), host_cublas.asarray(w))
        assert host_cublas.host.calls == ["gemm"]
        swapped = host_cublas.asarray(np.ascontiguousarray(a.swapaxes(0, 1))).swapaxes(0, 1)
        got2 = _gemm.matmul(swapped, host_cublas.asarray(w))
    assert host_cublas.host.calls == ["gemm", "strided batched"]
    np.testing.assert_allclose(np.asarray(got.view(np.ndarray)), a @ w, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(got2.view(np.ndarray)), a @ w, rtol=1e-13)
