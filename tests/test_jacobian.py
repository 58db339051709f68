"""LayerJacobian against dense float64 NumPy products, finite differences and the adjoint test."""

import tracemalloc

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra.check import check_adjoint, numerical_jacobian, relative_error

# (B or None for a shared diagonal, H_in, H_out): B = 1, B = 0, width 1 and bottlenecks included.
SHAPES = [(5, 7, 4), (1, 3, 3), (3, 1, 6), (4, 6, 1), (None, 5, 8), (None, 1, 1), (2, 16, 2), (0, 4, 3)]


def make_factor(rng, B, h_in, h_out, dtype=np.float64, xp=np):
    d = rng.uniform(-1.5, 1.5, size=(h_out,) if B is None else (B, h_out))
    W = rng.standard_normal((h_in, h_out))
    return jg.LayerJacobian(xp.asarray(d.astype(dtype)), xp.asarray(W.astype(dtype))), d, W


def reference_dense(d, W):
    """diag(d) @ Wᵀ built the naive way, per sample."""
    if d.ndim == 1:
        return np.diag(d) @ W.T
    return np.stack([np.diag(row) @ W.T for row in d]) if len(d) else np.zeros((0,) + W.T.shape)


@pytest.mark.parametrize("B,h_in,h_out", SHAPES)
def test_dense_vjp_jvp_match_dense_reference(rng, xp, B, h_in, h_out):
    J, d, W = make_factor(rng, B, h_in, h_out, xp=xp)
    ref = reference_dense(d, W)
    assert J.shape == (h_out, h_in)
    assert relative_error(J.dense(), ref) < 1e-15
    assert relative_error(J.dense(transposed=True), np.swapaxes(ref, -1, -2)) < 1e-15
    n = B if B is not None else 3
    v = rng.standard_normal((n, h_out))
    u = rng.standard_normal((n, h_in))
    ref_b = ref if B is not None else np.broadcast_to(ref, (n,) + ref.shape)
    assert relative_error(J.vjp(xp.asarray(v)), np.einsum("bo,boi->bi", v, ref_b)) < 1e-13
    assert relative_error(J.jvp(xp.asarray(u)), np.einsum("boi,bi->bo", ref_b, u)) < 1e-13


@pytest.mark.parametrize("B,h_in,h_out", [s for s in SHAPES if s[0] != 0])
def test_adjoint_identity(rng, B, h_in, h_out):
    J, _, _ = make_factor(rng, B, h_in, h_out)
    n = B if B is not None else 2
    err = check_adjoint(J.jvp, J.vjp, rng.standard_normal((n, h_in)), rng.standard_normal((n, h_out)))
    assert err < 1e-13


def test_shared_factor_accepts_one_vector(rng):
    J, d, W = make_factor(rng, None, 4, 3)
    v, u = rng.standard_normal(3), rng.standard_normal(4)
    np.testing.assert_allclose(J.vjp(v), (np.diag(d) @ W.T).T @ v, rtol=1e-14)
    np.testing.assert_allclose(J.jvp(u), np.diag(d) @ W.T @ u, rtol=1e-14)


def test_jvp_is_the_derivative_of_the_layer(rng):
    """The factor built from an activation is ∂φ(xW+b)/∂x, by central differences."""
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    x = rng.standard_normal(4)
    h = x @ W + b
    J = jg.LayerJacobian.from_activation("tanh", W, h=h)
    num = numerical_jacobian(lambda x: np.tanh(x @ W + b), x)
    assert relative_error(J.dense(), num) < 1e-9


@pytest.mark.parametrize("name", jg.activations.names())
def test_implicit_diagonal_equals_explicit(rng, xp, name):
    act = jg.activations.get(name)
    B, h_in, h_out = 6, 5, 7
    W = xp.asarray(rng.standard_normal((h_in, h_out)))
    h = xp.asarray(rng.standard_normal((B, h_out)) * 2)
    explicit = jg.LayerJacobian(act.df(h), W)
    implicit = jg.LayerJacobian.from_activation(name, W, h=h)
    v, u = xp.asarray(rng.standard_normal((B, h_out))), xp.asarray(rng.standard_normal((B, h_in)))
    assert relative_error(implicit.vjp(v), explicit.vjp(v)) < 1e-14
    assert relative_error(implicit.jvp(u), explicit.jvp(u)) < 1e-14
    if act.df_from_output is not None:
        from_y = jg.LayerJacobian.from_activation(name, W, y=act.f(h))
        assert relative_error(from_y.vjp(v), explicit.vjp(v)) < 1e-13


@pytest.mark.parametrize("B", [None, 4, 1])
def test_spectra_match_numpy_svd(rng, xp, B):
    J, d, W = make_factor(rng, B, 9, 6, xp=xp)
    ref = reference_dense(d, W)
    s_ref = np.linalg.svd(ref, compute_uv=False)
    assert relative_error(J.singular_values(), s_ref) < 1e-13
    assert relative_error(J.spectral_norm(), s_ref[..., 0]) < 1e-13
    bound = jg.to_numpy(J.norm_bound())
    np.testing.assert_allclose(bound, np.abs(d).max(axis=-1) * np.linalg.norm(W, 2), rtol=1e-13)
    assert np.all(bound >= s_ref[..., 0] * (1 - 1e-12))


def test_float32_stays_float32(rng):
    J, _, _ = make_factor(rng, 3, 5, 4, dtype=np.float32)
    v = rng.standard_normal((3, 4)).astype(np.float32)
    u = rng.standard_normal((3, 5)).astype(np.float32)
    for out in (J.vjp(v), J.jvp(u), J.dense(), J.singular_values(), J.spectral_norm(), J.norm_bound()):
        assert out.dtype == np.float32


def test_float32_against_float64_reference(rng):
    J64, d, W = make_factor(rng, 8, 32, 16)
    J32 = jg.LayerJacobian(d.astype(np.float32), W.astype(np.float32))
    v = rng.standard_normal((8, 16))
    assert relative_error(J32.vjp(v.astype(np.float32)), J64.vjp(v)) < 1e-5


def test_vjp_and_jvp_never_copy_w_or_build_diag():
    """With W of 32 MB and B = 4, a product allocates O(B·H) — far below one copy of W."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((2000, 2000))
    d = rng.standard_normal((4, 2000))
    v = rng.standard_normal((4, 2000))
    J = jg.LayerJacobian(d, W)
    for product in (J.vjp, J.jvp):
        product(v)  # warm caches
        tracemalloc.start()
        product(v)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * 4 * 2000 * 8, f"{product.__name__} peaked at {peak} bytes"


# ----------------------------------------------------------------------------- bad input
def test_mismatched_d_and_w_names_both_shapes(rng):
    with pytest.raises(ValueError, match=r"d has shape \(5,\) but W has shape \(4, 3\)"):
        jg.LayerJacobian(rng.standard_normal(5), rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match="W must be 2-D"):
        jg.LayerJacobian(rng.standard_normal(3), rng.standard_normal(3))


def test_wrong_cotangent_shape_is_named(rng):
    J, _, _ = make_factor(rng, 5, 7, 4)
    with pytest.raises(ValueError, match=r"cotangent has shape \(5, 3\)"):
        J.vjp(rng.standard_normal((5, 3)))
    with pytest.raises(ValueError, match=r"per sample with B=5"):
        J.vjp(rng.standard_normal((2, 4)))
    with pytest.raises(ValueError, match=r"tangent has shape \(5, 4\)"):
        J.jvp(rng.standard_normal((5, 4)))


@pytest.mark.parametrize("bad", [np.ones((2, 3), dtype=np.int64), np.ones((2, 3), dtype=np.complex128),
                                 np.ones((2, 3), dtype=bool)])
def test_non_float_arrays_are_rejected(bad):
    with pytest.raises(TypeError, match="dtype"):
        jg.LayerJacobian(np.ones(3), bad)
    J = jg.LayerJacobian(np.ones(3), np.ones((3, 3)))
    with pytest.raises(TypeError, match="dtype"):
        J.vjp(bad)


def test_from_activation_errors(rng):
    W = rng.standard_normal((3, 2))
    with pytest.raises(ValueError, match="exactly one of h"):
        jg.LayerJacobian.from_activation("tanh", W)
    with pytest.raises(ValueError, match="no derivative from its output"):
        jg.LayerJacobian.from_activation("gelu", W, y=np.ones(2))
    with pytest.raises(KeyError, match="tanh"):
        jg.LayerJacobian.from_activation("tanhh", W, h=np.ones(2))


class _FakeCupyArray:
    """Stands in for a cupy.ndarray: get_xp tells devices apart by the type's module."""

    __module__ = "cupy._core.core"
    shape, ndim, dtype = (3,), 1, np.dtype(np.float64)


def test_numpy_cupy_mix_is_a_type_error_naming_the_arguments():
    with pytest.raises(TypeError, match=r"argument\(s\) \[1\] are NumPy .* \[0\] are CuPy"):
        jg.LayerJacobian(_FakeCupyArray(), np.ones((3, 3)))
